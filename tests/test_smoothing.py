"""Offline smoothing: noise goes, blinks and fast mouth motion stay, lost frames are not bridged, the head pose is
smoothed harder than the face; and on real clips the smoothed track is steadier than the detector while it still
follows the eyes and the mouth."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from engine.smoothing import SmoothingConfig, noise_level, smooth_linear, smooth_sequence, smooth_track, smooth_within_fit, valid_runs

FPS = 25.0


def _sequence(columns: np.ndarray, valid: np.ndarray | None = None) -> dict[str, np.ndarray]:
    frames = len(columns)
    return {
        "exp": columns.astype(np.float32),
        "cam": np.zeros((frames, 6), np.float32),
        "shape": np.ones((frames, 3), np.float32),
        "valid": np.ones(frames, bool) if valid is None else valid,
    }


def _blinks(frames: int) -> np.ndarray:
    """An eyelid-like signal: open, closing in 2 frames, closed for 2, open again in 2, every 40 frames."""
    signal = np.zeros(frames)
    for start in range(20, frames - 8, 40):
        signal[start : start + 6] = [0.5, 1.0, 1.0, 1.0, 1.0, 0.5]
    return signal


def test_noise_is_cut_while_a_blink_keeps_most_of_its_depth() -> None:
    rng = np.random.default_rng(0)
    frames = 200
    truth = np.stack([_blinks(frames), 0.3 * np.sin(np.linspace(0, 4 * np.pi, frames))], axis=1)
    noisy = truth + rng.normal(0, 0.03, truth.shape)
    smoothed = smooth_sequence(_sequence(noisy), SmoothingConfig(), FPS)["exp"].astype(np.float64)

    def jitter(x: np.ndarray) -> float:
        return float(np.median(np.abs(np.diff(x, n=2, axis=0))))

    assert jitter(smoothed) < 0.2 * jitter(noisy)
    assert np.abs(smoothed[:, 1] - truth[:, 1]).mean() < 0.5 * np.abs(noisy[:, 1] - truth[:, 1]).mean()
    blink = truth[:, 0] > 0.9
    assert smoothed[blink, 0].mean() > 0.75, "a 6-frame blink keeps most of its depth"
    assert np.corrcoef(smoothed[:, 0], truth[:, 0])[0, 1] > 0.97
    np.testing.assert_allclose(noise_level(noisy - truth), 0.03, rtol=0.25)


def test_linear_smoothing_of_corrections_keeps_a_ramp_and_flattens_window_kinks_by_its_strength() -> None:
    """Refinement's corrections are piecewise linear (one slope per window): they have no noise for the robust
    smoother to measure, so it would leave them as they are; the linear smoother flattens their kinks, more the
    stronger it is, and keeps a straight ramp (no acceleration to penalise)."""
    frames = np.arange(40, dtype=np.float64)
    ramp = 0.01 * frames
    kinks = np.interp(frames, [0, 8, 16, 24, 32, 39], [0.0, 0.3, -0.2, 0.25, 0.0, 0.1])
    values = np.stack([ramp, kinks, kinks], axis=1)
    robust = smooth_sequence({"exp": values, "valid": np.ones(40, bool)}, SmoothingConfig(strength=1000.0), 25.0)["exp"]
    assert noise_level(values)[1] < 1e-12 and np.abs(robust - values).max() < 1e-3

    smoothed = smooth_linear(values, np.array([1e4, 10.0, 1e4]))
    assert np.allclose(smoothed[:, 0], ramp)
    acceleration = [float(np.abs(np.diff(smoothed[:, k], n=2)).max()) for k in (1, 2)]
    assert acceleration[1] < acceleration[0] < float(np.abs(np.diff(kinks, n=2)).max())
    assert np.array_equal(smooth_linear(values, np.zeros(3)), values)


def test_per_sequence_arrays_and_invalid_frames_are_untouched_and_runs_are_not_bridged() -> None:
    rng = np.random.default_rng(1)
    frames = 60
    values = rng.normal(0, 0.05, (frames, 2)) + np.where(np.arange(frames) < 30, 0.0, 2.0)[:, None]
    valid = np.ones(frames, bool)
    valid[29:31] = False
    values[29:31] = 7.0  # what an invalid frame holds must stay as it is
    sequence = _sequence(values, valid)
    smoothed = smooth_sequence(sequence, SmoothingConfig(), FPS)
    assert valid_runs(valid) == [slice(0, 29), slice(31, 60)]
    np.testing.assert_array_equal(smoothed["exp"][29:31], sequence["exp"][29:31])
    np.testing.assert_array_equal(smoothed["shape"], sequence["shape"])
    assert smoothed["exp"].dtype == np.float32 and smoothed["exp"].shape == (frames, 2)
    # Each side keeps its own level: the jump across the lost frames is not smoothed into a ramp.
    assert abs(float(smoothed["exp"][:29].mean())) < 0.05 and abs(float(smoothed["exp"][31:].mean()) - 2.0) < 0.05
    assert not np.array_equal(smoothed["exp"][:29], sequence["exp"][:29])


def test_camera_angles_across_pi_are_smoothed_without_a_turn() -> None:
    rng = np.random.default_rng(2)
    frames = 50
    angle = np.pi - 0.05 + 0.1 * np.linspace(0, 1, frames) + rng.normal(0, 0.005, frames)
    sequence = _sequence(np.zeros((frames, 1)))
    sequence["cam"][:, 2] = (angle + np.pi) % (2 * np.pi) - np.pi  # wraps from +pi to -pi mid-way
    smoothed = smooth_sequence(sequence, SmoothingConfig(), FPS)["cam"][:, 2].astype(np.float64)
    difference = np.angle(np.exp(1j * (smoothed - angle)))
    assert np.abs(difference).max() < 0.02 and np.all(np.abs(smoothed) <= np.pi + 1e-6)


def test_the_head_pose_is_smoothed_harder_than_the_face_and_rotation_as_hard_as_translation() -> None:
    rng = np.random.default_rng(3)
    frames = 150
    slow = 0.2 * np.sin(np.linspace(0, 2 * np.pi, frames))  # a 6 s sway
    noisy = slow[:, None] + rng.normal(0, 0.01, (frames, 6))
    sequence = _sequence(noisy[:, :1])
    sequence["cam"] = noisy.astype(np.float32)
    smoothed = smooth_sequence(sequence, SmoothingConfig(), FPS)

    def jitter(x: np.ndarray) -> np.ndarray:
        return np.median(np.abs(np.diff(x.astype(np.float64), n=2, axis=0)), axis=0)

    face, pose = jitter(smoothed["exp"])[0], jitter(smoothed["cam"])
    assert np.all(pose < 0.6 * face), "the same signal is steadier as a head pose than as an expression"
    # One pose strength for all six columns: the same input comes out the same, angle or translation.
    alike = smooth_sequence({**sequence, "cam": np.repeat(sequence["cam"][:, 3:4], 6, axis=1)}, SmoothingConfig(), FPS)["cam"]
    np.testing.assert_allclose(alike[:, :3], alike[:, 3:], atol=1e-6)
    np.testing.assert_allclose(np.abs(smoothed["cam"] - slow[:, None]).mean(), 0.003, atol=0.002)
    same = smooth_sequence(sequence, SmoothingConfig(pose_strength=SmoothingConfig().strength), FPS)
    np.testing.assert_allclose(jitter(same["cam"])[0], face, rtol=0.3)


@pytest.mark.parametrize("hertz", [0.2, 3.0])
def test_smoothing_weakens_where_it_would_move_the_fit_away_from_the_detector(hertz: float) -> None:
    """A slow sway is smoothed as asked; a fast head shake (3 Hz, which the asked strengths would flatten) is
    smoothed only as far as the distance to the detector allows."""
    rng = np.random.default_rng(5)
    frames = 100
    truth = 0.5 * np.sin(2 * np.pi * hertz * np.arange(frames) / FPS)
    detector = truth + rng.normal(0, 0.01, frames)
    sequence = _sequence(np.zeros((frames, 1)))
    sequence["cam"][:, 0] = truth + rng.normal(0, 0.01, frames)  # the per-frame fits

    def fit_error(stacked: dict[str, np.ndarray]) -> float:
        return float(np.abs(stacked["cam"][:, 0] - detector).mean())

    # A head pose asked to be smoothed less than the face is never smoothed more than asked.
    _, gentle = smooth_within_fit(sequence, SmoothingConfig(pose_strength=1.0), FPS, fit_error)
    assert gentle.pose_strength <= 1.0 and gentle.strength <= SmoothingConfig().strength
    config = SmoothingConfig()
    smoothed, used = smooth_within_fit(sequence, config, FPS, fit_error)
    assert fit_error(smoothed) <= (1 + config.max_error_rise) * fit_error(sequence)
    from_truth = np.abs(smoothed["cam"][:, 0] - truth).mean() / np.abs(sequence["cam"][:, 0] - truth).mean()
    if hertz < 1:
        assert used == config and from_truth < 0.6
        np.testing.assert_array_equal(smoothed["cam"], smooth_sequence(sequence, config, FPS)["cam"])
    else:
        assert fit_error(smooth_sequence(sequence, config, FPS)) > 10 * fit_error(sequence), "the asked strengths flatten it"
        assert used.pose_strength == used.strength < config.strength and from_truth < 1.2


@pytest.mark.parametrize("clip", ["bbaf2n.mpg", "id2_vcd_swwp2s.mpg", "lbax4n.mpg"])
def test_a_real_speech_clip_is_half_as_jittery_as_the_detector_and_still_follows_the_eyes_and_mouth(
    clip: str, shared_clips: Path, landmarker_task: Path
) -> None:
    from engine.demo_head import build_demo_head
    from engine.evaluation import clip_smoothing_accuracy
    from engine.tracker import TrackerConfig
    from offline.track_job import detect_landmarks

    sequence, _ = detect_landmarks(str(shared_clips / clip), landmarker_task)
    report = clip_smoothing_accuracy(build_demo_head(landmarker_task), sequence, TrackerConfig(), SmoothingConfig())
    # The targets; the GRID speech clips are the hardest (0.39-0.50, see the README for every clip).
    assert report["jitter_smoothed_over_detector"] <= 0.5 < report["jitter_raw_over_detector"]
    assert report["error_smoothed_pct_iod"] - report["error_raw_pct_iod"] <= 0.2
    assert report["eyes_opening_correlation_smoothed"] >= 0.97
    assert report["mouth_opening_correlation_smoothed"] >= 0.97


def _reweighted_by_lapack(y: np.ndarray, strength: float, threshold: float, order: int, iterations: int) -> np.ndarray:
    """The robust smoother of one column written out plainly: each iteration one LAPACK banded solve of the normal
    equations (I + strength D^T W D) x = y, then Cauchy weights on the order-th differences of x."""
    from scipy.linalg import solveh_banded

    frames = len(y)
    difference = np.diff(np.eye(frames), n=order, axis=0)  # (T - order, T)
    weights = np.ones(frames - order)
    for _ in range(iterations):
        normal = np.eye(frames) + strength * difference.T @ (weights[:, None] * difference)
        banded = np.stack([np.concatenate([np.zeros(order - k), np.diagonal(normal, order - k)]) for k in range(order + 1)])
        x = solveh_banded(banded, y, lower=False)
        weights = 1.0 / (1.0 + (np.diff(x, n=order) / threshold) ** 2)
    return x


@pytest.mark.parametrize("order", [1, 2, 3])
def test_every_column_is_smoothed_as_one_lapack_solve_per_iteration_would(order: int) -> None:
    """The compiled smoother (all columns at once) against the textbook iteration, column by column, to 1e-9:
    columns of other strengths and noise levels, blinks among them, a column without noise left as it is."""
    rng = np.random.default_rng(order)
    frames = 300
    time = np.arange(frames) / FPS
    values = np.stack([
        np.sin(2 * np.pi * 0.7 * time) + rng.normal(0.0, 0.05, frames),
        _blinks(frames) + rng.normal(0.0, 0.02, frames),
        0.3 * time + rng.normal(0.0, 0.2, frames),
        np.full(frames, 0.25),
    ], axis=1)  # fmt: skip
    strengths = np.array([3.0, 40.0, 500.0, 3.0])
    config = SmoothingConfig(order=order)
    smoothed = smooth_track(values, strengths, config)
    sigma = noise_level(values)
    for column in range(3):
        # Cauchy's scale: ``robust`` times the noise of the order-th difference, sqrt(C(2 order, order)) sigma.
        threshold = config.robust * math.sqrt(math.comb(2 * order, order)) * sigma[column]
        expected = _reweighted_by_lapack(values[:, column], strengths[column], threshold, order, config.iterations)
        np.testing.assert_allclose(smoothed[:, column], expected, rtol=0, atol=1e-9, err_msg=f"column {column}")
    assert not np.allclose(smoothed[:, 1], values[:, 1], atol=1e-3), "the noisy blinks were smoothed"
    np.testing.assert_array_equal(smoothed[:, 3], values[:, 3])

"""The field of view: estimated when the frames determine it, the documented webcam default when they do not
(a still, frontal face), and said so in the log and in meta.json."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from engine.assets import load_flame
from engine.synthetic import SyntheticMotion, synthetic_sequence
from engine.tracker import Tracker, TrackerConfig
from offline.track_job import LandmarkSequence, TrackOptions, calibrate_on_sequence, track_input

STILL = SyntheticMotion(frames=40, max_yaw_deg=0.5, max_pitch_deg=0.5, seed=3)


def _calibrated(head, motion: SyntheticMotion, config: TrackerConfig) -> Tracker:
    tracker = Tracker(head, motion.image_size, config)
    truth = synthetic_sequence(tracker.rig.layer, motion)
    calibrate_on_sequence(tracker, LandmarkSequence(truth.mp478, truth.lmk68, motion.image_size, truth.fps, "synthetic"), {}, False)
    return tracker


@pytest.fixture(scope="module")
def flame(flame_dir: Path):
    return load_flame(flame_dir, n_shape=20, n_exp=10)


@pytest.mark.parametrize("n_shape", [20, 100])
@pytest.mark.parametrize("distance", [0.6, 1.5])
def test_a_still_frontal_face_gives_no_wild_fov(flame_dir: Path, n_shape: int, distance: float) -> None:
    config = TrackerConfig(n_shape=n_shape, n_exp=10)
    motion = SyntheticMotion(frames=40, max_yaw_deg=0.5, max_pitch_deg=0.5, distance=distance, seed=3)
    report = _calibrated(load_flame(flame_dir, n_shape=n_shape, n_exp=10), motion, config).fov_report()
    assert 25 <= report["deg"] <= 55, report  # truth 30, webcam default 50
    if report["source"] == "estimated":
        assert report["log_focal_std"] <= config.fov_max_log_std
    else:
        assert report["source"] == "default" and report["deg"] == pytest.approx(config.fit.priors.fov_deg)


def test_an_undetermined_fov_falls_back_to_the_webcam_default_and_says_so(flame, caplog: pytest.LogCaptureFixture) -> None:
    config = TrackerConfig(n_shape=20, n_exp=10, fov_max_log_std=1e-6)  # no sequence determines it this well
    with caplog.at_level(logging.WARNING, logger="engine.tracker"):
        tracker = _calibrated(flame, STILL, config)
    report = tracker.fov_report()
    assert report["source"] == "default" and report["deg"] == pytest.approx(config.fit.priors.fov_deg)
    assert report["log_focal_std"] > config.fov_max_log_std
    assert "do not determine the field of view" in caplog.text and "--fov" in caplog.text


def test_a_turning_head_determines_the_fov(flame) -> None:
    tracker = _calibrated(flame, SyntheticMotion(frames=40, seed=3), TrackerConfig(n_shape=20, n_exp=10))
    report = tracker.fov_report()
    assert report["source"] == "estimated" and report["log_focal_std"] <= 0.05
    assert 25 < report["deg"] < 35  # truth 30


def test_a_given_fov_is_kept_and_meta_json_says_where_it_comes_from(flame, tmp_path: Path) -> None:
    layer = Tracker(flame, STILL.image_size, TrackerConfig(n_shape=20, n_exp=10)).rig.layer
    truth = synthetic_sequence(layer, STILL)
    landmarks = tmp_path / "still.npz"
    np.savez(landmarks, mp478=truth.mp478, lmk68=truth.lmk68, image_size=np.array(STILL.image_size), fps=25.0)
    cases = ((TrackerConfig(n_shape=20, n_exp=10, fov_max_log_std=1e-6), "default", 50.0), (TrackerConfig(n_shape=20, n_exp=10, fov_deg=35.0, fit_fov=False), "given", 35.0))
    for config, source, fov in cases:
        out = tmp_path / f"out_{source}"
        track_input(landmarks, out, flame, None, TrackOptions(config, progress=False))
        meta = json.loads((out / "meta.json").read_text())
        assert meta["fov"]["source"] == source and meta["fov_deg"] == pytest.approx(fov, abs=1e-3)

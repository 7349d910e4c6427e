"""Photometric refinement on synthetic renderings with known albedo, light, expression and pose."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from engine.assets import load_flame
from engine.errors import UserError
from engine.frames import FrameState, state_from_frames
from engine.head_model import TextureSpace
from engine.photometric import (
    UNIT_AMBIENT, FrameBatch, PhotometricConfig, PhotometricFitter, PhotometricWeights
)
from engine.synthetic import SyntheticMotion, synthetic_sequence
from engine.tracker import Tracker, TrackerConfig
from realtime.handoff import DropOldestQueue
from realtime.keyframes import Keyframe
from offline.refine_job import RefineOptions, SequenceRefiner, refine_session
from realtime.refiner import LiveRefiner, RefinerConfig

SIZE, FRAMES = 128, 4


@pytest.fixture(scope="module")
def scene(flame_dir: Path) -> dict:
    """Frames rendered from the fixture head with a detailed known albedo (texture space), SH light and motion."""
    head = load_flame(flame_dir, n_shape=20, n_exp=10, n_tex=5)
    rng = np.random.default_rng(0)
    side = 128
    detail = cv2.GaussianBlur(rng.normal(0, 1, (side, side, 3)).astype(np.float32), (0, 0), 1.5)
    detail /= detail.std()
    mean = np.clip(cv2.resize(head.texture.mean, (side, side)) + 0.12 * detail.mean(-1, keepdims=True) + 0.03 * detail, 0, 1)
    basis = 3.0 * np.stack([cv2.resize(head.texture.basis[..., k], (side, side)) for k in range(5)], -1)
    head = dataclasses.replace(head, texture=TextureSpace(mean.astype(np.float32), basis.astype(np.float32), "test albedo"))
    config = TrackerConfig(n_shape=20, n_exp=10, fov_deg=30.0, fit_fov=False, calibration_seconds=math.inf)
    tracker = Tracker(head, (SIZE, SIZE), config)
    motion = SyntheticMotion(frames=FRAMES, image_size=(SIZE, SIZE), noise_px=1.0, outlier_fraction=0.0, seed=3, max_yaw_deg=25)
    sequence = synthetic_sequence(tracker.rig.layer, motion)
    tex = rng.normal(0, 1, 5)
    light = torch.zeros(9, 3)
    light[0], light[1], light[2], light[3], light[7] = 0.9 * UNIT_AMBIENT, 0.3, 0.4, 0.5, 0.1
    renderer = PhotometricFitter(tracker.rig, PhotometricConfig(size=SIZE))
    renderer.appearance.load_state(tex)
    truth = FrameState(*(torch.tensor(a, dtype=torch.float32) for a in (sequence.exp, sequence.pose, sequence.transl)))
    K = torch.tensor(tracker.rig.camera.intrinsics(), dtype=torch.float32).expand(FRAMES, 3, 3)
    everywhere = torch.ones(FRAMES, SIZE, SIZE, dtype=torch.bool)
    with torch.no_grad():
        out = renderer.render(truth, FrameBatch(torch.zeros(FRAMES, SIZE, SIZE, 3), K, torch.zeros(1), everywhere),
                              torch.tensor(sequence.shape, dtype=torch.float32), light)
    background = 0.2 * (~out.mask).unsqueeze(-1)
    images = [((out.image[i] + background[i]).clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8) for i in range(FRAMES)]
    return {"head": head, "config": config, "sequence": sequence, "images": images, "tex": tex, "light": light}


def _landmark_fit(scene: dict) -> tuple[Tracker, FrameState]:
    sequence = scene["sequence"]
    tracker = Tracker(scene["head"], (SIZE, SIZE), scene["config"])
    result = tracker.calibrate([(sequence.mp478[i], sequence.lmk68[i]) for i in range(FRAMES)])
    frames = [tracker.frame_from(result.frames.params.index(slice(i, i + 1))) for i in range(FRAMES)]
    return tracker, state_from_frames(frames, torch.float32)


def _rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def test_photometric_fit_recovers_expression_better_than_landmarks(scene: dict) -> None:
    sequence = scene["sequence"]
    tracker, initial = _landmark_fit(scene)
    landmark_exp_error = _rms(initial.exp.numpy(), sequence.exp)

    fitter = PhotometricFitter(tracker.rig, PhotometricConfig(size=SIZE))
    batch = fitter.prepare(scene["images"], list(sequence.mp478), list(sequence.lmk68))
    before = fitter.image_error(initial, batch)
    result = fitter.fit_identity(batch, initial, iterations=30)

    photometric_exp_error = _rms(result.frames.exp.numpy(), sequence.exp)
    # Albedo and light share a global scale, so the light is compared by its direction: band 1 over ambient.
    def direction(light: torch.Tensor) -> torch.Tensor:
        return light[1:4] / light[:1]

    light_error = float((direction(fitter.light) - direction(scene["light"])).abs().mean())
    initial_light_error = float(direction(scene["light"]).abs().mean())  # the fit starts from ambient light
    logging.getLogger(__name__).info(
        "expression rms: landmarks %.3f, photometric %.3f; image error %.3f -> %.3f; light error %.3f -> %.3f",
        landmark_exp_error, photometric_exp_error, before.mean(), result.image_error.mean(),
        initial_light_error, light_error,
    )
    # Anchored to the landmarks (they stay in the objective), photometry still removes a fifth of their error.
    assert photometric_exp_error < 0.85 * landmark_exp_error
    assert result.image_error.mean() < 0.6 * before.mean()
    assert result.image_error.mean() < 0.06
    assert light_error < initial_light_error
    assert np.all(result.landmark_rms_px < 3.0)


def test_missing_texture_space_falls_back_to_estimated_albedo(flame_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    head = load_flame(flame_dir, n_shape=10, n_exp=10, n_tex=0)
    tracker = Tracker(head, (SIZE, SIZE), TrackerConfig(n_shape=10, n_exp=10, fov_deg=30.0, fit_fov=False))
    with caplog.at_level(logging.WARNING):
        fitter = PhotometricFitter(tracker.rig, PhotometricConfig(size=SIZE, albedo_map_size=16))
    assert fitter.appearance.kind == "uv_map"
    assert "no texture space" in caplog.text
    without_uv = PhotometricFitter(Tracker(dataclasses.replace(head, uv_coords=None, uv_faces=None), (SIZE, SIZE), tracker.config).rig)
    assert without_uv.appearance.kind == "vertex" and without_uv.appearance.albedo().shape == (head.n_vertices, 3)


def test_sequence_refinement_writes_every_frame_and_resumes(scene: dict, tmp_path: Path) -> None:
    sequence = scene["sequence"]
    tracker, initial = _landmark_fit(scene)
    states = [initial.index(slice(i, i + 1)) for i in range(FRAMES)]
    states[2] = None  # a frame without a face is written, marked invalid

    def frames():
        for i in range(FRAMES):
            yield scene["images"][i], sequence.mp478[i]

    options = RefineOptions(PhotometricConfig(size=96, identity_iterations=5, frame_iterations=3), keyframes=2, window=2)
    timings = SequenceRefiner(tracker, tmp_path, options).run(states, frames, progress=False)
    assert timings["seconds_per_frame"] > 0
    written = {path.name: path.stat().st_mtime_ns for path in tmp_path.glob("0*.npz")}
    assert sorted(written) == [f"{i:06d}.npz" for i in range(FRAMES)]
    with np.load(tmp_path / "000001.npz") as frame:
        assert frame["valid"][0] and frame["tex"].shape == (1, 5) and frame["light"].shape == (1, 9, 3)
        assert frame["exp"].shape == (1, 10) and np.isfinite(frame["image_error"]).all()
    with np.load(tmp_path / "000002.npz") as frame:
        assert not frame["valid"][0]
    assert (tmp_path / "texture.png").is_file() and (tmp_path / "meta.json").is_file()

    with np.load(tmp_path / "unsmoothed.npz") as saved:  # the refined frames, before the smoothing pass
        refined = {key: saved[key] for key in saved.files}
    assert refined["exp"].shape == (FRAMES, 10) and not refined["valid"][2]

    (tmp_path / "000003.npz").unlink()
    SequenceRefiner(tracker, tmp_path, options).run(states, frames, progress=False)
    assert (tmp_path / "000003.npz").is_file()
    with np.load(tmp_path / "unsmoothed.npz") as saved:
        assert np.array_equal(saved["exp"][:3], refined["exp"][:3]), "frames 0-2 were refined again"
        assert np.isfinite(saved["exp"][3]).all()
    # Without smoothing nothing but the missing frame is written again.
    options = dataclasses.replace(options, smoothing=None)
    written = {path.name: path.stat().st_mtime_ns for path in tmp_path.glob("0*.npz")}
    (tmp_path / "000003.npz").unlink()
    SequenceRefiner(tracker, tmp_path, options).run(states, frames, progress=False)
    assert (tmp_path / "000003.npz").is_file()
    for name in ("000000.npz", "000001.npz"):
        assert (tmp_path / name).stat().st_mtime_ns == written[name], f"{name} was refined again"


def test_a_single_frame_is_refined_and_smoothed_as_a_sequence_of_one(scene: dict, tmp_path: Path) -> None:
    """``track IMAGE --photometric``: the smoothing pass and its guards take a sequence of one frame."""
    tracker, initial = _landmark_fit(scene)
    options = RefineOptions(PhotometricConfig(size=64, identity_iterations=2, frame_iterations=2), keyframes=1)
    SequenceRefiner(tracker, tmp_path, options).run(
        [initial.index(slice(0, 1))], lambda: iter([(scene["images"][0], scene["sequence"].mp478[0])]), progress=False)
    with np.load(tmp_path / "000000.npz") as frame:
        assert frame["valid"][0] and np.isfinite(frame["exp"]).all()
    assert json.loads((tmp_path / "meta.json").read_text())["correction_smoothing"]["kept_landmark_fit"] is False


def test_live_refiner_publishes_identity_from_keyframes(scene: dict) -> None:
    sequence = scene["sequence"]
    tracker, _ = _landmark_fit(scene)
    queue: DropOldestQueue[Keyframe] = DropOldestQueue(4)
    updates: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    arrived = threading.Event()

    def on_update(shape: np.ndarray, tex: np.ndarray, light: np.ndarray) -> None:
        updates.append((shape, tex, light))
        arrived.set()

    config = RefinerConfig(pool_size=2, iterations=5, photometric=PhotometricConfig(size=96), tracker=scene["config"])
    with LiveRefiner(scene["head"], queue, lambda: tracker.rig.shape, on_update, config) as refiner:
        for i in range(2):
            tracked = tracker.track(sequence.mp478[i], sequence.lmk68[i], timestamp=i / 25)
            queue.offer(Keyframe(scene["images"][i], sequence.mp478[i], tracked, float(i), i))
        assert arrived.wait(60), "the refiner published nothing"
        queue.close()
    assert refiner.updates >= 1
    shape, tex, light = updates[-1]
    assert shape.shape == (20,) and tex.shape == (5,) and light.shape == (27,)
    assert np.isfinite(shape).all() and np.isfinite(light).all()
    before = tracker.shape_version
    tracker.adopt_identity(torch.as_tensor(shape))
    assert tracker.shape_version == before + 1 and torch.allclose(tracker.rig.shape, torch.as_tensor(shape, dtype=tracker.rig.shape.dtype))


def test_live_refiner_does_not_hand_over_an_identity_that_fits_the_landmarks_worse(scene: dict) -> None:
    """Without its landmark anchor, on frames of noise, the photometric shape drifts: the guard keeps it back."""
    sequence = scene["sequence"]
    tracker, _ = _landmark_fit(scene)
    queue: DropOldestQueue[Keyframe] = DropOldestQueue(4)
    updates: list[np.ndarray] = []
    weights = PhotometricWeights(landmarks=0.0, shape=0.0)
    photometric = PhotometricConfig(size=64, identity_iterations=2, shape_iterations=10, weights=weights)
    config = RefinerConfig(pool_size=2, iterations=2, photometric=photometric, tracker=scene["config"])
    noise = np.random.default_rng(1).integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    with LiveRefiner(scene["head"], queue, lambda: tracker.rig.shape, lambda shape, tex, light: updates.append(shape), config) as refiner:
        for i in range(2):
            tracked = tracker.track(sequence.mp478[i], sequence.lmk68[i], timestamp=i / 25)
            queue.offer(Keyframe(noise[i], sequence.mp478[i], tracked, float(i), i))
        queue.close()
        refiner.stop(60)
    assert refiner.rejected >= 1 and not updates


def test_refine_session_rejects_missing_or_corrupt_sessions(scene: dict, tmp_path: Path) -> None:
    def factory(size, n_shape, n_exp, fov):
        return Tracker(scene["head"], size, scene["config"])

    with pytest.raises(UserError, match="does not exist"):
        refine_session(tmp_path / "nowhere", factory, tmp_path / "out", None)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "session.json").write_text("{ not json")
    with pytest.raises(UserError, match="damaged"):
        refine_session(corrupt, factory, tmp_path / "out", None)


def test_refine_command_refines_a_real_live_recording_without_losing_the_landmark_fit(
    shared_clips: Path, landmarker_task: Path, tmp_path: Path
) -> None:
    """live --record, then refine, as a user runs them, scored against MediaPipe beside track of the same landmarks.

    The recording spans the live calibration (2 s into the 3 s clip): its first frames were fitted with the mean
    face, which once made the first windows of refinement diverge (landmark error 39 % of the inter-ocular
    distance, mouth opening uncorrelated). Refinement must stay within its margin of track's landmark error,
    and no frame may explode.
    """
    import json
    import subprocess
    import sys

    from engine.demo_head import build_demo_head
    from offline.refine_accuracy import load_frames, score_frames
    from flame_client.messages import TOPIC_FRAME
    from realtime.session import SessionReader

    repo = Path(__file__).resolve().parents[1]
    models = ["--flame", "demo", "--models", str(landmarker_task.parent)]

    def run(command: str, *arguments: str, timeout: float) -> subprocess.CompletedProcess:
        # Every step says why it failed: the one failure seen (under load, in the full suite) left no cause.
        result = subprocess.run([sys.executable, str(repo / "run_stream.py"), command, *arguments, *models],
                                capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"{command} exited with {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        return result

    session = tmp_path / "session"
    run("live", "--source", str(shared_clips / "bbaf2n.mpg"), "--as-fast-as-possible", "--no-zmq", "--landmarks",
        "--record", str(session), timeout=600)
    run("refine", str(session), "--size", "64", "--iterations", "2", timeout=900)
    out = session / "refined"
    refined = load_frames(out)
    meta = json.loads((out / "meta.json").read_text())
    assert len(refined) == meta["frames"] >= 70 and meta["fps"] == pytest.approx(25.0), "bbaf2n.mpg is 25 fps"
    # `render` finds the refined frames' video through meta.json, wherever the refinement was written.
    assert meta["source"] == str((session / "video.mkv").resolve())
    assert all(bool(frame["valid"][0]) and np.isfinite(frame["exp"]).all() for frame in refined)
    assert refined[-1]["light"].shape == (1, 9, 3) and refined[-1]["tex"].shape[0] == 1
    assert cv2.imread(str(out / "texture.png")).shape == (256, 256, 3)
    # The README's last step: the refined folder and the raw session as animated glTF rigs (the rig itself is
    # checked in test_gltf_export.py).
    for params, texture in ((out, True), (session, False)):
        result = run("export", "--gltf", str(tmp_path / "head.glb"), "--params", str(params), timeout=600)
        assert f"{len(refined)} frames" in result.stdout and ("texture.png" in result.stdout) == texture, result.stdout

    reader = SessionReader(session)
    recorded = {r.video_frame: r.message["landmarks"] for r in reader.messages() if r.topic == TOPIC_FRAME}
    mp478 = np.array([recorded[i] for i in range(len(refined))], dtype=np.float64).reshape(len(refined), 478, 2)
    width, height = reader.frame_size
    np.savez(tmp_path / "landmarks.npz", mp478=mp478, image_size=(height, width), fps=25.0)
    fov = float(refined[0]["fov"][0])  # the recorded camera's, which refinement keeps
    run("track", str(tmp_path / "landmarks.npz"), "--out", str(tmp_path / "track"), "--fov", str(fov), timeout=600)
    head = build_demo_head(landmarker_task)
    tracked = score_frames(head, load_frames(tmp_path / "track"), mp478, (height, width))
    scores = score_frames(head, refined, mp478, (height, width))
    margin_percent = 100 * RefineOptions().landmark_margin
    assert scores["landmark_error_iod_percent"] <= tracked["landmark_error_iod_percent"] + margin_percent + 0.02
    assert scores["landmark_error_iod_percent_worst_frame"] <= tracked["landmark_error_iod_percent_worst_frame"] + 0.5
    assert scores["mouth_correlation"] >= 0.97


def test_smoothed_refine_keeps_track_s_landmark_fit_and_lowers_the_image_error_on_a_real_clip(
    shared_clips: Path, landmarker_task: Path
) -> None:
    """``bench --accuracy --refine`` on the first frames of a real clip, both results smoothed over the whole
    sequence: refine stays within its margin of track's landmark error, moves its landmarks no more than track
    where the face is still (before the corrections were smoothed under that guard: 5.6 % more), keeps the
    mouth curve, and fits the image better."""
    from engine.demo_head import build_demo_head
    from offline.refine_accuracy import compare_refine_with_track

    options = RefineOptions(PhotometricConfig(size=64, frame_iterations=2))
    report = compare_refine_with_track(build_demo_head(landmarker_task), str(shared_clips / "bbaf2n.mpg"), landmarker_task,
                                       frames=40, options=options, progress=False)
    track, refine = report["track"], report["refine"]
    assert report["smoothing"] == options.smoothing.describe()
    assert refine["landmark_error_iod_percent"] <= track["landmark_error_iod_percent"] + 100 * options.landmark_margin
    assert refine["jitter_px"] <= track["jitter_px"], (refine["jitter_px"], track["jitter_px"])
    assert refine["mouth_correlation"] >= min(0.97, track["mouth_correlation"])
    assert refine["image_error_in_face_mask"] < track["image_error_in_face_mask"]
    print({name: {region: round(error, 5) for region, error in report[name]["image_error_by_region"].items()} for name in ("track", "refine")})
    for region in ("mouth", "eyes"):  # where photometry corrects the landmark fit (cheeks barely change)
        assert refine["image_error_by_region"][region] < track["image_error_by_region"][region], region
    assert all(0 < error < 0.2 for error in track["image_error_by_region"].values())
    mouth_gains = report["largest_image_gain_frames"]["mouth"]
    assert len(mouth_gains) == 3 and all(0 <= frame < 40 for frame, _ in mouth_gains)
    assert mouth_gains[0][1] >= mouth_gains[-1][1] > 0
    # Against MediaPipe run on each frame alone (no video-mode lag), which neither fit saw, refine is closer.
    key = "landmark_error_vs_single_image_detection_iod_percent"
    assert refine[key] < track[key], (refine[key], track[key])

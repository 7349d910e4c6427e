"""The NumPy per-frame solver gives the batched PyTorch solver's fits, frame for frame."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.assets import load_flame
from engine.demo_head import build_demo_head
from engine.frame_solver import CpuFrameFitter, faster_frame_solver
from engine.synthetic import SyntheticMotion, synthetic_sequence
from engine.tracker import Tracker, TrackerConfig


def _trackers(head, config: TrackerConfig) -> tuple[Tracker, Tracker, object]:
    """A NumPy-solver and a PyTorch-solver tracker with one identity, and the sequence they track."""
    survey = Tracker(head, (512, 512), config)
    sequence = synthetic_sequence(survey.rig.layer, SyntheticMotion(frames=60, max_yaw_deg=35.0))
    survey.calibrate([(None if sequence.mp478 is None else sequence.mp478[i], None if sequence.lmk68 is None else sequence.lmk68[i]) for i in range(0, 60, 8)])
    trackers = []
    for solver in ("numpy", "torch"):
        tracker = Tracker(head, (512, 512), replace(config, frame_solver=solver))
        tracker.adopt_calibration(survey.rig.shape, survey.rig.camera.focal)
        trackers.append(tracker)
    return trackers[0], trackers[1], sequence


@pytest.mark.parametrize("model_name", ["flame", "demo"])
def test_numpy_solver_tracks_a_sequence_exactly_as_the_torch_solver(model_name: str, request: pytest.FixtureRequest) -> None:
    if model_name == "flame":
        head = load_flame(request.getfixturevalue("flame_dir"), n_shape=100, n_exp=50)
    else:
        head = build_demo_head(request.getfixturevalue("landmarker_task"))
    config = TrackerConfig(dtype=torch.float64, calibration_seconds=float("inf"))
    fast, reference, sequence = _trackers(head, config)
    assert isinstance(fast.fitter, CpuFrameFitter) and not isinstance(reference.fitter, CpuFrameFitter)
    for index in range(60):
        observed = [None if a is None else a[index] for a in (sequence.mp478, sequence.lmk68)]
        if index in (20, 21):  # a lost face: the next frame starts cold in both
            observed = [None, None]
        got = fast.track(*observed, timestamp=index / sequence.fps)
        want = reference.track(*observed, timestamp=index / sequence.fps)
        assert (got.valid, got.iterations) == (want.valid, want.iterations), f"frame {index}"
        for name in ("exp", "pose", "transl", "head_rot", "head_trans"):
            np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=0, atol=1e-6, err_msg=f"frame {index} {name}")
        np.testing.assert_allclose(got.rms_px, want.rms_px, rtol=1e-6, atol=1e-9, equal_nan=True)


def test_warm_frames_on_the_numpy_solver_run_no_pytorch_operation(flame_dir: Path) -> None:
    """A warm frame on the CPU solver stays in NumPy and numba from landmarks to TrackedFrame: every PyTorch
    operation costs microseconds of dispatch, far more with the caches cold between live frames. The solver's
    FrameParams entry point (the batched solver's signature) gives the same fit as the tracker's arrays."""
    from torch.profiler import ProfilerActivity, profile

    head = load_flame(flame_dir, n_shape=50, n_exp=20)
    config = TrackerConfig(n_shape=50, n_exp=20, calibration_seconds=float("inf"))
    tracker = Tracker(head, (512, 512), config)
    sequence = synthetic_sequence(tracker.rig.layer, SyntheticMotion(frames=30, seed=4))
    tracker.calibrate([(sequence.mp478[i], sequence.lmk68[i]) for i in range(0, 30, 6)])
    for index in range(10):
        assert tracker.track(sequence.mp478[index], sequence.lmk68[index], timestamp=index / 25).valid
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        for index in range(10, 30):
            assert tracker.track(sequence.mp478[index], sequence.lmk68[index], timestamp=index / 25).valid
    assert [event.key for event in profiled.key_averages()] == []

    targets = tracker.rig.targets.frame(sequence.mp478[29], sequence.lmk68[29])
    start = tracker.cold_start(tracker.rig.targets.build_frame(sequence.mp478[29], sequence.lmk68[29]))
    center, focal = tracker.rig.camera.center, tracker.rig.focal
    from_arrays = tracker.fitter.fit_frame(start.arrays(), targets, float(focal), center)
    from_params = tracker.fitter.fit(start, tracker.rig.targets.build_frame(sequence.mp478[29], sequence.lmk68[29]), focal, center)
    assert from_params.iterations == from_arrays.iterations and from_params.params.exp.dtype == torch.float32
    for key in ("exp", "rotations", "transl"):
        np.testing.assert_array_equal(getattr(from_params.params, key)[0].numpy(), getattr(from_arrays.params, key))
    assert float(from_params.rms_px[0]) == from_arrays.rms_px and float(from_params.cost[0]) == from_arrays.cost


def test_numpy_solver_refuses_batches(flame_dir: Path) -> None:
    tracker = Tracker(load_flame(flame_dir, n_shape=20, n_exp=10), (256, 256))
    params = tracker.cold_start(tracker.rig.targets.build(np.full((2, 478, 2), 128.0), None))
    with pytest.raises(ValueError, match="one frame at a time"):
        tracker.fitter.fit(params, tracker.rig.targets.build(np.full((2, 478, 2), 128.0), None), tracker.rig.focal, tracker.rig.camera.center)


def test_background_calibration_adopts_the_identity_that_calibrating_in_line_finds(flame_dir: Path) -> None:
    head = load_flame(flame_dir, n_shape=50, n_exp=20)
    config = TrackerConfig(n_shape=50, n_exp=20, calibration_seconds=0.5)
    in_line = Tracker(head, (512, 512), config)
    background = Tracker(head, (512, 512), replace(config, calibrate_in_background=True))
    sequence = synthetic_sequence(in_line.rig.layer, SyntheticMotion(frames=20, seed=9))
    for index in range(14):  # calibrates after 0.5 s, at frame 13, from the same candidates in both
        in_line.track(sequence.mp478[index], sequence.lmk68[index], timestamp=index / 25)
        frame = background.track(sequence.mp478[index], sequence.lmk68[index], timestamp=index / 25)
    assert in_line.calibrated and in_line.shape_version == 1
    assert frame.valid and not frame.calibrated  # the frame that started the calibration did not wait for it
    index = 14
    while not background.calibrated:  # frames go on being tracked until the calibration thread is done
        assert background.track(sequence.mp478[index % 20], sequence.lmk68[index % 20], timestamp=index / 25).valid
        index += 1
        time.sleep(0.01)
    assert background.shape_version == 1
    # Bit for bit: on its own thread the calibration runs the same operations on the same frames.
    assert torch.equal(background.rig.shape, in_line.rig.shape)
    assert background.rig.camera == in_line.rig.camera


def test_a_process_that_closes_its_tracker_during_a_background_calibration_exits_cleanly(flame_dir: Path) -> None:
    """A daemon thread still running PyTorch when the interpreter exits aborts the process (SIGABRT, "terminate
    called without an active exception"): ``live --record`` of a 3 s clip did so under load, when the clip ended
    during the background calibration. ``close()`` (``live`` calls it on the way out) waits for the calibration."""
    import subprocess
    import sys

    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from engine.assets import load_flame
from engine.synthetic import SyntheticMotion, synthetic_sequence
from engine.tracker import Tracker, TrackerConfig
config = TrackerConfig(n_shape=50, n_exp=20, calibration_seconds=0.5, calibrate_in_background=True)
tracker = Tracker(load_flame({str(flame_dir)!r}, n_shape=50, n_exp=20), (512, 512), config)
sequence = synthetic_sequence(tracker.rig.layer, SyntheticMotion(frames=14, seed=9))
for index in range(14):
    tracker.track(sequence.mp478[index], sequence.lmk68[index], timestamp=index / 25)
assert not tracker.calibrated, "the calibration runs in the background"
tracker.close()
tracker.track(sequence.mp478[13], sequence.lmk68[13], timestamp=14 / 25)
print("calibrated" if tracker.calibrated else "not calibrated")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "calibrated", "close() returns once the calibration is done"


def test_a_prepared_identity_is_adopted_between_frames(flame_dir: Path) -> None:
    head = load_flame(flame_dir, n_shape=20, n_exp=10)
    tracker = Tracker(head, (512, 512), TrackerConfig(n_shape=20, n_exp=10))
    shape = torch.linspace(-1, 1, 20)
    identity = tracker.identity_for(shape)
    assert tracker.shape_version == 0 and not torch.equal(tracker.rig.shape, shape)  # preparing changes nothing
    tracker.adopt_prepared_identity(identity)
    assert tracker.shape_version == 1 and torch.equal(tracker.rig.shape, shape) and tracker.fitter is identity.fitter


def test_auto_solves_frames_in_numpy_on_the_cpu_and_the_measured_choice_is_logged(flame_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    head = load_flame(flame_dir, n_shape=20, n_exp=10)
    tracker = Tracker(head, (480, 640), TrackerConfig(n_shape=20, n_exp=10))
    assert tracker.frame_solver == "numpy" and isinstance(tracker.fitter, CpuFrameFitter)
    with caplog.at_level(logging.INFO, logger="engine.frame_solver"):
        choice = faster_frame_solver(tracker.rig.fixed_landmarks, tracker.config.fit, (480, 640), tracker.rig.camera.focal, repeats=2)
    assert choice in ("numpy", "torch")
    assert any(record.message.startswith("per-frame solve:") for record in caplog.records)


def test_frame_targets_hold_the_values_of_a_batch_of_ones_targets(flame_dir: Path) -> None:
    """The tracker's per-frame targets (arrays) and the batched solver's (tensors) agree to the bit, face size
    included (the fit's residual scale), with landmarks missing too."""
    tracker = Tracker(load_flame(flame_dir, n_shape=20, n_exp=10), (480, 640))
    rng = np.random.default_rng(3)
    for index in range(200):
        mp478 = (rng.random((478, 2)) * rng.uniform(20, 600) + rng.uniform(0, 200, 2)).astype(np.float64)
        if index % 3 == 0:
            mp478[rng.random(478) < 0.3] = np.nan
        if index % 2:  # MediaPipe's own dtype
            mp478 = mp478.astype(np.float32)
        arrays, tensors = tracker.rig.targets.frame(mp478, None), tracker.rig.targets.build_frame(mp478, None)
        np.testing.assert_array_equal(arrays.pixels, tensors.pixels[0].double().numpy())
        np.testing.assert_array_equal(arrays.observed, tensors.observed[0].numpy())
        assert arrays.face_size == float(tensors.face_size[0]), f"frame {index}"
        np.testing.assert_array_equal(arrays.weights, tensors.weights.double().numpy())

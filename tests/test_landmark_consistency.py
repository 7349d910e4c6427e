"""Landmark consistency (issue 13, item 3): where the MediaPipe embedding covers a feature, the tracker fits it
and not also the 68-point version of the same points; the 68 set keeps the jaw contour."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from mediapipe.tasks.python import vision

from engine.assets import load_flame
from engine.camera import project
from engine.flame import rodrigues
from engine.synthetic import SyntheticMotion, synthetic_sequence
from engine.targets import covered_68_points
from engine.tracker import Tracker, TrackerConfig
from offline.track_job import LandmarkSequence, calibrate_on_sequence

CONTOUR = np.arange(17)
NOSE_TIP = 30  # iBUG 31, 0-based
CONFIG = TrackerConfig(n_shape=20, n_exp=10, fov_deg=30.0, calibration_seconds=0.1, calibration_frames=4)
MOTION = SyntheticMotion(frames=8, max_yaw_deg=10.0, max_pitch_deg=5.0, seed=5)


@pytest.fixture(scope="module")
def flame(flame_dir: Path):
    return load_flame(flame_dir, n_shape=20, n_exp=10)


def test_metrical_trackers_embedding_covers_every_inner_feature(flame) -> None:
    covered = covered_68_points(flame.mediapipe.landmark_indices)
    assert not covered[CONTOUR].any() and covered[17:].all()
    # Without lips or brows in the embedding, their 68 points stay.
    lips = {index for c in vision.FaceLandmarksConnections.FACE_LANDMARKS_LIPS for index in (c.start, c.end)}
    no_lips = covered_68_points(np.array([i for i in flame.mediapipe.landmark_indices if i not in lips]))
    assert not no_lips[48:].any() and no_lips[17:48].all()


def test_with_both_embeddings_the_targets_are_the_contour_and_the_mediapipe_points(flame) -> None:
    tracker = Tracker(flame, MOTION.image_size, CONFIG)
    truth = synthetic_sequence(tracker.layer, MOTION)
    targets = tracker.targets(truth.mp478[:1], truth.lmk68[:1])
    observed = targets.observed[0].numpy()
    slices = tracker.full.slices
    assert observed[slices["lmk68"]].nonzero()[0].tolist() == CONTOUR.tolist()
    assert observed[slices["mediapipe"]].all() and observed[slices["eyes"]].all()
    # Without MediaPipe points (a 68-point detector alone) all 68 are fitted.
    alone = tracker.targets(None, truth.lmk68[:1]).observed[0].numpy()
    assert alone[slices["lmk68"]].all()


def _fitted(head, truth, lmk68: np.ndarray, use_mediapipe: bool) -> np.ndarray:
    """(T, 68, 2) projected fitted 68 points of a tracked sequence."""
    tracker = Tracker(head, MOTION.image_size, CONFIG)
    mp478 = truth.mp478 if use_mediapipe else None
    calibrate_on_sequence(tracker, LandmarkSequence(mp478, lmk68, MOTION.image_size, truth.fps, "synthetic"), {}, False)
    points = []
    for index in range(MOTION.frames):
        frame = tracker.track(None if mp478 is None else mp478[index], lmk68[index], timestamp=index / truth.fps)
        assert frame.valid
        options = {"dtype": CONFIG.dtype, "device": CONFIG.device}
        with torch.no_grad():
            evaluation = tracker.fixed.evaluate(
                torch.as_tensor(frame.exp[None], **options), rodrigues(torch.as_tensor(frame.pose[None], **options)),
                torch.as_tensor(frame.transl[None], **options), jacobians=False,
            )
        projected = project(evaluation.points, tracker.focal, tracker.camera.center)[0].double().numpy()
        points.append(projected[tracker.full.slices["lmk68"]])
    return np.stack(points)


def test_a_biased_68_nose_tip_no_longer_pulls_the_fit(flame) -> None:
    layer = Tracker(flame, MOTION.image_size, CONFIG).layer
    truth = synthetic_sequence(layer, MOTION)
    iod = np.linalg.norm(truth.lmk68[:, 36] - truth.lmk68[:, 45], axis=1)
    biased = truth.lmk68.copy()
    biased[:, NOSE_TIP, 1] += 0.05 * iod  # 5 % IOD down, more than the issue measured (3.3 %)

    # 68 points alone: the bias pulls the fitted nose tip down (the bias is big enough to matter).
    only68 = replace(flame, mediapipe=None)
    shift_alone = (_fitted(only68, truth, biased, False) - _fitted(only68, truth, truth.lmk68, False))[:, NOSE_TIP, 1]
    assert np.mean(shift_alone / iod) > 0.005
    # With the MediaPipe embedding, the 68-point nose is not fitted: the fit does not move at all.
    both = _fitted(flame, truth, biased, True) - _fitted(flame, truth, truth.lmk68, True)
    assert np.abs(both).max() < 1e-9

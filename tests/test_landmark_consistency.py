"""Landmark consistency (issue 13, item 3): where the MediaPipe embedding covers a feature, the tracker fits it
and not also the 68-point version of the same detector points (converted by the MediaPipe -> 68 table); the
68 set keeps the jaw contour."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from mediapipe.tasks.python import vision

from engine.assets import load_flame
from engine.camera import project
from engine.demo_head import build_demo_head
from engine.flame import FlameLayer, rodrigues
from engine.landmarks import load_mediapipe_to_68
from engine.synthetic import SyntheticMotion, synthetic_sequence
from engine.targets import TargetBuilder, covered_68_points, mediapipe_contour_landmarks, mediapipe_outlines, tracking_head
from engine.tracker import Tracker, TrackerConfig
from offline.track_job import LandmarkSequence, calibrate_on_sequence

CONTOUR = np.arange(17)
NOSE_TIP = 30  # iBUG 31, 0-based
CONFIG = TrackerConfig(n_shape=20, n_exp=10, fov_deg=30.0, fit_fov=False, calibration_seconds=0.1, calibration_frames=4)
MOTION = SyntheticMotion(frames=8, max_yaw_deg=10.0, max_pitch_deg=5.0, seed=5)


@pytest.fixture(scope="module")
def flame(flame_dir: Path):
    return load_flame(flame_dir, n_shape=20, n_exp=10)


@pytest.fixture(scope="module")
def mediapipe_points(landmarker_task: Path) -> np.ndarray:
    """(T, 478, 2) all of MediaPipe's points of a moving synthetic face (the demo head, built on MediaPipe's mesh)."""
    layer = FlameLayer(build_demo_head(landmarker_task), 10, 10)
    points = synthetic_sequence(layer, MOTION).mp478
    assert np.isfinite(points).all()
    return points


def test_metrical_trackers_embedding_covers_every_inner_feature(flame) -> None:
    covered = covered_68_points(flame.mediapipe.landmark_indices)
    assert not covered[CONTOUR].any() and covered[17:].all()
    # Without lips in the embedding, their 68 points stay.
    lips = {index for c in vision.FaceLandmarksConnections.FACE_LANDMARKS_LIPS for index in (c.start, c.end)}
    no_lips = covered_68_points(np.array([i for i in flame.mediapipe.landmark_indices if i not in lips]))
    assert not no_lips[48:].any() and no_lips[17:48].all()


def test_with_both_embeddings_the_targets_are_the_contour_and_the_mediapipe_points(flame, mediapipe_points: np.ndarray) -> None:
    tracker = Tracker(flame, MOTION.image_size, CONFIG)
    observed = tracker.rig.targets.build(mediapipe_points[:1], None).observed[0].numpy()
    slices = tracker.rig.landmarks.slices
    assert observed[slices["lmk68"]].nonzero()[0].tolist() == CONTOUR.tolist()
    assert observed[slices["mediapipe"]].all() and observed[slices["eyes"]].all()
    # 68 points given as such (another detector) are all fitted.
    given = tracker.rig.targets.build(mediapipe_points[:1], mediapipe_points[:1, :68]).observed[0].numpy()
    assert given[slices["lmk68"]].all()
    # Without a MediaPipe embedding the converted 68 points are all fitted.
    alone = Tracker(replace(flame, mediapipe=None), MOTION.image_size, CONFIG)
    assert alone.rig.targets.build(mediapipe_points[:1], None).observed[0].numpy()[alone.rig.landmarks.slices["lmk68"]].all()


def _fitted_nose_tip(head, mp478: np.ndarray, mapping) -> np.ndarray:
    """(T, 2) projected fitted iBUG nose tip over a sequence tracked with ``mapping`` converting to 68 points."""
    tracker = Tracker(head, MOTION.image_size, CONFIG)
    tracker.rig.targets = TargetBuilder(tracker.rig.landmarks, tracking_head(head), CONFIG.fit, mapping)
    calibrate_on_sequence(tracker, LandmarkSequence(mp478, None, MOTION.image_size, 25.0, "synthetic"), {}, False)
    options = {"dtype": CONFIG.dtype, "device": CONFIG.device}
    tips = []
    for index in range(len(mp478)):
        frame = tracker.track(mp478[index], None, timestamp=index / 25.0)
        assert frame.valid
        with torch.no_grad():
            evaluation = tracker.rig.fixed_landmarks.evaluate(
                torch.as_tensor(frame.exp[None], **options), rodrigues(torch.as_tensor(frame.pose[None], **options)),
                torch.as_tensor(frame.transl[None], **options), jacobians=False,
            )
        projected = project(evaluation.points, tracker.rig.focal, tracker.rig.camera.center)[0].double().numpy()
        tips.append(projected[tracker.rig.landmarks.slices["lmk68"]][NOSE_TIP])
    return np.stack(tips)


def test_a_biased_nose_tip_in_the_68_table_no_longer_pulls_the_fit(flame, mediapipe_points: np.ndarray) -> None:
    table = load_mediapipe_to_68()
    triangles, bary = table.triangles.copy(), table.bary.copy()
    triangles[NOSE_TIP], bary[NOSE_TIP] = (4, 2, 2), (0.4, 0.3, 0.3)  # towards the subnasale (MediaPipe 2)
    biased = replace(table, triangles=triangles, bary=bary)
    iod = np.linalg.norm(mediapipe_points[:, 33] - mediapipe_points[:, 263], axis=1)

    # 68 points alone: the biased table pulls the fitted nose tip (about 4 % IOD: the bias matters).
    only68 = replace(flame, mediapipe=None)
    pulled = _fitted_nose_tip(only68, mediapipe_points, biased) - _fitted_nose_tip(only68, mediapipe_points, table)
    assert np.mean(np.linalg.norm(pulled, axis=1) / iod) > 0.02
    # With the MediaPipe embedding, the converted nose is not fitted: the fit does not move at all.
    both = _fitted_nose_tip(flame, mediapipe_points, biased) - _fitted_nose_tip(flame, mediapipe_points, table)
    assert np.abs(both).max() < 1e-9


def test_shipped_outlines_are_those_of_the_installed_mediapipe() -> None:
    outlines = mediapipe_outlines()
    assert len(outlines) == 9
    for name, indices in outlines.items():
        connections = getattr(vision.FaceLandmarksConnections, name)
        assert indices == {index for c in connections for index in (c.start, c.end)}, name
    assert len(mediapipe_contour_landmarks()) == 160

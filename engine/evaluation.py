"""Accuracy measurements: synthetic ground truth (dense and 3D errors) and real clips (IOD error, jitter).

Everything here is measured, never asserted: the numbers go into the README through ``run_stream.py bench
--accuracy``; the tests assert the landmark accuracy on their own.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from engine.camera import project
from engine.flame import FlameLayer, rodrigues
from engine.head_model import HeadModel
from engine.synthetic import SyntheticMotion, synthetic_sequence
from engine.tracker import TrackedFrame, Tracker, TrackerConfig, diversity_feature, select_diverse

#: MediaPipe's outer eye corners (subject's right, left), for the inter-ocular distance of real clips.
OUTER_EYE_CORNERS = (33, 263)


def similarity_aligned_error(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Mean distance between two point sets after the best similarity transform of ``estimate`` (Umeyama)."""
    mu_e, mu_t = estimate.mean(axis=0), truth.mean(axis=0)
    e, t = estimate - mu_e, truth - mu_t
    u, singular, vt = np.linalg.svd(t.T @ e / len(e))
    sign = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(singular) @ sign) / (e**2).sum(axis=1).mean()
    aligned = scale * e @ rotation.T + mu_t
    return float(np.linalg.norm(aligned - truth, axis=1).mean())


def _dense(layer: FlameLayer, shape: np.ndarray, exp: np.ndarray, pose: np.ndarray, transl: np.ndarray) -> torch.Tensor:
    options = {"dtype": layer.v_template.dtype}
    with torch.no_grad():
        return layer.vertices(
            torch.as_tensor(shape[None], **options), torch.as_tensor(exp[None], **options),
            torch.as_tensor(pose[None], **options), torch.as_tensor(transl[None], **options),
        )[0]


def _visible(vertices: torch.Tensor, faces: torch.Tensor) -> np.ndarray:
    """Vertices of triangles that face the camera (at the origin, looking down -z) in the world frame."""
    corners = vertices[faces]
    normals = torch.linalg.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    facing = (normals * -corners.mean(dim=1)).sum(dim=1) > 0
    visible = np.zeros(len(vertices), dtype=bool)
    visible[faces[facing].flatten().numpy()] = True
    return visible


def synthetic_accuracy(head: HeadModel, motion: SyntheticMotion, config: TrackerConfig) -> dict[str, float]:
    """Track a synthetic sequence; landmark, dense reprojection and aligned 3D errors against the truth."""
    config = replace(config, calibration_seconds=math.inf)
    tracker = Tracker(head, motion.image_size, config)
    sequence = synthetic_sequence(tracker.layer, motion)
    features = [diversity_feature(sequence.pose[i], sequence.exp[i]) for i in range(motion.frames)]

    def frame(index: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        return tuple(None if a is None else a[index] for a in (sequence.mp478, sequence.lmk68))

    tracker.calibrate([frame(i) for i in select_diverse(features, config.calibration_frames)])
    layer = FlameLayer(head, tracker.layer.n_shape, tracker.layer.n_exp, dtype=torch.float64)
    shape = tracker.shape.double().numpy()
    focal_truth = torch.tensor(sequence.camera.focal, dtype=torch.float64)
    focal_fit = torch.tensor(tracker.camera.focal, dtype=torch.float64)
    landmark, dense, aligned = [], [], []
    for index in range(motion.frames):
        fit = tracker.track(*frame(index), timestamp=index / sequence.fps)
        truth_vertices = _dense(layer, sequence.shape, sequence.exp[index], sequence.pose[index], sequence.transl[index])
        fit_vertices = _dense(layer, shape, fit.exp, fit.pose, fit.transl)
        visible = _visible(truth_vertices, layer.faces)
        truth_px = project(truth_vertices[None], focal_truth, sequence.camera.center)[0].numpy()
        fit_px = project(fit_vertices[None], focal_fit, tracker.camera.center)[0].numpy()
        dense.append(np.linalg.norm(fit_px[visible] - truth_px[visible], axis=1).mean())
        aligned.append(similarity_aligned_error(fit_vertices.numpy()[visible], truth_vertices.numpy()[visible]))
        landmark_px = _projected_landmarks(tracker, fit)
        landmark.append(np.linalg.norm(landmark_px - sequence.clean[index], axis=1).mean())
    zero_exp, zero_pose, zero_transl = np.zeros(layer.n_exp), np.zeros((layer.n_joints, 3)), np.zeros(3)
    neutral_fit = _dense(layer, shape, zero_exp, zero_pose, zero_transl).numpy()
    neutral_truth = _dense(layer, sequence.shape, zero_exp, zero_pose, zero_transl).numpy()

    return {
        "frames": motion.frames,
        "landmark_px_mean": float(np.mean(landmark)),
        "dense_visible_px_mean": float(np.mean(dense)),
        "posed_3d_mm_after_similarity": 1e3 * float(np.mean(aligned)),
        "neutral_shape_3d_mm_after_similarity": 1e3 * similarity_aligned_error(neutral_fit, neutral_truth),
        "fov_true_deg": sequence.camera.fov_deg,
        "fov_fit_deg": tracker.camera.fov_deg,
    }


def _projected_landmarks(tracker: Tracker, frame: TrackedFrame) -> np.ndarray:
    options = {"dtype": tracker.config.dtype, "device": tracker.config.device}
    evaluation = tracker.fixed.evaluate(
        torch.as_tensor(frame.exp[None], **options), rodrigues(torch.as_tensor(frame.pose[None], **options)),
        torch.as_tensor(frame.transl[None], **options), jacobians=False,
    )
    return project(evaluation.points, tracker.focal, tracker.camera.center)[0].cpu().double().numpy()


def clip_accuracy(head: HeadModel, mp478: np.ndarray, image_size: tuple[int, int], fps: float, config: TrackerConfig, still_frames: int = 20) -> dict[str, float]:
    """Real clip: model-vs-MediaPipe landmark error over the inter-ocular distance, and jitter when still.

    Jitter is the RMS frame-to-frame change of the model's projected landmarks (pixels) over the stretch of
    ``still_frames`` frames where MediaPipe's own landmarks move least, beside MediaPipe's own jitter there.
    """
    tracker = Tracker(head, image_size, replace(config, calibration_seconds=1.0))
    model_points, observed, errors = [], [], []
    for index in range(len(mp478)):
        points = mp478[index] if np.isfinite(mp478[index]).any() else None
        fit = tracker.track(points, None, timestamp=index / fps)
        projected = _projected_landmarks(tracker, fit)
        target = tracker.targets.pixels(None if points is None else points[None], None)[0]
        model_points.append(projected)
        observed.append(target)
        if fit.valid and points is not None:
            iod = np.linalg.norm(points[OUTER_EYE_CORNERS[0]] - points[OUTER_EYE_CORNERS[1]])
            usable = np.isfinite(target).all(axis=1)
            errors.append(np.linalg.norm(projected[usable] - target[usable], axis=1).mean() / iod)
    model_points, observed = np.stack(model_points), np.stack(observed)
    observed_motion = np.nanmean(np.linalg.norm(np.diff(observed, axis=0), axis=2), axis=1)
    window = np.convolve(observed_motion, np.ones(still_frames - 1), mode="valid")
    start = int(np.nanargmin(window))
    stretch = slice(start, start + still_frames)

    def jitter(points: np.ndarray) -> float:
        steps = np.linalg.norm(np.diff(points[stretch], axis=0), axis=2)
        return float(np.sqrt(np.nanmean(steps**2)))

    return {
        "frames": len(mp478),
        "landmark_error_over_iod_mean": float(np.mean(errors)),
        "valid_fraction": len(errors) / len(mp478),
        "still_stretch_start_frame": start,
        "jitter_model_px": jitter(model_points),
        "jitter_mediapipe_px": jitter(observed),
    }


#: (upper, lower) MediaPipe points whose distance is the mouth's opening (inner lips), and each eye's (lids).
MOUTH_OPENING = (13, 14)
EYE_OPENINGS = ((159, 145), (386, 374))
#: The same in iBUG-68 numbering (0-based), for models fitted to 68 points only.
MOUTH_OPENING_68 = (62, 66)
EYE_OPENINGS_68 = ((37, 41), (44, 46))


def _opening_pairs(tracker: Tracker) -> tuple[tuple[int, int], tuple[tuple[int, int], ...]]:
    """Indices into the tracker's landmark targets of the mouth's and the eyes' (upper, lower) points."""
    probe = np.repeat(np.arange(478, dtype=np.float64)[None, :, None], 2, axis=2)
    order = tracker.targets.pixels(probe, None)[0, :, 0]
    if "mediapipe" in tracker.full.slices:
        start = tracker.full.slices["mediapipe"].start
        position = {int(order[i]): i for i in range(start, tracker.full.slices["mediapipe"].stop)}
        if all(p in position for pair in (MOUTH_OPENING, *EYE_OPENINGS) for p in pair):
            return ((position[MOUTH_OPENING[0]], position[MOUTH_OPENING[1]]),
                    tuple((position[a], position[b]) for a, b in EYE_OPENINGS))
    start = tracker.full.slices["lmk68"].start
    return ((start + MOUTH_OPENING_68[0], start + MOUTH_OPENING_68[1]),
            tuple((start + a, start + b) for a, b in EYE_OPENINGS_68))


def fit_scores(
    tracker: Tracker, shape: np.ndarray, exp: np.ndarray, pose: np.ndarray, transl: np.ndarray, valid: np.ndarray,
    mp478: np.ndarray, still_frames: int = 20,
) -> dict[str, float]:
    """How well per-frame parameters (T frames: exp, pose axis-angle (T, J, 3), transl) fit a clip's MediaPipe
    landmarks with this tracker's model and camera.

    Landmark error: mean distance of the model's landmarks to the detector's over the outer-eye-corner
    distance (percent), mean and worst frame; jitter: RMS frame-to-frame motion of the model's landmarks
    (pixels) over the ``still_frames`` frames where the detector's own landmarks move least; mouth and blink:
    correlation of the model's mouth and eye openings with the detector's over the valid frames.
    """
    options = {"dtype": tracker.config.dtype, "device": tracker.config.device}
    count = len(mp478)
    coeffs = torch.cat([torch.as_tensor(shape, **options).reshape(1, -1).expand(count, -1), torch.as_tensor(exp, **options)], 1)
    with torch.no_grad():
        points = tracker.full.evaluate(coeffs, rodrigues(torch.as_tensor(pose, **options)), torch.as_tensor(transl, **options),
                                       jacobians=False).points
        model = project(points, tracker.focal, tracker.camera.center).cpu().double().numpy()
    observed = tracker.targets.pixels(mp478, None)
    iod = np.linalg.norm(mp478[:, OUTER_EYE_CORNERS[0]] - mp478[:, OUTER_EYE_CORNERS[1]], axis=1)
    usable = np.asarray(valid, bool) & np.isfinite(iod)
    distance = np.linalg.norm(model - observed, axis=2)
    errors = np.nanmean(distance, axis=1)[usable] / iod[usable]
    model[~usable] = np.nan
    observed_motion = np.nanmean(np.linalg.norm(np.diff(observed, axis=0), axis=2), axis=1)
    window = np.convolve(np.nan_to_num(observed_motion, nan=np.inf), np.ones(still_frames - 1), mode="valid")
    start = int(np.argmin(window)) if len(window) else 0
    steps = np.linalg.norm(np.diff(model[start : start + still_frames], axis=0), axis=2)
    mouth, eyes = _opening_pairs(tracker)

    def correlation(pair: tuple[int, int]) -> float:
        model_curve = np.linalg.norm(model[usable, pair[0]] - model[usable, pair[1]], axis=1)
        observed_curve = np.linalg.norm(observed[usable, pair[0]] - observed[usable, pair[1]], axis=1)
        return float(np.corrcoef(model_curve, observed_curve)[0, 1])

    return {
        "frames": count,
        "valid_frames": int(usable.sum()),
        "landmark_error_iod_percent": 100.0 * float(errors.mean()),
        "landmark_error_iod_percent_worst_frame": 100.0 * float(errors.max()),
        "jitter_px": float(np.sqrt(np.nanmean(steps**2))),
        "mouth_correlation": correlation(mouth),
        "blink_correlation": float(np.mean([correlation(pair) for pair in eyes])),
    }

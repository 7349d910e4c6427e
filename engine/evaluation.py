"""Accuracy measurements: synthetic ground truth (dense and 3D errors) and real clips (IOD error, jitter).

Everything here is measured, never asserted: the numbers go into the README through ``run_stream.py bench
--accuracy``; the tests assert the landmark accuracy on their own.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.camera import project
from engine.flame import FlameLayer, rodrigues
from engine.frames import TrackedFrame, stack_reference
from engine.head_model import HeadModel
from engine.rig import HeadRig
from engine.synthetic import SyntheticMotion, synthetic_sequence
from engine.tracker import Tracker, TrackerConfig, diversity_feature, select_diverse
from engine.smoothing import SmoothingConfig

if TYPE_CHECKING:
    from offline.track_job import LandmarkSequence

#: MediaPipe's outer eye corners (subject's right, left), for the inter-ocular distance of real clips.
OUTER_EYE_CORNERS = (33, 263)


def interocular_distance(mp478: np.ndarray) -> np.ndarray:
    """The distance (pixels) between MediaPipe's outer eye corners of (..., 478, 2) points: (...,), NaN where
    the detector saw no face. Landmark errors of real clips are given over it."""
    return np.linalg.norm(mp478[..., OUTER_EYE_CORNERS[0], :] - mp478[..., OUTER_EYE_CORNERS[1], :], axis=-1)


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
    sequence = synthetic_sequence(tracker.rig.layer, motion)
    features = [diversity_feature(sequence.pose[i], sequence.exp[i]) for i in range(motion.frames)]

    def frame(index: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        return tuple(None if a is None else a[index] for a in (sequence.mp478, sequence.lmk68))

    tracker.calibrate([frame(i) for i in select_diverse(features, config.calibration_frames)])
    layer = FlameLayer(head, tracker.rig.layer.n_shape, tracker.rig.layer.n_exp, dtype=torch.float64)
    shape = tracker.rig.shape.double().numpy()
    focal_truth = torch.tensor(sequence.camera.focal, dtype=torch.float64)
    focal_fit = torch.tensor(tracker.rig.camera.focal, dtype=torch.float64)
    landmark, dense, aligned = [], [], []
    for index in range(motion.frames):
        fit = tracker.track(*frame(index), timestamp=index / sequence.fps)
        truth_vertices = _dense(layer, sequence.shape, sequence.exp[index], sequence.pose[index], sequence.transl[index])
        fit_vertices = _dense(layer, shape, fit.exp, fit.pose, fit.transl)
        visible = _visible(truth_vertices, layer.faces)
        truth_px = project(truth_vertices[None], focal_truth, sequence.camera.center)[0].numpy()
        fit_px = project(fit_vertices[None], focal_fit, tracker.rig.camera.center)[0].numpy()
        dense.append(np.linalg.norm(fit_px[visible] - truth_px[visible], axis=1).mean())
        aligned.append(similarity_aligned_error(fit_vertices.numpy()[visible], truth_vertices.numpy()[visible]))
        landmark_px = _projected_landmarks(tracker.rig, fit)
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
        "fov_true_deg": motion.fov_deg,
        "fov_fit_deg": tracker.fov_deg,
    }


def _projected_landmarks(rig: HeadRig, frame: TrackedFrame) -> np.ndarray:
    return rig.landmark_pixels(rig.params_from_frames([frame]))[0].cpu().double().numpy()


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
        projected = _projected_landmarks(tracker.rig, fit)
        target = tracker.rig.targets.pixels(None if points is None else points[None], None)[0]
        model_points.append(projected)
        observed.append(target)
        if fit.valid and points is not None:
            iod = interocular_distance(points)
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


def _opening_pairs(rig: HeadRig) -> tuple[tuple[int, int], tuple[tuple[int, int], ...]]:
    """Indices into the rig's landmark targets of the mouth's and the eyes' (upper, lower) points."""
    probe = np.repeat(np.arange(478, dtype=np.float64)[None, :, None], 2, axis=2)
    order = rig.targets.pixels(probe, None)[0, :, 0]
    if "mediapipe" in rig.landmarks.slices:
        start = rig.landmarks.slices["mediapipe"].start
        position = {int(order[i]): i for i in range(start, rig.landmarks.slices["mediapipe"].stop)}
        if all(p in position for pair in (MOUTH_OPENING, *EYE_OPENINGS) for p in pair):
            return ((position[MOUTH_OPENING[0]], position[MOUTH_OPENING[1]]),
                    tuple((position[a], position[b]) for a, b in EYE_OPENINGS))
    start = rig.landmarks.slices["lmk68"].start
    return ((start + MOUTH_OPENING_68[0], start + MOUTH_OPENING_68[1]),
            tuple((start + a, start + b) for a, b in EYE_OPENINGS_68))


def model_landmark_pixels(rig: HeadRig, shape: np.ndarray, exp: np.ndarray, pose: np.ndarray, transl: np.ndarray) -> np.ndarray:
    """(T, N, 2) pixels of the rig's landmark targets for T frames' parameters (exp, pose axis-angle (T, J, 3),
    transl) with one identity ``shape``."""
    options = rig.options
    coeffs = torch.cat([torch.as_tensor(shape, **options).reshape(1, -1).expand(len(exp), -1), torch.as_tensor(exp, **options)], 1)
    with torch.no_grad():
        points = rig.landmarks.evaluate(coeffs, rodrigues(torch.as_tensor(pose, **options)), torch.as_tensor(transl, **options),
                                       jacobians=False).points
        return project(points, rig.focal, rig.camera.center).cpu().double().numpy()


def landmark_errors(rig: HeadRig, shape: np.ndarray, exp: np.ndarray, pose: np.ndarray, transl: np.ndarray,
                    mp478: np.ndarray) -> np.ndarray:
    """(T,) each frame's mean distance of the model's landmarks to MediaPipe's over the outer-eye-corner
    distance (a fraction; NaN where the detector saw no face), as :func:`fit_scores` measures it."""
    observed = rig.targets.pixels(mp478, None)
    iod = interocular_distance(mp478)
    return errors_over_iod(model_landmark_pixels(rig, shape, exp, pose, transl), observed, iod)


def errors_over_iod(model: np.ndarray, observed: np.ndarray, iod: np.ndarray) -> np.ndarray:
    """(T,) each frame's mean distance of ``model`` to ``observed`` points (T, N, 2) over its ``iod``."""
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a frame without a face is all NaN: its error is NaN
        return np.nanmean(np.linalg.norm(model - observed, axis=2), axis=1) / iod


def still_jitter(model: np.ndarray, observed: np.ndarray, still_frames: int = 20) -> float:
    """RMS frame-to-frame motion (pixels) of the (T, N, 2) ``model`` points (NaN where not fitted) over the
    ``still_frames`` consecutive frames where the detector's ``observed`` points move least: the jitter of
    :func:`fit_scores`. A single frame does not move (0)."""
    if len(model) < 2:
        return 0.0
    observed_motion = np.nanmean(np.linalg.norm(np.diff(observed, axis=0), axis=2), axis=1)
    window = np.convolve(np.nan_to_num(observed_motion, nan=np.inf), np.ones(still_frames - 1), mode="valid")
    start = int(np.argmin(window)) if len(window) else 0
    steps = np.linalg.norm(np.diff(model[start : start + still_frames], axis=0), axis=2)
    return float(np.sqrt(np.nanmean(steps**2)))


def fit_scores(
    rig: HeadRig, shape: np.ndarray, exp: np.ndarray, pose: np.ndarray, transl: np.ndarray, valid: np.ndarray,
    mp478: np.ndarray, still_frames: int = 20,
) -> dict[str, float]:
    """How well per-frame parameters (T frames: exp, pose axis-angle (T, J, 3), transl) fit a clip's MediaPipe
    landmarks with this rig's model and camera.

    Landmark error: mean distance of the model's landmarks to the detector's over the outer-eye-corner
    distance (percent), mean and worst frame; jitter: RMS frame-to-frame motion of the model's landmarks
    (pixels) over the ``still_frames`` frames where the detector's own landmarks move least; mouth and blink:
    correlation of the model's mouth and eye openings with the detector's over the valid frames.
    """
    count = len(mp478)
    model = model_landmark_pixels(rig, shape, exp, pose, transl)
    observed = rig.targets.pixels(mp478, None)
    iod = interocular_distance(mp478)
    usable = np.asarray(valid, bool) & np.isfinite(iod)
    errors = errors_over_iod(model, observed, iod)[usable]
    model[~usable] = np.nan
    mouth, eyes = _opening_pairs(rig)

    def correlation(pair: tuple[int, int]) -> float:
        model_curve = np.linalg.norm(model[usable, pair[0]] - model[usable, pair[1]], axis=1)
        observed_curve = np.linalg.norm(observed[usable, pair[0]] - observed[usable, pair[1]], axis=1)
        return float(np.corrcoef(model_curve, observed_curve)[0, 1])

    return {
        "frames": count,
        "valid_frames": int(usable.sum()),
        "landmark_error_iod_percent": 100.0 * float(errors.mean()),
        "landmark_error_iod_percent_worst_frame": 100.0 * float(errors.max()),
        "jitter_px": still_jitter(model, observed, still_frames),
        "mouth_correlation": correlation(mouth),
        "blink_correlation": float(np.mean([correlation(pair) for pair in eyes])),
    }


# ------------------------------------------------------------------------------------- offline smoothing


def reference_landmarks(rig: HeadRig, stacked: dict[str, np.ndarray]) -> np.ndarray:
    """(T, L, 2) pixels of the rig's landmarks for stacked reference arrays (a track's frames)."""
    params = rig.params_from_reference_stack(stacked)
    with torch.no_grad():
        return rig.landmark_pixels(params).cpu().double().numpy()


def _opening(points: np.ndarray, pairs: list[tuple[int, int]], iod: np.ndarray) -> np.ndarray:
    """(T,) mean distance of the pairs, over the inter-ocular distance."""
    distances = [np.linalg.norm(points[:, a] - points[:, b], axis=-1) for a, b in pairs]
    return np.mean(distances, axis=0) / iod


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    usable = np.isfinite(a) & np.isfinite(b)
    if usable.sum() < 3 or np.std(a[usable]) == 0 or np.std(b[usable]) == 0:
        return float("nan")
    return float(np.corrcoef(a[usable], b[usable])[0, 1])


def jitter_over_iod(points: np.ndarray, iod: np.ndarray, usable: np.ndarray) -> float:
    """Jitter: each landmark's median second difference over the frames (a frame and both neighbours usable),
    over the inter-ocular distance, averaged over the landmarks. Per landmark and by the median, so the
    measure stays on noise: a speaking mouth or a blink moves a few landmarks fast in a few frames, and
    neither those landmarks' nor those frames' real motion dominates it."""
    second = np.linalg.norm(points[2:] - 2 * points[1:-1] + points[:-2], axis=-1) / iod[1:-1, None]
    keep = usable[2:] & usable[1:-1] & usable[:-2]
    if not keep.any():
        return float("nan")
    return float(np.nanmean(np.nanmedian(second[keep], axis=0)))


def smoothing_accuracy(rig: HeadRig, mp478: np.ndarray, raw: dict[str, np.ndarray], smoothed: dict[str, np.ndarray]) -> dict[str, float]:
    """A tracked real sequence before and after offline smoothing, against MediaPipe's landmarks.

    Jitter (:func:`jitter_over_iod`) of the detector and of the fitted landmarks before and after, the mean
    landmark error over the inter-ocular distance (percent) before and after, and how well the fitted eye- and
    mouth-opening curves follow the detector's (Pearson correlation) before and after.
    """
    observed = rig.targets.pixels(mp478, None)
    iod = interocular_distance(mp478)
    valid = np.asarray(raw["valid"], dtype=bool).reshape(-1) & np.isfinite(iod)
    mouth, eyes = _opening_pairs(rig)
    pairs = {"eyes": list(eyes), "mouth": [mouth]}
    report: dict[str, float] = {"frames": int(len(valid)), "valid_frames": int(valid.sum())}
    detector_jitter = jitter_over_iod(observed, iod, valid)
    report["jitter_detector_pct_iod"] = 100 * detector_jitter
    curves = {name: _opening(observed, p, iod) for name, p in pairs.items()}
    for label, stacked in (("raw", raw), ("smoothed", smoothed)):
        fitted = reference_landmarks(rig, stacked)
        errors = np.nanmean(np.linalg.norm(fitted - observed, axis=-1), axis=-1) / iod
        report[f"error_{label}_pct_iod"] = 100 * float(np.mean(errors[valid]))
        jitter = jitter_over_iod(fitted, iod, valid)
        report[f"jitter_{label}_pct_iod"] = 100 * jitter
        report[f"jitter_{label}_over_detector"] = jitter / detector_jitter
        for name, p in pairs.items():
            fitted_curve = np.where(valid, _opening(fitted, p, iod), np.nan)
            report[f"{name}_opening_correlation_{label}"] = _correlation(fitted_curve, np.where(valid, curves[name], np.nan))
    return report


def synthetic_smoothing_accuracy(head: HeadModel, motion: SyntheticMotion, config: TrackerConfig, smoothing: SmoothingConfig) -> dict[str, float]:
    """Track a synthetic sequence offline (``track``'s two passes), then smooth it as ``track`` does: the
    landmarks' mean distance to the noise-free truth (pixels) and their jitter over the truth's, before and
    after."""
    from offline.track_job import LandmarkSequence, smooth_tracked, track_sequence

    layer = Tracker(head, motion.image_size, config).rig.layer
    truth = synthetic_sequence(layer, motion)
    sequence = LandmarkSequence(truth.mp478, truth.lmk68, motion.image_size, truth.fps, "synthetic")
    tracker, frames, _ = track_sequence(sequence, head, config, progress=False)
    raw = stack_reference(frames)
    smoothed = stack_reference(smooth_tracked(tracker.rig, sequence, frames, smoothing)[0])
    report: dict[str, float] = {"frames": motion.frames}
    usable = np.ones(motion.frames, dtype=bool)
    unit = np.ones(motion.frames)
    truth_jitter = jitter_over_iod(truth.clean, unit, usable)
    for label, stacked in (("raw", raw), ("smoothed", smoothed)):
        fitted = reference_landmarks(tracker.rig, stacked)
        report[f"landmark_px_{label}"] = float(np.mean(np.linalg.norm(fitted - truth.clean, axis=-1)))
        report[f"jitter_{label}_over_truth"] = jitter_over_iod(fitted, unit, usable) / truth_jitter
    return report


def clip_smoothing_accuracy(
    head: HeadModel, sequence: LandmarkSequence, config: TrackerConfig, smoothing: SmoothingConfig, landmarker_task: Path | None = None
) -> dict[str, float]:
    """Track a real clip's landmarks offline as ``track`` does (with ``landmarker_task``, calibrated on a sample of
    the clip's frames detected up front, as ``track`` calibrates a video), then smooth as it does:
    :func:`smoothing_accuracy`, and the head pose's smoothing strength used (at 25 fps)."""
    from offline.track_job import smooth_tracked, track_sequence

    tracker, frames, _ = track_sequence(sequence, head, config, progress=False, landmarker_task=landmarker_task)
    smoothed, used = smooth_tracked(tracker.rig, sequence, frames, smoothing)
    report = smoothing_accuracy(tracker.rig, sequence.mp478, stack_reference(frames), stack_reference(smoothed))
    return {"fps": sequence.fps, "pose_strength_used": used.pose_strength, **report}

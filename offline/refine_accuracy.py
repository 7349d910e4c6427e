"""Refinement against tracking on a real clip: the same frames, the same measures, side by side.

MediaPipe's landmarks of the clip are tracked (landmarks only, smoothed over the sequence as ``track`` does
unless the options' smoothing is None), the tracked frames are refined photometrically (as ``track
--photometric`` does), and both results are scored against the detector
(:func:`engine.evaluation.fit_scores`), by their landmark error against MediaPipe run on each frame on its own
(single images: no lag behind motion), and by their image error inside the face mask, both rendered with the
refinement's albedo and lighting. ``python run_stream.py bench --accuracy --refine CLIP`` prints it.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.camera import Camera
from engine.evaluation import fit_scores
from engine.face_regions import REGION_NAMES, region_masks
from engine.frames import FrameState
from engine.head_model import HeadModel
from engine.photometric import PhotometricFitter
from engine.rig import HeadRig
from engine.tracker import TrackerConfig
from offline.refine_job import IDENTITY_FILE, RefineOptions, load_appearance, refine_video, state_from_reference
from offline.track_job import detect_landmarks, track_sequence


def compare_refine_with_track(
    head: HeadModel, clip: str, landmarker_task: Path, frames: int, options: RefineOptions | None = None,
    device: str = "cpu", progress: bool = True,
) -> dict[str, object]:
    """Track and refine the first ``frames`` frames of ``clip``; both results' scores and the timings."""
    options = options or RefineOptions()
    sequence, _ = detect_landmarks(clip, landmarker_task, max_frames=frames)
    started, cpu_started = time.perf_counter(), time.process_time()
    tracker, results, _ = track_sequence(sequence, head, TrackerConfig(device=device), progress, options.smoothing)
    track_seconds, track_cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    with tempfile.TemporaryDirectory() as out:
        timings = refine_video(clip, tracker, results, sequence.mp478, Path(out), options, progress)
        refined = [_load(Path(out) / f"{i:06d}.npz") for i in range(len(results))]
        fitter = PhotometricFitter(tracker.rig, options.photometric)
        load_appearance(fitter, Path(out) / IDENTITY_FILE)
    report: dict[str, object] = {"clip": clip, "model": head.name, "crop_size": options.photometric.size,
                                 "frame_iterations": options.photometric.frame_iterations, "window": options.window,
                                 "smoothing": None if options.smoothing is None else options.smoothing.describe()}
    image_errors = _image_errors(fitter, clip, sequence.mp478, [results, refined], options.window)
    report["largest_image_gain_frames"] = largest_gains(*image_errors)
    # MediaPipe's video mode, which both fits start from, trails motion; each frame detected on its own does
    # not, so the distance to it also credits a fit for motion the video mode's landmarks lag behind.
    independent, _ = detect_landmarks(clip, landmarker_task, max_frames=frames, progress=progress, independent=True)
    for name, arrays, error in (("track", results, image_errors[0]), ("refine", refined, image_errors[1])):
        against_independent = score_frames(head, arrays, independent.mp478, sequence.image_size, device)
        report[name] = {**score_frames(head, arrays, sequence.mp478, sequence.image_size, device), "image_error_in_face_mask": error.mean_of_frames(),
                        "image_error_by_region": error.by_region(),
                        "landmark_error_vs_single_image_detection_iod_percent": against_independent["landmark_error_iod_percent"]}
    report["track"]["seconds_per_frame"] = track_seconds / len(results)
    report["track"]["cpu_seconds_per_frame"] = track_cpu_seconds / len(results)
    report["refine"]["seconds_per_frame"] = timings["seconds_per_frame"]
    report["refine"]["cpu_seconds_per_frame"] = timings["cpu_seconds_per_frame"]
    report["refine"]["identity_seconds"] = timings.get("identity_s", float("nan"))
    report["refine"]["rejected_windows"] = timings.get("rejected_windows", 0)
    report["refine"]["smoothing_seconds"] = timings.get("smoothing_s", 0.0)
    # The strengths the corrections to track's fit were smoothed with (NaN: every frame kept track's fit).
    report["refine"]["correction_strength"] = timings.get("correction_strength", 0.0)
    report["refine"]["correction_pose_strength"] = timings.get("correction_pose_strength", 0.0)
    return report


def load_frames(directory: Path) -> list[dict[str, np.ndarray]]:
    """The per-frame arrays of a ``track`` or ``refine`` output folder, in frame order."""
    return [_load(path) for path in sorted(Path(directory).glob("[0-9]" * 6 + ".npz"))]


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as saved:
        return {key: saved[key] for key in saved.files}


def score_frames(head: HeadModel, arrays: list[dict[str, np.ndarray]], mp478: np.ndarray, image_size: tuple[int, int],
                 device: str = "cpu") -> dict[str, float]:
    """:func:`engine.evaluation.fit_scores` of per-frame arrays (track's format) against MediaPipe's landmarks,
    with the model, identity and field of view the arrays were made with."""
    first = next(frame for frame in arrays if bool(frame["valid"][0]))
    height, width = image_size
    camera = Camera.from_fov(width, height, float(first["fov"][0]))
    rig = HeadRig(head, camera, first["shape"].shape[1], first["exp"].shape[1], device=device)
    rig.use(rig.identity_for(torch.as_tensor(first["shape"][0])))
    return _scores(rig, arrays, mp478)


def _states(rig: HeadRig, arrays: list[dict[str, np.ndarray]]) -> list[FrameState | None]:
    return [state_from_reference(rig, frame) for frame in arrays]


def _scores(rig: HeadRig, arrays: list[dict[str, np.ndarray]], mp478: np.ndarray) -> dict[str, float]:
    states = _states(rig, arrays)
    neutral = next(s for s in states if s is not None)
    filled = [s if s is not None else neutral for s in states]
    stacked = FrameState.cat(filled)
    return fit_scores(rig, arrays[0]["shape"][0], stacked.exp.numpy(), stacked.pose.numpy(), stacked.transl.numpy(),
                      np.array([s is not None for s in states]), mp478)


def _image_errors(fitter: PhotometricFitter, clip: str, mp478: np.ndarray, results: list[list[dict]], window: int) -> list[ImageErrors]:
    """Each result's mean absolute RGB error inside the face mask, overall and by face region (the face mask
    within :mod:`engine.face_regions`' mouth, eyes and cheeks), all rendered with the fitter's appearance."""
    from realtime.sources import iter_frames

    states = [_states(fitter.rig, arrays) for arrays in results]
    errors = [ImageErrors() for _ in results]
    images, indices = [], []
    camera = fitter.rig.camera

    def flush() -> None:
        batch = fitter.prepare(images, [mp478[i] for i in indices])
        # The crops' own pixels of MediaPipe's points: prepare scales and shifts the image by K's change.
        scale = batch.K[:, 0, 0].cpu().numpy() / camera.focal
        shift = batch.K[:, :2, 2].cpu().numpy() - scale[:, None] * np.asarray(camera.center)
        regions = [region_masks(mp478[i] * s + d, (batch.size, batch.size)) for i, s, d in zip(indices, scale, shift)]
        face = batch.face_mask.cpu().numpy()
        for k, sequence in enumerate(states):
            maps = fitter.error_map(FrameState.cat([sequence[i] for i in indices]), batch)
            for b, index in enumerate(indices):
                errors[k].add(index, maps[b], face[b], {name: mask & face[b] for name, mask in regions[b].items()})
        images.clear()
        indices.clear()

    for frame in iter_frames(clip):
        if frame.index >= len(mp478):
            break
        if all(s[frame.index] is not None for s in states) and np.isfinite(mp478[frame.index]).any():
            images.append(frame.image)
            indices.append(frame.index)
            if len(images) == window:
                flush()
    if images:
        flush()
    return errors


@dataclass
class ImageErrors:
    """Sums of per-pixel absolute RGB errors inside the face mask, over the whole mask and by region."""

    sums: dict[str, float] = field(default_factory=lambda: {name: 0.0 for name in ("face", *REGION_NAMES)})
    pixels: dict[str, int] = field(default_factory=lambda: {name: 0 for name in ("face", *REGION_NAMES)})
    per_frame: dict[str, dict[int, float]] = field(default_factory=lambda: {name: {} for name in ("face", *REGION_NAMES)})

    def add(self, index: int, error_map: np.ndarray, face: np.ndarray, regions: dict[str, np.ndarray]) -> None:
        for name, mask in {"face": face, **regions}.items():
            count = int(mask.sum())
            if count:
                total = float(error_map[mask].sum())
                self.sums[name] += total
                self.pixels[name] += count
                self.per_frame[name][index] = total / count

    def mean_of_frames(self) -> float:
        """The face mask's error averaged over frames (each frame's mean, as the fit's ``image_error``)."""
        return float(np.mean(list(self.per_frame["face"].values()))) if self.per_frame["face"] else float("nan")

    def by_region(self) -> dict[str, float]:
        """Each region's error over all its pixels in all frames."""
        return {name: self.sums[name] / self.pixels[name] if self.pixels[name] else float("nan") for name in REGION_NAMES}


def largest_gains(before: ImageErrors, after: ImageErrors, count: int = 3) -> dict[str, list[tuple[int, float]]]:
    """Per region (and 'face'), the ``count`` frames where ``after`` lowers the error most below ``before``:
    (frame, error before - error after), largest first."""
    gains = {}
    for name in ("face", *REGION_NAMES):
        shared = before.per_frame[name].keys() & after.per_frame[name].keys()
        ranked = sorted(((i, before.per_frame[name][i] - after.per_frame[name][i]) for i in shared), key=lambda pair: -pair[1])
        gains[name] = [(int(i), float(gain)) for i, gain in ranked[:count]]
    return gains

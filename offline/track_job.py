"""Offline tracking of a video, an image, a folder of images or a landmarks file into per-frame .npz files.

Two passes over the landmarks: a quick pass with the mean identity gives every frame's head pose and
expression, from which the most diverse frames are chosen for calibration (identity and FOV, over the
whole input rather than only its first seconds); the second pass tracks every frame with that identity
frozen, warm-started, without the live output filter. Output (format version in ``meta.json``):

- ``DIR/{frame:06d}.npz``: the reference tracker's keys (``shape exp head_pose jaw_pose neck_pose eye_pose
  cam fov K``, leading dimension 1), ``valid``, and with ``save_vertices`` the posed mesh in camera space;
- ``DIR/tracking.npz``: the same arrays stacked over frames;
- ``DIR/meta.json``: model files and checksums, image size, fps, FOV, versions and timings.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine.errors import UserError
from engine.export import posed_vertices
from engine.head_model import HeadModel
from engine.landmarks import N_LANDMARKS, FaceLandmarker, LandmarkerConfig
from engine.tracker import FRAME_FORMAT_VERSION, Tracker, TrackerConfig, diversity_feature, fit_single, reference_arrays, select_diverse

log = logging.getLogger(__name__)



@dataclass
class LandmarkSequence:
    """2D landmarks of a whole input, NaN where unobserved; a frame with no face is all NaN."""

    mp478: np.ndarray | None  # (T, 478, 2)
    lmk68: np.ndarray | None  # (T, 68, 2)
    image_size: tuple[int, int]  # (height, width)
    fps: float
    source: str

    @property
    def n_frames(self) -> int:
        return int((self.mp478 if self.mp478 is not None else self.lmk68).shape[0])

    @property
    def observed_frames(self) -> int:
        """Frames in which any landmark was observed (a face was found)."""
        arrays = [a for a in (self.mp478, self.lmk68) if a is not None]
        return int(np.logical_or.reduce([np.isfinite(a).any(axis=(1, 2)) for a in arrays]).sum())

    def frame(self, index: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """One frame's (mp478, lmk68), each None when absent or not observed at all."""

        def pick(array: np.ndarray | None) -> np.ndarray | None:
            if array is None or not np.isfinite(array[index]).any():
                return None
            return array[index]

        return pick(self.mp478), pick(self.lmk68)


def load_landmark_file(path: Path) -> LandmarkSequence:
    """Read a landmarks .npz (see README: mp478 and/or lmk68, image_size, optional fps), validating it."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is not a readable .npz landmarks file ({error})") from None
    if "mp478" not in arrays and "lmk68" not in arrays:
        raise UserError(f"{path} needs an array 'mp478' (T, 478, 2) and/or 'lmk68' (T, 68, 2) of pixel coordinates")
    if "image_size" not in arrays or np.asarray(arrays["image_size"]).shape != (2,):
        raise UserError(f"{path} needs 'image_size' = (height, width) in pixels")
    height, width = (int(v) for v in arrays["image_size"])
    if height < 16 or width < 16:
        raise UserError(f"{path}: image_size {height}x{width} is too small (at least 16x16 pixels)")
    sequences: dict[str, np.ndarray | None] = {}
    for key, count in (("mp478", N_LANDMARKS), ("lmk68", 68)):
        array = arrays.get(key)
        if array is not None:
            array = np.asarray(array, dtype=np.float64)
            if array.ndim == 2:
                array = array[None]
            if array.ndim != 3 or array.shape[1:] != (count, 2):
                raise UserError(f"{path}: '{key}' has shape {array.shape}, expected (T, {count}, 2)")
            if np.isinf(array).any():
                raise UserError(f"{path}: '{key}' contains infinite values (use NaN for unobserved points)")
        sequences[key] = array
    lengths = {a.shape[0] for a in sequences.values() if a is not None}
    if len(lengths) != 1:
        raise UserError(f"{path}: 'mp478' and 'lmk68' have different numbers of frames {sorted(lengths)}")
    fps = float(arrays["fps"]) if "fps" in arrays else 25.0
    return LandmarkSequence(sequences["mp478"], sequences["lmk68"], (height, width), fps, str(path))


def detect_landmarks(source: str, task_path: Path, max_frames: int | None = None) -> tuple[LandmarkSequence, list[float]]:
    """Run MediaPipe over every frame (or the first ``max_frames``) of a video, image or image folder.

    Also returns MediaPipe's own milliseconds per frame.
    """
    from realtime.sources import iter_frames, open_source

    with open_source(source, realtime=False) as probe:
        fps = probe.fps or 25.0
        width, height = probe.size
    single_image = Path(source).is_file() and Path(source).suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff"}
    mode = "image" if single_image else "video"
    points: list[np.ndarray] = []
    timings: list[float] = []
    with FaceLandmarker(LandmarkerConfig(task_path, running_mode=mode)) as landmarker:
        for frame in tqdm(iter_frames(source), desc="landmarks", unit="frame", leave=False, total=max_frames):
            if max_frames is not None and frame.index >= max_frames:
                break
            started = time.perf_counter()
            observation = landmarker.detect(frame.image, None if mode == "image" else int(round(frame.index * 1000 / fps)))
            timings.append((time.perf_counter() - started) * 1e3)
            points.append(np.full((N_LANDMARKS, 2), np.nan) if observation is None else observation.points.astype(np.float64))
    if not points:
        raise UserError(f"{source} holds no frames")
    return LandmarkSequence(np.stack(points), None, (height, width), float(fps), source), timings


def track_sequence(
    sequence: LandmarkSequence, head: HeadModel, config: TrackerConfig, progress: bool = True
) -> tuple[Tracker, list[dict[str, np.ndarray]], dict[str, float]]:
    """Calibrate on the most diverse frames of the whole sequence, then track every frame."""
    tracker = Tracker(head, sequence.image_size, config)
    timings: dict[str, float] = {}
    if sequence.n_frames == 1:
        mp478, lmk68 = sequence.frame(0)
        if mp478 is None and lmk68 is None:
            raise UserError(f"no face found in {sequence.source}")
        started = time.perf_counter()
        arrays = fit_single(head, sequence.image_size, mp478, lmk68, config)
        timings["fit_s"] = time.perf_counter() - started
        return tracker, [arrays], timings

    started = time.perf_counter()
    # The survey only needs poses and expressions with the mean identity: it never calibrates itself.
    scout = Tracker(head, sequence.image_size, replace(config, calibration_seconds=math.inf))
    candidates: list[int] = []
    features: list[np.ndarray] = []
    for index in tqdm(range(sequence.n_frames), desc="survey", unit="frame", disable=not progress, leave=False):
        frame = scout.track(*sequence.frame(index), timestamp=index / sequence.fps)
        if frame.valid:
            candidates.append(index)
            features.append(diversity_feature(frame.pose, frame.exp))
    timings["survey_s"] = time.perf_counter() - started
    if not candidates:
        raise UserError(f"no face could be tracked in {sequence.source}")
    chosen = [candidates[i] for i in select_diverse(features, config.calibration_frames)]
    started = time.perf_counter()
    tracker.calibrate([sequence.frame(i) for i in chosen])
    timings["calibration_s"] = time.perf_counter() - started

    started = time.perf_counter()
    results = []
    for index in tqdm(range(sequence.n_frames), desc="track", unit="frame", disable=not progress):
        frame = tracker.track(*sequence.frame(index), timestamp=index / sequence.fps)
        results.append(reference_arrays(tracker, frame))
    timings["tracking_s"] = time.perf_counter() - started
    timings["tracking_ms_per_frame"] = timings["tracking_s"] * 1e3 / sequence.n_frames
    return tracker, results, timings


def write_outputs(
    out_dir: Path,
    tracker: Tracker,
    results: list[dict[str, np.ndarray]],
    sequence: LandmarkSequence,
    timings: dict[str, float],
    save_vertices: bool,
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for index, arrays in enumerate(tqdm(results, desc="write", unit="frame", leave=False)):
        if save_vertices:
            arrays = {**arrays, "vertices": posed_vertices(tracker.layer, arrays, space="camera")[None].astype(np.float32)}
        write_npz_atomic(out_dir / f"{index:06d}.npz", arrays)
    stacked = {key: np.concatenate([r[key] for r in results]) for key in results[0]}
    write_npz_atomic(out_dir / "tracking.npz", stacked)
    meta = {
        "format": "flame-live tracking",
        "format_version": FRAME_FORMAT_VERSION,
        "model": {"name": tracker.head.name, "is_demo": tracker.head.is_demo, "checksum": tracker.head.checksum, "files": tracker.head.sources},
        "source": sequence.source,
        "image_size": {"height": sequence.image_size[0], "width": sequence.image_size[1]},
        "fps": sequence.fps,
        "frames": len(results),
        "valid_frames": int(sum(bool(r["valid"][0]) for r in results)),
        "fov_deg": float(results[-1]["fov"][0]),
        "n_shape": tracker.layer.n_shape,
        "n_exp": tracker.layer.n_exp,
        "conventions": "head_pose is zero; cam = (yaw, pitch, roll, x, y, z), world-to-view, radians, "
        "R = Rz(roll) Ry(yaw) Rx(pitch), OpenGL view (y up, -z forward); vertices in OpenCV camera space",
        "timings": timings,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an .npz so that an interrupted run never leaves a half-written file under the final name."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    with os.fdopen(handle, "wb") as stream:
        np.savez(stream, **arrays)
    os.replace(temporary, path)

"""Offline tracking of a video, an image, a folder of images or a landmarks file into per-frame .npz files.

Two passes over the landmarks: a quick pass with the mean identity gives every frame's head pose and
expression, from which the most diverse frames are chosen for calibration (identity and FOV, over the
whole input rather than only its first seconds); the second pass tracks every frame with that identity
frozen, warm-started, without the live output filter.

:func:`track_input` writes everything as it goes, so an interrupted run keeps its work and the same call
continues it. Output in ``DIR`` (format version in ``meta.json``), in the order it is written:

- ``job.json``: what is tracked (input path and fingerprint, model checksum, options); a folder holding
  another job is refused, and cleared only on request (``overwrite``);
- ``landmarks.npz``: MediaPipe's landmarks of every frame, in the landmarks-file format ``track`` reads;
- ``calibration.npz``: the identity (``shape``) and focal length (pixels) every frame is tracked with, and
  where the focal length comes from (``fov_source``: given, estimated, default) with how well the frames
  determined it (``fov_log_std``);
- ``{frame:06d}.npz``: the reference tracker's keys (``shape exp head_pose jaw_pose neck_pose eye_pose
  cam fov K``, leading dimension 1), ``valid``, ``format_version``, ``model_checksum``, and with
  ``save_vertices`` the posed mesh in camera space; one file per frame, each written atomically;
- ``unsmoothed.npz``: once every frame is tracked, the per-frame fits stacked, before smoothing. Then the
  smoothing pass (:mod:`engine.smoothing`, past and future frames) rewrites every frame file with the
  smoothed parameters; interrupted, it starts again from ``unsmoothed.npz`` (the per-frame fits are never
  lost, and a frame file is either the fit or its smoothed version). Without smoothing it is not written;
- ``tracking.npz``: the final frames' arrays stacked over frames;
- ``meta.json``: model files and checksums, image size, fps, FOV, versions and timings. Written last and
  atomically: a folder with ``meta.json`` holds a complete result (:func:`is_complete`).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine.atomic import write_json_atomic, write_npz_atomic
from engine.config import to_tree
from engine.errors import UserError
from engine.evaluation import reference_landmarks
from engine.export import posed_vertices
from engine.frames import FRAME_FORMAT_VERSION, stack_reference, unstack_reference
from engine.head_model import HeadModel
from engine.landmarks import N_LANDMARKS, LandmarkerConfig
from engine.rig import HeadRig
from engine.smoothing import SmoothingConfig, smooth_within_fit
from engine.tracker import Tracker, TrackerConfig, diversity_feature, select_diverse
from engine.versions import software_versions

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
LANDMARKS_FILE = "landmarks.npz"
CALIBRATION_FILE = "calibration.npz"
STACK_FILE = "tracking.npz"
UNSMOOTHED_FILE = "unsmoothed.npz"
META_FILE = "meta.json"
PHOTOMETRIC_DIR = "photometric"
#: What ``track --render`` writes beside the results (offline.render_job): a video, or a picture for one image.
OVERLAY_VIDEO, OVERLAY_IMAGE = "overlay.mp4", "overlay.png"
JOB_FORMAT_VERSION = 2
_FRAME_FILE = re.compile(r"\d{6}\.npz")
_OUR_FILES = {JOB_FILE, LANDMARKS_FILE, CALIBRATION_FILE, UNSMOOTHED_FILE, STACK_FILE, META_FILE, PHOTOMETRIC_DIR, OVERLAY_VIDEO, OVERLAY_IMAGE}


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
    except (OSError, ValueError, zipfile.BadZipFile) as error:
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


def detect_landmarks(
    source: str, task_path: Path, max_frames: int | None = None, progress: bool = True, survey: Survey | None = None,
    independent: bool = False,
) -> tuple[LandmarkSequence, list[float]]:
    """Run MediaPipe over every frame (or the first ``max_frames``) of a video, image or image folder.

    A video is tracked in MediaPipe's video mode (each frame starts from the previous frame's face; its
    landmarks trail motion), unless ``independent``: every frame is then detected on its own, as a single
    image (slower and noisier, but without the lag). Three things overlap: decoding (a thread), MediaPipe (a
    process of its own, a few frames in flight) and this thread, which stores each frame's landmarks and,
    given a ``survey``, surveys the frame at once. Also returns MediaPipe's own milliseconds per frame.
    """
    from realtime.detection_process import DetectionProcess
    from realtime.sources import iter_frames, open_source, read_ahead

    with open_source(source, realtime=False) as probe:
        fps = probe.fps or 25.0
        width, height = probe.size
    single_image = Path(source).is_file() and Path(source).suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff"}
    mode = "image" if single_image or independent else "video"
    if survey is not None:
        survey.begin((height, width), float(fps))
    points: list[np.ndarray] = []
    timings: list[float] = []
    with (
        DetectionProcess(LandmarkerConfig(task_path, running_mode=mode), (height, width)) as detector,
        tqdm(desc="landmarks", unit="frame", leave=False, total=max_frames, disable=not progress) as bar,
    ):

        def take() -> None:
            detection = detector.collect()
            timings.append(detection.mediapipe_ms)
            found = detection.observation
            points.append(np.full((N_LANDMARKS, 2), np.nan) if found is None else found.points.astype(np.float64))
            if survey is not None:
                survey.add(len(points) - 1, None if found is None else points[-1])
            bar.update()

        for frame in read_ahead(iter_frames(source)):
            if max_frames is not None and frame.index >= max_frames:
                break
            if frame.image.shape[:2] != (height, width):
                raise UserError(
                    f"{source}: image {frame.index + 1} is {frame.image.shape[1]}x{frame.image.shape[0]} but the first is "
                    f"{width}x{height}; one run tracks one camera, so put the images of each size in a folder of their own"
                )
            if detector.in_flight == detector.slots:
                take()
            detector.submit(frame.image, None if mode == "image" else int(round(frame.index * 1000 / fps)))
        while detector.in_flight:
            take()
    if not points:
        raise UserError(f"{source} holds no frames")
    return LandmarkSequence(np.stack(points), None, (height, width), float(fps), source), timings


class Survey:
    """The survey pass: every frame tracked with the mean identity, to find the most diverse frames, on which
    identity and FOV are then calibrated. Frames are added in order, during detection or afterwards."""

    def __init__(self, head: HeadModel, config: TrackerConfig) -> None:
        self._head = head
        # The survey only needs poses and expressions with the mean identity: it never calibrates itself.
        self._config = replace(config, calibration_seconds=math.inf)
        self._scout: Tracker | None = None
        self._fps = 25.0
        self.candidates: list[int] = []
        self._features: list[np.ndarray] = []
        self._added = 0
        self.seconds = 0.0
        """Time spent surveying."""

    def begin(self, image_size: tuple[int, int], fps: float) -> None:
        self._scout = Tracker(self._head, image_size, self._config)
        self._fps = fps

    def add(self, index: int, mp478: np.ndarray | None, lmk68: np.ndarray | None = None) -> None:
        if self._scout is None:
            raise RuntimeError("Survey.begin first")
        started = time.perf_counter()
        frame = self._scout.track(mp478, lmk68, timestamp=index / self._fps)
        if frame.valid:
            self.candidates.append(index)
            self._features.append(diversity_feature(frame.pose, frame.exp))
        self._added += 1
        self.seconds += time.perf_counter() - started

    @property
    def surveyed(self) -> int:
        """Frames added so far."""
        return self._added

    def choose(self, count: int) -> list[int]:
        """The ``count`` most diverse frames with a face (fewer when fewer were tracked)."""
        return [self.candidates[i] for i in select_diverse(self._features, count)]


def track_sequence(
    sequence: LandmarkSequence, head: HeadModel, config: TrackerConfig, progress: bool = True,
    smoothing: SmoothingConfig | None = None,
) -> tuple[Tracker, list[dict[str, np.ndarray]], dict[str, float]]:
    """Calibrate on the most diverse frames of the whole sequence, then track every frame, in memory; with
    ``smoothing``, smoothed over the whole sequence as :func:`track_input` does."""
    tracker = Tracker(head, sequence.image_size, config)
    timings: dict[str, float] = {}
    single = calibrate_on_sequence(tracker, sequence, timings, progress)
    if single is not None:
        return tracker, [single], timings
    frames = list(track_frames(tracker, sequence, 0, progress))
    if smoothing is not None:
        frames, _ = smooth_tracked(tracker.rig, sequence, frames, smoothing)
    return tracker, frames, timings


def landmark_fit_error(rig: HeadRig, sequence: LandmarkSequence) -> Callable[[dict[str, np.ndarray]], float]:
    """Stacked reference arrays of ``sequence`` -> the rig's landmarks' mean distance (pixels) to the
    detector's, over the valid frames."""
    observed = rig.targets.pixels(sequence.mp478, sequence.lmk68)

    def error(stacked: dict[str, np.ndarray]) -> float:
        valid = np.asarray(stacked["valid"], dtype=bool).reshape(-1)
        if not valid.any():
            return 0.0
        distances = np.linalg.norm(reference_landmarks(rig, stacked)[valid] - observed[valid], axis=-1)
        return float(np.nanmean(distances))

    return error


def smooth_tracked(
    rig: HeadRig, sequence: LandmarkSequence, frames: list[dict[str, np.ndarray]], smoothing: SmoothingConfig,
) -> tuple[list[dict[str, np.ndarray]], SmoothingConfig]:
    """``track``'s smoothing pass: the tracked frames smoothed over the whole sequence, as strongly as the
    detector's landmarks allow (:func:`engine.smoothing.smooth_within_fit`); and the settings used."""
    fit_error = landmark_fit_error(rig, sequence)
    smoothed, used = smooth_within_fit(stack_reference(frames), smoothing, sequence.fps, fit_error)
    return unstack_reference(smoothed), used


def calibrate_on_sequence(
    tracker: Tracker, sequence: LandmarkSequence, timings: dict[str, float], progress: bool = True,
    survey: Survey | None = None,
) -> dict[str, np.ndarray] | None:
    """Calibrate identity and FOV on the most diverse frames, which a survey pass with the mean identity finds
    (``survey``: one already run over every frame, during detection).

    A single image is fitted on its own: its arrays are returned, as no tracking pass follows.
    """
    if sequence.n_frames == 1:
        mp478, lmk68 = sequence.frame(0)
        if mp478 is None and lmk68 is None:
            raise UserError(f"no face found in {sequence.source}")
        started = time.perf_counter()
        result = tracker.calibrate([(mp478, lmk68)])
        timings["fit_s"] = time.perf_counter() - started
        return tracker.rig.reference_arrays(tracker.frame_from(result.frames.params, float(result.frames.rms_px[0])))
    if survey is None:
        survey = Survey(tracker.rig.head, tracker.config)
        survey.begin(sequence.image_size, sequence.fps)
        for index in tqdm(range(sequence.n_frames), desc="survey", unit="frame", disable=not progress, leave=False):
            survey.add(index, *sequence.frame(index))
    timings["survey_s"] = survey.seconds
    if not survey.candidates:
        raise UserError(f"no face could be tracked in {sequence.source}")
    started = time.perf_counter()
    tracker.calibrate([sequence.frame(i) for i in survey.choose(tracker.config.calibration_frames)])
    timings["calibration_s"] = time.perf_counter() - started
    return None


def track_frames(tracker: Tracker, sequence: LandmarkSequence, start: int = 0, progress: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """Track frames ``start``.. of a calibrated tracker, yielding each frame's reference arrays as it is done."""
    for index in tqdm(range(start, sequence.n_frames), desc="track", unit="frame", disable=not progress, initial=start, total=sequence.n_frames):
        frame = tracker.track(*sequence.frame(index), timestamp=index / sequence.fps)
        yield tracker.rig.reference_arrays(frame)


@dataclass(frozen=True)
class TrackOptions:
    """How :func:`track_input` tracks and what it writes."""

    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    save_vertices: bool = False
    #: The final pass over the whole sequence (None: the per-frame fits are the result).
    smoothing: SmoothingConfig | None = field(default_factory=SmoothingConfig)
    overwrite: bool = False
    """Clear an output folder that holds another job (only files track wrote; anything else is refused)."""
    progress: bool = True


@dataclass
class TrackResult:
    """A finished :func:`track_input`: the calibrated tracker and every frame's reference arrays."""

    out_dir: Path
    tracker: Tracker
    sequence: LandmarkSequence
    results: list[dict[str, np.ndarray]]
    timings: dict[str, float]
    resumed_frames: int
    """Frames an earlier, interrupted run had already written (0 for a fresh run)."""

    @property
    def valid_frames(self) -> int:
        return sum(bool(r["valid"][0]) for r in self.results)


def frame_path(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / f"{index:06d}.npz"


def is_complete(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds a finished track (``meta.json`` is written last)."""
    return (Path(out_dir) / META_FILE).is_file()


def written_frames(out_dir: Path) -> int:
    """How many frame files ``out_dir`` holds (what an interrupted run has kept)."""
    out_dir = Path(out_dir)
    return sum(1 for path in out_dir.iterdir() if _FRAME_FILE.fullmatch(path.name)) if out_dir.is_dir() else 0


def track_input(
    source: str | Path, out_dir: Path, head: HeadModel, landmarker_task: Path | None, options: TrackOptions | None = None
) -> TrackResult:
    """Track a video, image, image folder or landmarks .npz into ``out_dir`` (see the module docstring).

    Resumable: frames, landmarks and calibration already in ``out_dir`` for the same job are reused, so
    calling it again after an interruption continues where it stopped; on a complete folder it only loads.
    ``landmarker_task`` (MediaPipe's model) is needed unless the input is a landmarks file.
    """
    options = options or TrackOptions()
    source, out_dir = str(source), Path(out_dir)
    started = time.perf_counter()
    prepare_output_dir(out_dir, describe_job(source, head, options), options.overwrite)
    timings: dict[str, float] = {}
    # Without a calibration yet, the survey runs while MediaPipe detects the frames that follow.
    survey = None if (out_dir / CALIBRATION_FILE).is_file() else Survey(head, options.tracker)
    sequence = _landmarks(source, out_dir, landmarker_task, timings, options.progress, survey)
    tracker = Tracker(head, sequence.image_size, options.tracker)
    _calibration(tracker, sequence, out_dir, timings, options.progress, survey if survey and survey.surveyed else None)
    results, resumed = _track_and_write(tracker, sequence, out_dir, options, timings)
    if not is_complete(out_dir):
        smoothing = options.smoothing
        if smoothing is not None:
            results, smoothing = _smooth_and_rewrite(tracker, results, sequence, out_dir, options, timings)
        timings["total_s"] = time.perf_counter() - started
        if "mediapipe_ms_per_frame" in timings and resumed == 0:  # the whole job ran now: its rate beside MediaPipe's
            timings["frames_per_second"] = sequence.n_frames / timings["total_s"]
            timings["mediapipe_alone_fps"] = 1e3 / timings["mediapipe_ms_per_frame"]
            log.info(
                "tracked %d frames at %.1f fps (MediaPipe alone: %.1f fps)",
                sequence.n_frames, timings["frames_per_second"], timings["mediapipe_alone_fps"],
            )
        _write_summary(out_dir, tracker, results, sequence, timings, smoothing, tracking_config_tree(options))
    return TrackResult(out_dir, tracker, sequence, results, timings, resumed)


def describe_job(source: str, head: HeadModel, options: TrackOptions) -> dict[str, object]:
    """What makes two runs the same job: the input (path and fingerprint), the model and the options."""
    return {
        "format": "flame-live tracking job",
        "format_version": JOB_FORMAT_VERSION,
        "source": source if "://" in source else str(Path(source).resolve()),
        "input": _fingerprint(source),
        "model_checksum": head.checksum,
        "tracker": to_tree(options.tracker),
        "save_vertices": options.save_vertices,
        "smoothing": None if options.smoothing is None else options.smoothing.describe(),
    }


def tracking_config_tree(options: TrackOptions) -> dict[str, object]:
    """How a result was made, as ``track --config`` reads it (``meta.json``'s ``"config"``): the ``[tracker]`` and
    ``[smoothing]`` tables of ``options`` (``strength = 0``: not smoothed)."""
    return {"tracker": to_tree(options.tracker), "smoothing": to_tree(options.smoothing or SmoothingConfig(strength=0.0))}


def _fingerprint(source: str) -> dict[str, int]:
    """Size and modification time of the input file, or of a folder's files, so a changed input is noticed."""
    path = Path(source)
    if "://" in source or not path.exists():
        return {}
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    stats = [p.stat() for p in files]
    return {"files": len(files), "bytes": sum(s.st_size for s in stats), "modified_ns": max((s.st_mtime_ns for s in stats), default=0)}


def prepare_output_dir(out_dir: Path, job: dict[str, object], overwrite: bool) -> None:
    """Create ``out_dir`` for ``job``, keep it to resume the same job, or refuse (or, with ``overwrite``,
    clear) a folder holding something else. Writes ``job.json``."""
    entries = sorted(out_dir.iterdir()) if out_dir.is_dir() else []
    earlier = _read_job(out_dir / JOB_FILE)
    if entries and earlier != job:
        foreign = [entry.name for entry in entries if not _written_by_track(entry.name)]
        if foreign:
            raise UserError(f"--out {out_dir} holds files that 'track' did not write ({foreign[0]}); choose an empty or new folder")
        if not overwrite:
            if earlier is None:
                what = f"an earlier result without {JOB_FILE}"
            elif earlier.get("source") != job["source"] or earlier.get("input") != job["input"]:
                what = f"the tracking of {earlier.get('source')}" + (" as it was before it changed" if earlier.get("source") == job["source"] else "")
            else:
                changed = [key for key in job if earlier.get(key) != job[key]]
                what = f"a tracking of this input with a different {', '.join(changed)}"
            raise UserError(f"--out {out_dir} already holds {what}; choose another folder, or add --overwrite to replace it")
        log.info("clearing %s (--overwrite)", out_dir)
        for entry in entries:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the output folder {out_dir} ({error.strerror})") from None
    if earlier != job:
        write_json_atomic(out_dir / JOB_FILE, job)


def _written_by_track(name: str) -> bool:
    return name in _OUR_FILES or _FRAME_FILE.fullmatch(name) is not None or name.endswith(".tmp")


def _read_job(path: Path) -> dict[str, object] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _landmarks(
    source: str, out_dir: Path, landmarker_task: Path | None, timings: dict[str, float], progress: bool, survey: Survey | None
) -> LandmarkSequence:
    saved = out_dir / LANDMARKS_FILE
    if Path(source).suffix.lower() == ".npz":
        return load_landmark_file(Path(source))
    if saved.is_file():
        return replace(load_landmark_file(saved), source=source)
    if landmarker_task is None:
        raise UserError(f"{source} needs MediaPipe's face_landmarker.task to find its landmarks")
    started = time.perf_counter()
    sequence, mediapipe_ms = detect_landmarks(source, landmarker_task, progress=progress, survey=survey)
    timings["landmarks_s"] = time.perf_counter() - started
    timings["mediapipe_ms_per_frame"] = sum(mediapipe_ms) / len(mediapipe_ms)
    write_npz_atomic(saved, {"mp478": sequence.mp478, "image_size": np.array(sequence.image_size), "fps": np.array(sequence.fps)})
    return sequence


def _calibration(
    tracker: Tracker, sequence: LandmarkSequence, out_dir: Path, timings: dict[str, float], progress: bool, survey: Survey | None
) -> None:
    saved = out_dir / CALIBRATION_FILE
    if saved.is_file():
        with np.load(saved) as calibration:
            tracker.adopt_calibration(torch.as_tensor(calibration["shape"]), float(calibration["focal"]))
            if "fov_source" in calibration.files:
                tracker.fov_source = str(calibration["fov_source"])
                tracker.fov_log_std = float(calibration["fov_log_std"]) if np.isfinite(calibration["fov_log_std"]) else None
        return
    single = calibrate_on_sequence(tracker, sequence, timings, progress, survey)
    if single is not None:
        write_npz_atomic(frame_path(out_dir, 0), single)
    spread = np.nan if tracker.fov_log_std is None else tracker.fov_log_std
    write_npz_atomic(saved, {
        "shape": tracker.rig.shape.cpu().numpy(), "focal": np.array(tracker.rig.camera.focal),
        "fov_source": np.array(tracker.fov_source), "fov_log_std": np.array(spread),
    })  # fmt: skip


def _track_and_write(
    tracker: Tracker, sequence: LandmarkSequence, out_dir: Path, options: TrackOptions, timings: dict[str, float]
) -> tuple[list[dict[str, np.ndarray]], int]:
    """Load the frames already written, continue the tracker from them, and track and write the rest."""
    results: list[dict[str, np.ndarray]] = []
    while len(results) < sequence.n_frames and frame_path(out_dir, len(results)).is_file():
        results.append(_load_frame(frame_path(out_dir, len(results))))
    resumed = len(results)
    if resumed == sequence.n_frames:
        return results, resumed
    if resumed:
        log.info("resuming %s at frame %d of %d", out_dir, resumed, sequence.n_frames)
        valid = [index for index, arrays in enumerate(results) if bool(arrays["valid"][0])]
        previous = [(index / sequence.fps, tracker.rig.params_from_reference(results[index])) for index in valid[-2:]]
        tracker.resume_after(previous, last_valid=bool(results[-1]["valid"][0]))
    started = time.perf_counter()
    with FrameWriter() as writer:
        for arrays in track_frames(tracker, sequence, resumed, options.progress):
            writer.write(frame_path(out_dir, len(results)), _stored_frame(tracker, arrays, options.save_vertices))
            results.append(arrays)
    timings["tracking_s"] = time.perf_counter() - started
    timings["tracking_ms_per_frame"] = timings["tracking_s"] * 1e3 / (sequence.n_frames - resumed)
    return results, resumed


def _stored_frame(tracker: Tracker, arrays: dict[str, np.ndarray], save_vertices: bool) -> dict[str, np.ndarray]:
    """What a frame file holds: the reference arrays, and with ``save_vertices`` the posed mesh."""
    if not save_vertices:
        return arrays
    return {**arrays, "vertices": posed_vertices(tracker.rig.layer, arrays, space="camera")[None].astype(np.float32)}


class FrameWriter:
    """Writes frame files atomically on a few threads, so that their fsyncs (several milliseconds each on a
    disk) overlap the tracking and each other (the file system commits concurrent ones together).

    At most ``depth`` writes wait. Leaving the ``with`` block, also on Ctrl-C or an error, waits for every
    write already handed over, so an interrupted run keeps a gap-free run of frame files. A failed write is
    raised by the next ``write`` or on leaving.
    """

    def __init__(self, threads: int = 4, depth: int = 64) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="frame writer")
        self._room = threading.BoundedSemaphore(depth)
        self._errors: list[BaseException] = []

    def write(self, path: Path, arrays: dict[str, np.ndarray]) -> None:
        self._raise_failure()
        self._room.acquire()
        future = self._pool.submit(write_npz_atomic, path, arrays)
        future.add_done_callback(self._finished)

    def _finished(self, future: Future) -> None:
        self._room.release()
        if future.exception() is not None:
            self._errors.append(future.exception())

    def _raise_failure(self) -> None:
        if self._errors:
            raise self._errors[0]

    def __enter__(self) -> FrameWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._pool.shutdown(wait=True)
        if exc_info[0] is None:
            self._raise_failure()


def _smooth_and_rewrite(
    tracker: Tracker, results: list[dict[str, np.ndarray]], sequence: LandmarkSequence, out_dir: Path,
    options: TrackOptions, timings: dict[str, float],
) -> tuple[list[dict[str, np.ndarray]], SmoothingConfig]:
    """Smooth the whole sequence and rewrite every frame file; the per-frame fits are kept first. Returns the
    smoothed frames and the smoothing settings used."""
    unsmoothed = out_dir / UNSMOOTHED_FILE
    if unsmoothed.is_file():  # an interrupted smoothing pass: frame files may already be smoothed
        with np.load(unsmoothed, allow_pickle=False) as saved:
            raw = {key: saved[key] for key in saved.files}
    else:
        raw = stack_reference(results)
        write_npz_atomic(unsmoothed, raw)
    started = time.perf_counter()
    smoothed, used = smooth_tracked(tracker.rig, sequence, unstack_reference(raw), options.smoothing)
    with FrameWriter() as writer:
        for index, arrays in enumerate(tqdm(smoothed, desc="smooth", unit="frame", disable=not options.progress, leave=False)):
            writer.write(frame_path(out_dir, index), _stored_frame(tracker, arrays, options.save_vertices))
    timings["smoothing_s"] = time.perf_counter() - started
    return smoothed, used


def _load_frame(path: Path) -> dict[str, np.ndarray]:
    """A written frame's reference arrays (without the posed mesh, which the stacked file does not hold)."""
    with np.load(path, allow_pickle=False) as saved:
        return {key: saved[key] for key in saved.files if key != "vertices"}


def _write_summary(
    out_dir: Path, tracker: Tracker, results: list[dict[str, np.ndarray]], sequence: LandmarkSequence,
    timings: dict[str, float], smoothing: SmoothingConfig | None, config: dict[str, object],
) -> None:
    """``tracking.npz`` and, last, ``meta.json``: ``smoothing`` as used, ``config`` as asked for (``--config``)."""
    write_npz_atomic(out_dir / STACK_FILE, stack_reference(results))
    meta = {
        "format": "flame-live tracking",
        "format_version": FRAME_FORMAT_VERSION,
        "model": tracker.rig.head.describe(),
        "source": sequence.source,
        "image_size": {"height": sequence.image_size[0], "width": sequence.image_size[1]},
        "fps": sequence.fps,
        "frames": len(results),
        "valid_frames": int(sum(bool(r["valid"][0]) for r in results)),
        "fov_deg": float(results[-1]["fov"][0]),
        "fov": tracker.fov_report(),
        "n_shape": tracker.rig.layer.n_shape,
        "n_exp": tracker.rig.layer.n_exp,
        "smoothing": None if smoothing is None else smoothing.describe(),
        "config": config,
        "conventions": "head_pose is zero; cam = (yaw, pitch, roll, x, y, z), world-to-view, radians, "
        "R = Rz(roll) Ry(yaw) Rx(pitch), OpenGL view (y up, -z forward); vertices in OpenCV camera space",
        "timings": timings,
        "torch_threads": torch.get_num_threads(),
        "versions": software_versions(),
    }
    write_json_atomic(out_dir / META_FILE, meta)



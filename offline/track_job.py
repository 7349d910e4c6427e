"""Offline tracking of a video, an image, a folder of images or a landmarks file into per-frame .npz files.

Identity and FOV are calibrated first, on the most diverse of a sample of frames spread over the whole
input (:mod:`offline.identity_survey`: the sampled frames detected up front and tracked with the mean
identity); then one pass over the input overlaps decoding (a thread), MediaPipe (a process of its own, a
few frames in flight, fed by this thread) and tracking with that identity frozen, warm-started, without the
live output filter (a thread at a lower priority, which yields the cores to MediaPipe), each frame tracked as
soon as it is detected. A landmarks file is surveyed whole. Work that can wait (decoding ahead, making and
calibrating the tracker, creating the frame files) runs at a lower priority too.

:func:`track_input` keeps everything as it goes, so an interrupted run keeps its work and the same call
continues it. Output in ``DIR`` (format version in ``meta.json``), in the order it is written:

- ``job.json``: what is tracked (input path and fingerprint, model checksum, options); a folder holding
  another job is refused, and cleared only on request (``overwrite``);
- ``calibration.npz``: the identity (``shape``) and focal length (pixels) every frame is tracked with, and
  where the focal length comes from (``fov_source``: given, estimated, default) with how well the frames
  determined it (``fov_log_std``);
- ``fits-{first:06d}-{end:06d}.npz``: the per-frame fits as they are tracked, a few frames per file
  (:mod:`offline.fit_journal`); what an interrupted run keeps, removed once written elsewhere;
- ``landmarks.npz``: MediaPipe's landmarks of every frame, in the landmarks-file format ``track`` reads;
- ``unsmoothed.npz``: the per-frame fits stacked, before smoothing (without smoothing it is not written).
  The smoothing pass (:mod:`engine.smoothing`, past and future frames) starts from it, also after an
  interruption;
- ``{frame:06d}.npz``: the reference tracker's keys (``shape exp head_pose jaw_pose neck_pose eye_pose
  cam fov K``, leading dimension 1), ``valid``, ``format_version``, ``model_checksum``, and with
  ``save_vertices`` the posed mesh in camera space; one file per frame, each written once (atomically, made
  durable together by one sync of the file system);
- ``tracking.npz``: the final frames' arrays stacked over frames;
- ``meta.json``: model files and checksums, image size, fps, FOV, versions and timings. Written last and
  atomically: a folder with ``meta.json`` holds a complete result (:func:`is_complete`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from engine.atomic import write_json_atomic, write_npz_atomic
from engine.config import to_tree
from engine.cpu_priority import lower_thread_priority
from engine.errors import UserError
from engine.evaluation import reference_landmarks
from engine.export import posed_vertices
from engine.frames import FRAME_FORMAT_VERSION, stack_reference, unstack_reference
from engine.head_model import HeadModel
from engine.landmarks import N_LANDMARKS, LandmarkerConfig
from engine.rig import HeadRig
from engine.smoothing import SmoothingConfig, smooth_within_fit
from engine.tracker import Tracker, TrackerConfig
from engine.versions import software_versions
from offline.fit_journal import FitJournal, discard_journal, is_chunk_file, journaled_frames, read_journal
from offline.frame_files import FilePreparer, write_npz_files
from offline.identity_survey import SURVEY_SAMPLES, Survey, frame_count, sample_indices, survey_samples

if TYPE_CHECKING:
    from realtime.detection_process import DetectionProcess

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
JOB_FORMAT_VERSION = 3
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


def _video_mode(source: str, independent: bool) -> str:
    """MediaPipe's mode for ``source``: a single image, or ``independent``, is detected as an image."""
    suffix = Path(source).suffix.lower()
    single_image = Path(source).is_file() and suffix in {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff"}
    return "image" if single_image or independent else "video"


def probe_source(source: str) -> tuple[tuple[int, int], float]:
    """A video's, image's or folder's (height, width) and frame rate (25 when it states none)."""
    from realtime.sources import open_source

    with open_source(source, realtime=False) as probe:
        width, height = probe.size
        return (height, width), float(probe.fps or 25.0)


def iter_detections(
    source: str, detector: DetectionProcess, image_size: tuple[int, int], fps: float, mode: str, max_frames: int | None = None
) -> Iterator[tuple[int, np.ndarray | None, float]]:
    """Each frame's (index, MediaPipe's 478 points in float64 pixels or None, MediaPipe's milliseconds), in
    order, from ``detector`` (MediaPipe's process, made for ``image_size`` and ``mode``). Three things overlap:
    decoding (a thread), MediaPipe (a few frames in flight) and the caller's work on each frame, done while
    the frames after it are being detected."""
    from realtime.sources import iter_frames, read_ahead

    height, width = image_size
    collected = 0

    def take() -> tuple[int, np.ndarray | None, float]:
        nonlocal collected
        detection = detector.collect()
        found = detection.observation
        collected += 1
        return collected - 1, None if found is None else found.points.astype(np.float64), detection.mediapipe_ms

    for frame in read_ahead(iter_frames(source), depth=8, background=True):  # MediaPipe wins the cores
        if max_frames is not None and frame.index >= max_frames:
            break
        if frame.image.shape[:2] != (height, width):
            raise UserError(
                f"{source}: image {frame.index + 1} is {frame.image.shape[1]}x{frame.image.shape[0]} but the first is "
                f"{width}x{height}; one run tracks one camera, so put the images of each size in a folder of their own"
            )
        if detector.in_flight == detector.slots:
            yield take()
        detector.submit(frame.image, None if mode == "image" else int(round(frame.index * 1000 / fps)))
    while detector.in_flight:
        yield take()


def detect_landmarks(
    source: str, task_path: Path, max_frames: int | None = None, progress: bool = True, independent: bool = False,
) -> tuple[LandmarkSequence, list[float]]:
    """Run MediaPipe over every frame (or the first ``max_frames``) of a video, image or image folder.

    A video is tracked in MediaPipe's video mode (each frame starts from the previous frame's face; its
    landmarks trail motion), unless ``independent``: every frame is then detected on its own, as a single
    image (slower and noisier, but without the lag). Also returns MediaPipe's own milliseconds per frame.
    """
    image_size, fps = probe_source(source)
    points: list[np.ndarray] = []
    timings: list[float] = []
    from realtime.detection_process import DetectionProcess

    mode = _video_mode(source, independent)
    with DetectionProcess(LandmarkerConfig(task_path, running_mode=mode), image_size) as detector:
        detections = iter_detections(source, detector, image_size, fps, mode, max_frames)
        for _, found, mediapipe_ms in tqdm(detections, desc="landmarks", unit="frame", leave=False, total=max_frames, disable=not progress):
            points.append(np.full((N_LANDMARKS, 2), np.nan) if found is None else found)
            timings.append(mediapipe_ms)
    if not points:
        raise UserError(f"{source} holds no frames")
    return LandmarkSequence(np.stack(points), None, image_size, fps, source), timings


def track_sequence(
    sequence: LandmarkSequence, head: HeadModel, config: TrackerConfig, progress: bool = True,
    smoothing: SmoothingConfig | None = None, landmarker_task: Path | None = None,
) -> tuple[Tracker, list[dict[str, np.ndarray]], dict[str, float]]:
    """Calibrate, then track every frame, in memory; with ``smoothing``, smoothed over the whole sequence as
    :func:`track_input` does. With ``landmarker_task``, calibrated as ``track`` calibrates a video (on a
    sample of the frames of ``sequence.source`` up to ``sequence.n_frames``, detected up front);
    otherwise on the survey of every frame, as for a landmarks file."""
    tracker = Tracker(head, sequence.image_size, config)
    timings: dict[str, float] = {}
    if landmarker_task is not None and sequence.n_frames > 1:
        from realtime.detection_process import DetectionProcess

        survey = Survey(head, config, sequence.image_size, sequence.fps)
        indices = sample_indices(sequence.n_frames, SURVEY_SAMPLES)
        with DetectionProcess(LandmarkerConfig(landmarker_task, running_mode="video"), sequence.image_size) as detector:
            survey_samples(sequence.source, detector, indices, sequence.image_size, sequence.fps, survey)
        calibrate_on_survey(tracker, survey, sequence.source, timings)
    else:
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


def calibrate_on_survey(tracker: Tracker, survey: Survey, source: str, timings: dict[str, float]) -> None:
    """Calibrate identity and FOV on the most diverse frames of ``survey``."""
    timings["survey_s"] = survey.seconds
    if not survey.candidates:
        raise UserError(f"no face could be tracked in {source}")
    started = time.perf_counter()
    tracker.calibrate([survey.landmarks[i] for i in survey.choose(tracker.config.calibration_frames)])
    timings["calibration_s"] = time.perf_counter() - started


def calibrate_on_sequence(
    tracker: Tracker, sequence: LandmarkSequence, timings: dict[str, float], progress: bool = True
) -> dict[str, np.ndarray] | None:
    """Calibrate identity and FOV on the most diverse frames, which a survey of every frame with the mean
    identity finds.

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
    survey = Survey(tracker.rig.head, tracker.config, sequence.image_size, sequence.fps)
    for index in tqdm(range(sequence.n_frames), desc="survey", unit="frame", disable=not progress, leave=False):
        survey.add(index, *sequence.frame(index))
    calibrate_on_survey(tracker, survey, sequence.source, timings)
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
    """How many frames ``out_dir`` keeps: the frames an interrupted run tracked (its journal, or its stacked
    fits once every frame was tracked), or the frame files of a finished one."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return 0
    files = sum(1 for path in out_dir.iterdir() if _FRAME_FILE.fullmatch(path.name))
    return max(files, journaled_frames(out_dir), _stacked_frames(out_dir / UNSMOOTHED_FILE))


def track_input(
    source: str | Path, out_dir: Path, head: HeadModel, landmarker_task: Path | None, options: TrackOptions | None = None
) -> TrackResult:
    """Track a video, image, image folder or landmarks .npz into ``out_dir`` (see the module docstring).

    Resumable: the calibration and the frames already tracked in ``out_dir`` for the same job are reused, so
    calling it again after an interruption continues where it stopped; on a complete folder it only loads.
    ``landmarker_task`` (MediaPipe's model) is needed unless the input is a landmarks file.
    """
    options = options or TrackOptions()
    source, out_dir = str(source), Path(out_dir)
    started = time.perf_counter()
    prepare_output_dir(out_dir, describe_job(source, head, options), options.overwrite)
    timings: dict[str, float] = {}
    if is_complete(out_dir):
        return _load_complete(source, out_dir, head, options)
    results = _kept_fits(out_dir)
    resumed = len(results)
    if resumed:
        log.info("resuming %s after %d tracked frames", out_dir, resumed)
    sequence = _saved_landmarks(source, out_dir)
    if sequence is None and landmarker_task is None:
        raise UserError(f"{source} needs MediaPipe's face_landmarker.task to find its landmarks")
    n_frames = None if sequence is not None else frame_count(source)
    if sequence is None and (n_frames is None or n_frames < 2):  # one image, or a stream of unknown length
        sequence = _detect_all(source, out_dir, landmarker_task, timings, options.progress)
    # Started with the pass over a video, which waits on MediaPipe; what no frame file used goes at the end.
    frame_files = FilePreparer([frame_path(out_dir, index) for index in range(n_frames or 0)])
    try:
        if sequence is not None:
            tracker = Tracker(head, sequence.image_size, options.tracker)
            single = _calibration_from_sequence(tracker, sequence, out_dir, timings, options.progress)
            results = [single] if single is not None else _track_known(tracker, sequence, out_dir, results, options, timings)
        else:
            sequence, tracker = _detect_and_track(source, out_dir, head, landmarker_task, n_frames, results, options, timings, frame_files)
        smoothing = options.smoothing
        if smoothing is not None:
            results, smoothing = _smooth(tracker, results, sequence, out_dir, options, timings)
        frame_files.stop()
        _write_frame_files(out_dir, tracker, results, options, timings)
    finally:
        frame_files.discard()
    timings["total_s"] = time.perf_counter() - started
    if "mediapipe_ms_per_frame" in timings and resumed == 0:  # the whole job ran now: its rate beside MediaPipe's
        timings["frames_per_second"] = sequence.n_frames / timings["total_s"]
        timings["mediapipe_alone_fps"] = 1e3 / timings["mediapipe_ms_per_frame"]
        log.info(
            "tracked %d frames at %.1f fps (MediaPipe alone: %.1f fps)",
            sequence.n_frames, timings["frames_per_second"], timings["mediapipe_alone_fps"],
        )
    _write_summary(out_dir, tracker, results, sequence, timings, smoothing, tracking_config_tree(options))
    discard_journal(out_dir)
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
    return name in _OUR_FILES or _FRAME_FILE.fullmatch(name) is not None or is_chunk_file(name) or name.endswith(".tmp")


def _read_job(path: Path) -> dict[str, object] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _load_stacked(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as saved:
        return {key: saved[key] for key in saved.files}


def _stacked_frames(path: Path) -> int:
    """Frames in a stacked .npz (0 when there is none)."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            return len(saved["valid"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return 0


def _load_complete(source: str, out_dir: Path, head: HeadModel, options: TrackOptions) -> TrackResult:
    """A finished folder, loaded: its landmarks, calibration and final frames."""
    discard_journal(out_dir)  # left by a run stopped just after meta.json
    sequence = _saved_landmarks(source, out_dir)
    if sequence is None:
        raise UserError(f"{out_dir} is complete but its {LANDMARKS_FILE} is missing; add --overwrite to track again")
    tracker = Tracker(head, sequence.image_size, options.tracker)
    _load_calibration(tracker, out_dir)
    results = unstack_reference(_load_stacked(out_dir / STACK_FILE))
    return TrackResult(out_dir, tracker, sequence, results, {}, len(results))


def _kept_fits(out_dir: Path) -> list[dict[str, np.ndarray]]:
    """The per-frame fits an interrupted run kept: all of them stacked (the smoothing pass was next), or its journal."""
    unsmoothed = out_dir / UNSMOOTHED_FILE
    if unsmoothed.is_file():
        return unstack_reference(_load_stacked(unsmoothed))
    return read_journal(out_dir)


def _saved_landmarks(source: str, out_dir: Path) -> LandmarkSequence | None:
    """The landmarks of every frame when known: a landmarks file's, or those an earlier run detected."""
    if Path(source).suffix.lower() == ".npz":
        return load_landmark_file(Path(source))
    saved = out_dir / LANDMARKS_FILE
    return replace(load_landmark_file(saved), source=source) if saved.is_file() else None


def _save_landmarks(out_dir: Path, sequence: LandmarkSequence) -> None:
    write_npz_atomic(out_dir / LANDMARKS_FILE, {"mp478": sequence.mp478, "image_size": np.array(sequence.image_size), "fps": np.array(sequence.fps)})


def _detect_all(source: str, out_dir: Path, landmarker_task: Path, timings: dict[str, float], progress: bool) -> LandmarkSequence:
    """Every frame's landmarks first (one image, or an input whose length is not known up front)."""
    started = time.perf_counter()
    sequence, mediapipe_ms = detect_landmarks(source, landmarker_task, progress=progress)
    timings["landmarks_s"] = time.perf_counter() - started
    timings["mediapipe_ms_per_frame"] = sum(mediapipe_ms) / len(mediapipe_ms)
    _save_landmarks(out_dir, sequence)
    return sequence


def _load_calibration(tracker: Tracker, out_dir: Path) -> bool:
    """Adopt the identity and focal length saved in ``out_dir``; False when there are none yet."""
    saved = out_dir / CALIBRATION_FILE
    if not saved.is_file():
        return False
    with np.load(saved) as calibration:
        tracker.adopt_calibration(torch.as_tensor(calibration["shape"]), float(calibration["focal"]))
        if "fov_source" in calibration.files:
            tracker.fov_source = str(calibration["fov_source"])
            tracker.fov_log_std = float(calibration["fov_log_std"]) if np.isfinite(calibration["fov_log_std"]) else None
    return True


def _save_calibration(tracker: Tracker, out_dir: Path) -> None:
    spread = np.nan if tracker.fov_log_std is None else tracker.fov_log_std
    write_npz_atomic(out_dir / CALIBRATION_FILE, {
        "shape": tracker.rig.shape.cpu().numpy(), "focal": np.array(tracker.rig.camera.focal),
        "fov_source": np.array(tracker.fov_source), "fov_log_std": np.array(spread),
    })  # fmt: skip


def _calibration_from_sequence(
    tracker: Tracker, sequence: LandmarkSequence, out_dir: Path, timings: dict[str, float], progress: bool
) -> dict[str, np.ndarray] | None:
    """Calibrate on landmarks known up front (or adopt the saved calibration); a single image's fit is
    returned (and journaled), as no tracking pass follows."""
    if _load_calibration(tracker, out_dir):
        return None
    single = calibrate_on_sequence(tracker, sequence, timings, progress)
    if single is not None:
        with FitJournal(out_dir, 0) as journal:
            journal.add(single)
    _save_calibration(tracker, out_dir)
    return single


def _resume_tracker(tracker: Tracker, results: list[dict[str, np.ndarray]], fps: float) -> None:
    """Continue a calibrated tracker after the frames an interrupted run kept (warm start, filters)."""
    valid = [index for index, arrays in enumerate(results) if bool(arrays["valid"][0])]
    previous = [(index / fps, tracker.rig.params_from_reference(results[index])) for index in valid[-2:]]
    tracker.resume_after(previous, last_valid=bool(results[-1]["valid"][0]))


def _track_known(
    tracker: Tracker, sequence: LandmarkSequence, out_dir: Path, results: list[dict[str, np.ndarray]], options: TrackOptions,
    timings: dict[str, float],
) -> list[dict[str, np.ndarray]]:
    """Track the frames of known landmarks after those kept, journaling each."""
    if len(results) >= sequence.n_frames:
        return results
    if results:
        _resume_tracker(tracker, results, sequence.fps)
    started = time.perf_counter()
    with FitJournal(out_dir, len(results)) as journal:
        for arrays in track_frames(tracker, sequence, len(results), options.progress):
            journal.add(arrays)
            results.append(arrays)
    timings["tracking_s"] = time.perf_counter() - started
    return results


class _CalibratedTracker:
    """The tracker of a video or image folder, made on a thread of its own once the main pass has its first
    detection (:meth:`begin`), while the pass goes on (making it loads the solver's compiled kernels: a second
    or two), then calibrated there on a sample of the input (:mod:`offline.identity_survey`), or given the
    calibration saved in ``out_dir`` and continued after the frames an interrupted run kept."""

    def __init__(
        self, head: HeadModel, config: TrackerConfig, source: str, landmarker_task: Path, n_frames: int,
        image_size: tuple[int, int], fps: float, out_dir: Path, kept: list[dict[str, np.ndarray]], timings: dict[str, float],
    ) -> None:
        self.tracker: Tracker | None = None
        self._begun = threading.Event()
        self._abandoned = False
        self._calibrated = False
        self._done = threading.Event()
        self._outcome: Future[bool] = Future()
        arguments = (head, config, source, landmarker_task, n_frames, image_size, fps, out_dir, kept, timings)
        threading.Thread(target=self._run, args=arguments, name="calibration", daemon=True).start()

    def _run(
        self, head: HeadModel, config: TrackerConfig, source: str, landmarker_task: Path, n_frames: int,
        image_size: tuple[int, int], fps: float, out_dir: Path, kept: list[dict[str, np.ndarray]], timings: dict[str, float],
    ) -> None:
        try:
            # MediaPipe's main process starts first, alone, and answers its first frame: it sets the pace of the
            # whole pass, and starting the survey's process and making the trackers beside it delayed that first
            # frame by about half a second.
            self._begun.wait()
            if self._abandoned:
                self._outcome.set_result(False)
                return
            if (out_dir / CALIBRATION_FILE).is_file():
                lower_thread_priority()  # see below
                tracker = Tracker(head, image_size, config)
                _load_calibration(tracker, out_dir)
                if kept:
                    _resume_tracker(tracker, kept, fps)
                self.tracker = tracker
                self._outcome.set_result(True)
                return
            started = time.perf_counter()
            # The survey's MediaPipe starts while both trackers are made, in the background: the main pass's
            # MediaPipe sets the pace of the whole job, the survey need only finish well before it does.
            survey_detector = _start_detector(LandmarkerConfig(landmarker_task, running_mode="video"), image_size, background=True)
            # Making the trackers (loading the solver's kernels), decoding the sample and calibrating can wait
            # too: this thread yields the cores to MediaPipe's main process whenever both want them. Lowered
            # only now, as the survey's process would otherwise start lower still and could starve on a busy machine.
            lower_thread_priority()
            with _opened(survey_detector) as starting:
                tracker = Tracker(head, image_size, config)
                survey = Survey(head, config, image_size, fps)
                survey_samples(source, starting.result(), sample_indices(n_frames, SURVEY_SAMPLES), image_size, fps, survey)
            timings["sampled_survey_s"] = time.perf_counter() - started
            self.tracker = tracker
            if survey.candidates:
                calibrate_on_survey(tracker, survey, source, timings)
                _save_calibration(tracker, out_dir)
            self._outcome.set_result(bool(survey.candidates))
        except BaseException as error:  # noqa: BLE001 - raised in the main thread by ready()/wait()
            self._outcome.set_exception(error)
        finally:
            self._done.set()

    def begin(self) -> None:
        """Make and calibrate the tracker now (the main pass has its first detection)."""
        self._begun.set()

    def __enter__(self) -> _CalibratedTracker:
        return self

    def __exit__(self, error_type: type[BaseException] | None, *details: object) -> None:
        """A pass that ends by an error (or Ctrl-C) before its first detection makes nothing: no survey process
        is started for a process about to end."""
        if error_type is not None:
            self._abandoned = True
            self._begun.set()

    def ready(self) -> bool:
        """Whether the tracker is made and calibrated (an error on the thread is raised here)."""
        if not self._calibrated and self._done.is_set():
            self._calibrated = self._outcome.result()
        return self._calibrated

    def wait(self) -> Tracker:
        """The tracker, once made and surveyed (uncalibrated when no sampled frame showed a face)."""
        self._done.wait()
        self.ready()
        return self.tracker

    def calibrated_otherwise(self) -> None:
        """The tracker was calibrated another way (on every frame, when the sample showed no face)."""
        self._calibrated = True


def _start_detector(config: LandmarkerConfig, image_size: tuple[int, int], background: bool = False) -> Future:
    """MediaPipe's process, started on a thread (it takes a second or two to load) while the caller goes on;
    ``background``: at a lower CPU priority (:class:`DetectionProcess`)."""
    from realtime.detection_process import DetectionProcess

    started: Future = Future()

    def start() -> None:
        try:
            started.set_result(DetectionProcess(config, image_size, background=background))
        except BaseException as error:  # noqa: BLE001 - raised by started.result()
            started.set_exception(error)

    threading.Thread(target=start, name="start MediaPipe", daemon=True).start()
    return started


@contextlib.contextmanager
def _opened(starting: Future) -> Iterator[Future]:
    """The process :func:`_start_detector` starts (``starting.result()``), closed on leaving: at once if it has
    started, or as soon as it has (the caller may leave before)."""
    try:
        yield starting
    finally:
        starting.add_done_callback(lambda started: started.exception() is None and started.result().close())


#: Detected frames the fitting stage waits for before it fits them, one after the other: a thread woken for
#: each frame finds its caches cold every time (MediaPipe ran on the core in between).
FIT_BATCH = 8


class _FittingStage:
    """The pass's fitting stage: tracks each detected frame (appended to ``points`` by the caller) after those in
    ``results``, journaling each and appending it to ``results``, on a thread of its own at a lower priority.
    MediaPipe's main process sets the pace of the pass, so this thread yields it the cores whenever both want
    them, and the caller's thread only keeps MediaPipe fed.

    :meth:`start` (once the tracker is calibrated) tracks the frames detected so far, then those announced by
    :meth:`detected`, :data:`FIT_BATCH` at a time; :meth:`finish` waits for every frame in ``points``. Leaving
    the ``with`` block (also on Ctrl-C or an error) stops after the frame being tracked and waits for it, so the
    journal holds every frame in ``results``. An error on the thread is raised by the next call.
    """

    def __init__(
        self, points: list[np.ndarray], results: list[dict[str, np.ndarray]], journal: FitJournal, bar: tqdm, fps: float
    ) -> None:
        self._points, self._results, self._journal, self._bar, self._fps = points, results, journal, bar, fps
        self._changed = threading.Condition()
        self._ending = self._stopping = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.seconds = 0.0  # spent tracking

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self, tracker: Tracker) -> None:
        self._thread = threading.Thread(target=self._run, args=(tracker,), name="fitting", daemon=True)
        self._thread.start()

    def detected(self) -> None:
        """A frame was appended to ``points``."""
        self._raise_failure()
        with self._changed:
            self._changed.notify()

    def finish(self) -> None:
        """Wait until every frame in ``points`` is tracked."""
        with self._changed:
            self._ending = True
            self._changed.notify()
        if self._thread is not None:
            self._thread.join()
        self._raise_failure()

    def _run(self, tracker: Tracker) -> None:
        lower_thread_priority()
        try:
            while True:
                with self._changed:
                    while len(self._points) - len(self._results) < FIT_BATCH and not (self._ending or self._stopping):
                        self._changed.wait()
                    if self._stopping or len(self._results) >= len(self._points):
                        return
                    end = len(self._points)
                begun = time.perf_counter()
                for index in range(len(self._results), end):
                    observed = self._points[index]
                    frame = tracker.track(None if np.isnan(observed).all() else observed, None, timestamp=index / self._fps)
                    arrays = tracker.rig.reference_arrays(frame)
                    self._journal.add(arrays)
                    self._results.append(arrays)
                    if self._stopping:
                        break
                self.seconds += time.perf_counter() - begun
                self._bar.update(len(self._results) - self._bar.n)
        except BaseException as error:  # noqa: BLE001 - raised in the caller's thread
            self._error = error

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def __enter__(self) -> _FittingStage:
        return self

    def __exit__(self, error_type: type[BaseException] | None, *details: object) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify()
        if self._thread is not None:
            self._thread.join()
        if error_type is None:
            self._raise_failure()


def _detect_and_track(
    source: str, out_dir: Path, head: HeadModel, landmarker_task: Path, n_frames: int, results: list[dict[str, np.ndarray]],
    options: TrackOptions, timings: dict[str, float], frame_files: FilePreparer,
) -> tuple[LandmarkSequence, Tracker]:
    """One pass over a video or image folder: each frame decoded, detected (video mode) and, once the
    tracker is calibrated, tracked and journaled, appending to ``results``; ``frame_files`` is started with
    the first detection. Frames an interrupted run kept
    are detected again (MediaPipe's video mode continues from each frame's face, so its landmarks are those
    of an uninterrupted run) but not tracked again. Detection starts as soon as MediaPipe has; the tracker
    is made and calibrated meanwhile (:class:`_CalibratedTracker`)."""
    image_size, fps = probe_source(source)
    detector_starting = _start_detector(LandmarkerConfig(landmarker_task, running_mode="video"), image_size)
    calibrating = _CalibratedTracker(
        head, options.tracker, source, landmarker_task, n_frames, image_size, fps, out_dir, list(results), timings
    )
    points: list[np.ndarray] = []
    mediapipe_ms: list[float] = []
    started = time.perf_counter()
    with calibrating as calibration, _opened(detector_starting) as starting, FitJournal(out_dir, len(results)) as journal, tqdm(
        desc="track", unit="frame", total=n_frames, initial=len(results), disable=not options.progress
    ) as bar, _FittingStage(points, results, journal, bar, fps) as fitting:
        for _, found, milliseconds in iter_detections(source, starting.result(), image_size, fps, "video"):
            if not points:  # MediaPipe's start-up, the part of the pass when nothing is detected yet
                timings["first_detection_s"] = time.perf_counter() - started
                calibration.begin()
                frame_files.start()
            points.append(np.full((N_LANDMARKS, 2), np.nan) if found is None else found)
            mediapipe_ms.append(milliseconds)
            if fitting.started:
                fitting.detected()
            elif calibration.ready():
                fitting.start(calibration.tracker)
        if not points:
            raise UserError(f"{source} holds no frames")
        sequence = LandmarkSequence(np.stack(points), None, image_size, fps, source)
        tracker = calibration.wait()
        if not calibration.ready():  # no face in the sample: survey every frame, now that all are detected
            calibrate_on_sequence(tracker, sequence, timings, options.progress)
            _save_calibration(tracker, out_dir)
            calibration.calibrated_otherwise()
        if not fitting.started:
            fitting.start(tracker)
        fitting.finish()
    timings["stream_s"] = time.perf_counter() - started
    timings["tracking_s"] = fitting.seconds
    timings["mediapipe_ms_per_frame"] = sum(mediapipe_ms) / len(mediapipe_ms)
    _save_landmarks(out_dir, sequence)
    return sequence, tracker


def _smooth(
    tracker: Tracker, results: list[dict[str, np.ndarray]], sequence: LandmarkSequence, out_dir: Path, options: TrackOptions,
    timings: dict[str, float],
) -> tuple[list[dict[str, np.ndarray]], SmoothingConfig]:
    """Keep the per-frame fits stacked (``unsmoothed.npz``, from which an interrupted run smooths again), then
    smooth the whole sequence. Returns the smoothed frames and the smoothing settings used."""
    unsmoothed = out_dir / UNSMOOTHED_FILE
    if not unsmoothed.is_file():
        write_npz_atomic(unsmoothed, stack_reference(results))
    discard_journal(out_dir)
    started = time.perf_counter()
    smoothed, used = smooth_tracked(tracker.rig, sequence, results, options.smoothing)
    timings["smoothing_s"] = time.perf_counter() - started
    return smoothed, used


def _write_frame_files(
    out_dir: Path, tracker: Tracker, frames: list[dict[str, np.ndarray]], options: TrackOptions, timings: dict[str, float]
) -> None:
    """Every frame's file, each written once (atomically), then made durable together by one sync of the file
    system (:func:`offline.frame_files.write_npz_files`): what they hold is kept durably already (journal or
    ``unsmoothed.npz``), and the folder is complete only once ``meta.json`` follows."""
    started = time.perf_counter()
    shown = tqdm(frames, desc="write", unit="frame", disable=not options.progress, leave=False)
    files = ((frame_path(out_dir, index), _stored_frame(tracker, arrays, options.save_vertices)) for index, arrays in enumerate(shown))
    write_npz_files(out_dir, files)
    timings["frame_files_s"] = time.perf_counter() - started


def _stored_frame(tracker: Tracker, arrays: dict[str, np.ndarray], save_vertices: bool) -> dict[str, np.ndarray]:
    """What a frame file holds: the reference arrays, and with ``save_vertices`` the posed mesh."""
    if not save_vertices:
        return arrays
    return {**arrays, "vertices": posed_vertices(tracker.rig.layer, arrays, space="camera")[None].astype(np.float32)}


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



"""Offline photometric refinement of a tracked video or a recorded live session into per-frame .npz files.

Identity (shape, albedo, lighting) is fitted once on the most diverse tracked frames (keyframes); then every
frame is refined in windows of consecutive frames with that identity fixed, each window tied to the last
refined frame before it, so temporal smoothness runs across the whole sequence. Output in ``DIR``
(format version in ``meta.json``):

- ``identity.npz``: ``shape``, ``tex`` (texture-space coefficients, or the estimated albedo values), ``light``
  (9, 3) SH coefficients; written first, reused when a run is resumed;
- ``{frame:06d}.npz``: the reference format of ``offline.track_job`` plus ``tex``, ``light`` and
  ``image_error``; frames whose file exists are skipped, so an interrupted run resumes where it stopped;
- ``texture.png`` (the albedo UV map, when the model has UVs), ``tracking.npz`` (all frames), ``meta.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from engine.camera import FLIP
from engine.errors import UserError
from engine.flame import rodrigues
from engine.photometric import FrameState, PhotometricConfig, PhotometricFitter
from engine.tracker import Tracker, diversity_feature, params_from_reference, reference_arrays, select_diverse
from offline.track_job import write_npz_atomic

log = logging.getLogger(__name__)

REFINE_FORMAT_VERSION = 1
IDENTITY_FILE = "identity.npz"
_FLIP = np.array(FLIP)

#: One frame's input: RGB image, MediaPipe 478 landmarks (pixels, NaN unobserved) or None.
FrameInput = tuple[np.ndarray, np.ndarray | None]


@dataclass
class RefineOptions:
    photometric: PhotometricConfig = field(default_factory=PhotometricConfig)
    keyframes: int = 8
    window: int = 8


def state_from_reference(tracker: Tracker, arrays: dict[str, np.ndarray]) -> FrameState | None:
    """A frame's parameters from the reference-format arrays of ``track_job`` (None when not valid)."""
    if not bool(arrays["valid"][0]):
        return None
    params = params_from_reference(tracker, arrays)
    return FrameState(params.exp, params.pose(), params.transl)


def state_from_message(tracker: Tracker, message: dict) -> FrameState | None:
    """A frame's parameters from a recorded ``flame.frame`` message (None when not valid)."""
    if not message.get("valid"):
        return None
    exp = np.zeros(tracker.layer.n_exp)
    recorded = np.asarray(message["exp"], dtype=np.float64)[: tracker.layer.n_exp]
    exp[: recorded.size] = recorded
    rotation = np.diag(_FLIP) @ cv2.Rodrigues(np.asarray(message["head_rot"], dtype=np.float64))[0]
    pose = np.zeros((tracker.layer.n_joints, 3))
    pose[0] = cv2.Rodrigues(rotation)[0][:, 0]
    pose[1], pose[2] = message["neck_pose"], message["jaw_pose"]
    if tracker.layer.n_joints >= 5:
        pose[3:5] = np.asarray(message["eye_pose"]).reshape(2, 3)
    root = tracker.root_rest_joint(exp)
    transl = _FLIP * np.asarray(message["head_trans"], dtype=np.float64) - root + rotation @ root
    return _state(tracker, exp, pose, transl)


def _state(tracker: Tracker, exp: np.ndarray, pose: np.ndarray, transl: np.ndarray) -> FrameState:
    options = {"device": tracker.shape.device, "dtype": tracker.shape.dtype}
    return FrameState(torch.as_tensor(exp[None], **options), torch.as_tensor(pose[None], **options),
                      torch.as_tensor(transl[None], **options))


class SequenceRefiner:
    """Refines one sequence into an output folder; see the module docstring."""

    def __init__(self, tracker: Tracker, out_dir: Path, options: RefineOptions | None = None, fps: float | None = None) -> None:
        self.tracker = tracker
        self.out_dir = Path(out_dir)
        self.options = options or RefineOptions()
        self.fps = fps  # of the frames, recorded in meta.json so the sequence can be animated at its own rate
        self.fitter = PhotometricFitter(tracker, self.options.photometric)
        self.timings: dict[str, float] = {}

    def run(
        self, states: list[FrameState | None], frames: Callable[[], Iterator[FrameInput]], progress: bool = True
    ) -> dict[str, float]:
        """Refine every frame. ``frames()`` yields each frame's (image, landmarks) in order, once per call."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        valid = [i for i, s in enumerate(states) if s is not None]
        if not valid:
            raise UserError("no frame of the input was tracked, so there is nothing to refine")
        self._identity(states, valid, frames)
        self.tracker.adopt_identity(self.fitter.shape)
        started = time.perf_counter()
        refined = self._refine_frames(states, frames, progress)
        self.timings["frames_s"] = time.perf_counter() - started
        self.timings["seconds_per_frame"] = self.timings["frames_s"] / max(refined, 1)
        self._write_summary(len(states))
        return self.timings

    # ---------------------------------------------------------------------------------------------- identity
    def _identity(self, states: list[FrameState | None], valid: list[int], frames: Callable[[], Iterator[FrameInput]]) -> None:
        path = self.out_dir / IDENTITY_FILE
        if path.is_file():
            with np.load(path) as saved:
                self.fitter.shape = torch.as_tensor(saved["shape"], dtype=self.fitter.dtype, device=self.fitter.device)
                self.fitter.light = torch.as_tensor(saved["light"], dtype=self.fitter.dtype, device=self.fitter.device)
                self.fitter.appearance.load_state(saved["tex"])
            log.info("resuming with the identity in %s", path)
            return
        started = time.perf_counter()
        features = [diversity_feature(states[i].pose[0].cpu().numpy(), states[i].exp[0].cpu().numpy()) for i in valid]
        chosen = {valid[k] for k in select_diverse(features, self.options.keyframes)}
        images, landmarks, chosen_states = [], [], []
        for index, (image, points) in enumerate(frames()):
            if index in chosen:
                chosen.discard(index)
                if points is not None and np.isfinite(points).all(axis=1).any():
                    images.append(image)
                    landmarks.append(points)
                    chosen_states.append(states[index])
            if not chosen:
                break
        if not images:
            raise UserError("the keyframes have no landmarks: the session cannot be refined")
        log.info("fitting identity, albedo and light on %d keyframes (the longest single step; a minute or more on a busy CPU)", len(images))
        batch = self.fitter.prepare(images, landmarks)
        result = self._with_memory_guard(lambda: self.fitter.fit_identity(batch, FrameState.cat(chosen_states)))
        self.timings["identity_s"] = time.perf_counter() - started
        self.timings["identity_image_error"] = float(result.image_error.mean())
        write_npz_atomic(path, {"shape": self.fitter.shape.cpu().numpy(), "tex": self.fitter.appearance.state(),
                           "light": self.fitter.light.cpu().numpy()})
        texture = self.fitter.appearance.texture_image()
        if texture is not None:
            cv2.imwrite(str(self.out_dir / "texture.png"), cv2.cvtColor(texture, cv2.COLOR_RGB2BGR))

    # ------------------------------------------------------------------------------------------------ frames
    def _frame_path(self, index: int) -> Path:
        return self.out_dir / f"{index:06d}.npz"

    def _refine_frames(self, states: list[FrameState | None], frames: Callable[[], Iterator[FrameInput]], progress: bool) -> int:
        window: list[tuple[int, np.ndarray, np.ndarray, FrameState]] = []
        previous: FrameState | None = None
        refined = 0
        bar = tqdm(total=len(states), desc="refine", unit="frame", disable=not progress)
        for index, (image, points) in enumerate(frames()):
            if index >= len(states):
                break
            done = self._frame_path(index).is_file()
            usable = states[index] is not None and points is not None and np.isfinite(points).all(axis=1).any()
            if window and (done or not usable):
                previous = self._flush(window, previous)
                refined += len(window)
                bar.update(len(window))
                window = []
            if done:
                previous = self._load_state(index)
                bar.update(1)
            elif not usable:
                previous = None
                self._write(index, states[index], None)
                bar.update(1)
            else:
                window.append((index, image, points, states[index]))
                if len(window) == self.options.window:
                    previous = self._flush(window, previous)
                    refined += len(window)
                    bar.update(len(window))
                    window = []
        if window:
            self._flush(window, previous)
            refined += len(window)
            bar.update(len(window))
        bar.close()
        return refined

    def _flush(self, window: list, previous: FrameState | None) -> FrameState:
        """Refine one window of consecutive frames, write them, and return the last frame's state."""
        batch = self.fitter.prepare([w[1] for w in window], [w[2] for w in window])
        initial = FrameState.cat([w[3] for w in window])
        result = self._with_memory_guard(lambda: self.fitter.fit_frames(batch, initial, previous))
        for row, (index, *_rest) in enumerate(window):
            self._write(index, result.frames.index(slice(row, row + 1)), float(result.image_error[row]))
        return result.frames.index(slice(len(window) - 1, len(window)))

    def _with_memory_guard(self, fit: Callable):
        try:
            return fit()
        except torch.OutOfMemoryError:
            raise UserError(
                f"the GPU ran out of memory refining {self.options.window} frames at "
                f"{self.options.photometric.size} px; use a smaller --window or --size, or --device cpu"
            ) from None

    def _write(self, index: int, state: FrameState | None, image_error: float | None) -> None:
        if state is None:
            frame = self.tracker.frame_from(self._neutral())
            frame.valid = False
        else:
            frame = self.tracker.frame_from(_frame_params(state))
        arrays = reference_arrays(self.tracker, frame)
        arrays["tex"] = self.fitter.appearance.state()[None].astype(np.float32)
        arrays["light"] = self.fitter.light.cpu().numpy()[None].astype(np.float32)
        arrays["image_error"] = np.array([np.nan if image_error is None else image_error], np.float32)
        write_npz_atomic(self._frame_path(index), arrays)

    def _neutral(self):
        options = {"device": self.fitter.device, "dtype": self.fitter.dtype}
        return _frame_params(FrameState(torch.zeros(1, self.tracker.layer.n_exp, **options),
                                        torch.zeros(1, self.tracker.layer.n_joints, 3, **options),
                                        torch.zeros(1, 3, **options)))

    def _load_state(self, index: int) -> FrameState | None:
        with np.load(self._frame_path(index)) as saved:
            return state_from_reference(self.tracker, {key: saved[key] for key in saved.files})

    def _write_summary(self, n_frames: int) -> None:
        paths = [self._frame_path(i) for i in range(n_frames)]
        loaded = []
        for path in paths:
            with np.load(path) as saved:
                loaded.append({key: saved[key] for key in saved.files})
        write_npz_atomic(self.out_dir / "tracking.npz", {key: np.concatenate([a[key] for a in loaded]) for key in loaded[0]})
        appearance = self.fitter.appearance
        meta = {
            "format": "flame-live photometric refinement",
            "format_version": REFINE_FORMAT_VERSION,
            "model": {"name": self.tracker.head.name, "checksum": self.tracker.head.checksum},
            "frames": n_frames,
            "fps": self.fps,
            "valid_frames": int(sum(bool(a["valid"][0]) for a in loaded)),
            "appearance": {"kind": appearance.kind, "name": appearance.space_name},
            "crop_size": self.options.photometric.size,
            "keyframes": self.options.keyframes,
            "window": self.options.window,
            "light": "9 SH coefficients per RGB channel, DECA's basis order and constants (engine.render)",
            "timings": self.timings,
        }
        (self.out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def _frame_params(state: FrameState):
    from engine.fitting import FrameParams

    return FrameParams(state.exp, rodrigues(state.pose), state.transl)


def refine_video(
    source: str, tracker: Tracker, results: list[dict[str, np.ndarray]], mp478: np.ndarray | None, out_dir: Path,
    options: RefineOptions | None = None, progress: bool = True,
) -> dict[str, float]:
    """Refine a video or image folder tracked by ``track_job.track_sequence`` (its reference arrays)."""
    from realtime.sources import iter_frames, open_source

    if mp478 is None:
        raise UserError("--photometric needs MediaPipe landmarks: give the video or images, not a 68-point landmarks file")
    states = [state_from_reference(tracker, arrays) for arrays in results]

    def frames() -> Iterator[FrameInput]:
        for frame in iter_frames(source):
            if frame.index >= len(mp478):
                return
            yield frame.image, mp478[frame.index]

    with open_source(source, realtime=False) as probe:
        fps = probe.fps
    return SequenceRefiner(tracker, out_dir, options, fps).run(states, frames, progress)


def refine_session(
    session_dir: Path, tracker_factory: Callable[[tuple[int, int], int, int, float], Tracker], out_dir: Path,
    landmarker_task: Path | None, options: RefineOptions | None = None, progress: bool = True,
) -> dict[str, float]:
    """Refine a recorded live session (realtime.session): its video frames and recorded ``flame.frame`` messages.

    ``tracker_factory(image_size (h, w), n_shape, n_exp, fov_deg)`` makes the tracker for the recorded camera.
    Landmarks come from the messages when they were recorded, else MediaPipe runs on the video
    (``landmarker_task``).
    """
    from flame_client.messages import TOPIC_FRAME, TOPIC_SHAPE
    from realtime.session import SessionReader

    reader = SessionReader(session_dir)
    if reader.frame_size is None:
        raise UserError(f"session {session_dir} was recorded without video, which photometric refinement needs")
    messages: dict[int, dict] = {}
    shape: list[float] | None = None
    for record in reader.messages():
        if record.topic == TOPIC_FRAME and record.video_frame is not None:
            messages[record.video_frame] = record.message
        elif record.topic == TOPIC_SHAPE:
            shape = record.message.get("shape")
    if not messages:
        raise UserError(f"session {session_dir} holds no tracked frames with video; it cannot be refined")
    metadata = reader.metadata
    width, height = reader.frame_size
    tracker_info = metadata.get("tracker") or {}
    camera = metadata.get("camera") or {}
    fov = camera.get("fov_deg")
    if not isinstance(fov, int | float):
        raise UserError(f"session {session_dir}: session.json lacks the camera's field of view; the session is incomplete")
    tracker = tracker_factory((height, width), int(tracker_info.get("n_shape", 100)), int(tracker_info.get("n_exp", 50)), float(fov))
    recorded_model = (metadata.get("model") or {}).get("checksum")
    if recorded_model is not None and recorded_model != tracker.head.checksum:
        raise UserError(
            f"session {session_dir} was tracked with the {(metadata.get('model') or {}).get('name')}, not the "
            f"{tracker.head.name}: pass the same --flame as when recording"
        )
    if shape is not None:
        values = torch.zeros(tracker.layer.n_shape, dtype=tracker.shape.dtype)
        recorded = torch.as_tensor(shape[: tracker.layer.n_shape], dtype=tracker.shape.dtype)
        values[: recorded.numel()] = recorded
        tracker.adopt_identity(values)
    n_frames = max(messages) + 1
    states = [state_from_message(tracker, messages[i]) if i in messages else None for i in range(n_frames)]

    def frames() -> Iterator[FrameInput]:
        landmarker = None
        try:
            for frame in reader.video_frames():
                if frame.index >= n_frames:
                    return
                recorded = (messages.get(frame.index) or {}).get("landmarks")
                if recorded is not None and len(recorded) == 478 * 2:
                    points = np.asarray(recorded, dtype=np.float64).reshape(478, 2)
                else:
                    landmarker = landmarker or _open_landmarker(landmarker_task)
                    observation = landmarker.detect(frame.image, int(round(frame.t_monotonic * 1000.0)))
                    points = None if observation is None else observation.points.astype(np.float64)
                yield frame.image, points
        finally:
            if landmarker is not None:
                landmarker.close()

    return SequenceRefiner(tracker, out_dir, options, reader.fps).run(states, frames, progress)


def _open_landmarker(task: Path | None):
    from engine.landmarks import FaceLandmarker, LandmarkerConfig

    if task is None:
        raise UserError("the session was recorded without landmarks; MediaPipe's face_landmarker.task is needed to find them")
    return FaceLandmarker(LandmarkerConfig(task, running_mode="video")).__enter__()

"""The live loop: newest frame -> MediaPipe -> tracker -> publishers, recorder and keyframe queue, with metrics.

Two stages run at once, so that the loop keeps MediaPipe's own rate: the detection stage (its own thread)
takes the newest frame from the source and finds its landmarks, while the fitting stage (the calling
thread) fits and publishes the frame before it. Threads: the source's capture thread fills a one-frame
slot (a frame the loop had no time for is replaced and counted as dropped); the detection stage hands
each result over through a one-result slot (it waits while the fitting stage is busy, so no frame ages
there); the recorder writes in its own thread; the tracker calibrates in its own thread.
Nothing queues without bound: the slots hold one item, publishers drop what they cannot send at once,
the recorder's queue is bounded, and the keyframe queue drops its oldest entry when full.

Per frame, in the fitting stage: fit, ``flame.shape`` if the identity changed, ``flame.frame`` to every
publisher (latency is measured here, from the frame's capture), recording, keyframe selection, and handing
the result to the preview window, which draws it on its own thread.
About once a second the loop publishes ``flame.metrics`` and refreshes the status line.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from engine.filters import OneEuroConfig
from engine.head_model import HeadModel
from engine.landmarks import N_LANDMARKS, FaceLandmarker, FaceObservation, LandmarkerConfig
from engine.model_files import find_face_landmarker, resolve_models_dir
from engine.model_selection import select_head_model
from engine.tracker import TrackedFrame, Tracker, TrackerConfig, TrackingIdentity, reference_arrays
from flame_client.messages import (
    BLENDSHAPE_NAMES,
    SCHEMA_VERSION,
    TOPIC_FRAME,
    TOPIC_SHAPE,
    frame_message,
    metrics_message,
    shape_message,
)
from realtime.keyframes import KeyframeConfig, KeyframeSelector
from realtime.refiner import LiveRefiner
from realtime.outputs import PublisherOptions, close_all, dropped_messages, open_publishers, wait_for_subscribers
from realtime.preview import PreviewFrame, PreviewWindow, display_available
from realtime.publishers import Publisher
from realtime.recorder import SessionRecorder
from realtime.sources import Frame, FrameSource, SourceLostError, SourceOptions, open_source

log = logging.getLogger(__name__)

_NO_LANDMARKS = np.full((N_LANDMARKS, 2), np.nan)
_NO_BLENDSHAPES = np.zeros(len(BLENDSHAPE_NAMES))
_RESTING_EYES = np.zeros((2, 3))
_SWITCH_INTERVAL_S = 0.001


@dataclass(frozen=True)
class LiveConfig:
    """How the loop runs, independent of where frames come from and where results go."""

    max_frames: int | None = None
    """Stop after this many processed frames (None: until the source ends or a stop is requested)."""
    include_landmarks: bool = False
    """Put MediaPipe's 478 landmarks into every ``flame.frame`` (about 10 KB more per message)."""
    frame_size: tuple[int, int] | None = None
    """Resize every frame to (width, height) before tracking; None keeps the source's size."""
    keyframes: KeyframeConfig | None = None
    """Select keyframes for the refiner into ``LivePipeline.keyframes.queue``; None turns selection off."""
    refine: bool = False
    """Refine identity, texture and light photometrically from keyframes on a background thread, once the
    tracker has calibrated; the loop adopts each result between frames. Implies keyframe selection."""
    preview: bool = False
    show_status: bool = True
    """A status line once a second (one updating line on a terminal, else a log line)."""
    metrics_interval_s: float = 1.0
    metrics_window: int = 64
    """Frames the published percentiles and stage times are taken over."""
    summary_window: int = 4096
    """Frames the end-of-run summary is taken over (the most recent ones)."""
    warmup_frames: int = 30
    """Frames left out of the summary's frame-time spread (first calls)."""


@dataclass(frozen=True)
class LiveSummary:
    """What a run did, as returned by :meth:`LivePipeline.run`; times in milliseconds unless named otherwise."""

    frames: int
    valid_frames: int
    dropped_frames: int
    """Frames the source captured but the loop had no time for."""
    publisher_dropped: int
    duration_s: float
    fps: float
    latency_p50_ms: float
    latency_p95_ms: float
    """Capture to publish, over the last ``summary_window`` frames."""
    mediapipe_ms: float
    tracker_ms: float
    """Median per-frame times of the two stages."""
    tracker_max_ms: float
    """The slowest fit, usually the frame that calibrated the identity."""
    keyframes: int
    keyframes_dropped: int
    frame_median_ms: float
    frame_max_ms: float
    """MediaPipe plus fitting and publishing, per frame after the warm-up frames."""
    preview_frames: int = 0
    """Frames the preview window drew (on its own thread; the others were replaced by newer ones)."""
    preview_draw_ms: float = 0.0
    """Median time the preview thread took to pose, render and show one frame."""
    source_lost: str | None = None
    """Why the camera or stream stopped for good, when it did; the run then ends with a failure status."""

    def describe(self) -> str:
        lost = f"; stopped early: {self.source_lost}" if self.source_lost else ""
        return (
            f"processed {self.frames} frames ({self.valid_frames} with a face) in {self.duration_s:.1f} s: "
            f"{self.fps:.1f} fps, capture->publish p50 {self.latency_p50_ms:.0f} ms p95 {self.latency_p95_ms:.0f} ms, "
            f"{self.dropped_frames} frames dropped{lost}"
        )


class _Samples:
    """The most recent `capacity` values of one measurement, in a preallocated ring."""

    def __init__(self, capacity: int) -> None:
        self._values = np.zeros(capacity)
        self._count = 0

    def add(self, value: float) -> None:
        self._values[self._count % len(self._values)] = value
        self._count += 1

    def percentile(self, q: float) -> float:
        if self._count == 0:
            return 0.0
        return float(np.percentile(self._values[: min(self._count, len(self._values))], q))

    def maximum(self) -> float:
        return float(self._values[: min(self._count, len(self._values))].max()) if self._count else 0.0


class _StageTimes:
    """Latency and stage times of recent frames."""

    def __init__(self, capacity: int) -> None:
        self.latency_ms = _Samples(capacity)
        self.mediapipe_ms = _Samples(capacity)
        self.tracker_ms = _Samples(capacity)

    def add(self, latency_ms: float, mediapipe_ms: float, tracker_ms: float) -> None:
        self.latency_ms.add(latency_ms)
        self.mediapipe_ms.add(mediapipe_ms)
        self.tracker_ms.add(tracker_ms)


@dataclass(frozen=True)
class _Detected:
    """A frame with its landmarks, handed from the detection stage to the fitting stage."""

    frame: Frame
    frame_time: float
    observation: FaceObservation | None
    mediapipe_ms: float


class _DetectionStage:
    """MediaPipe in its own thread, one frame ahead of the fitting stage.

    ``get`` returns the next detected frame, None on timeout, or raises what the stage raised. After the
    source ends, ``finished`` is true once every detected frame was taken.
    """

    def __init__(self, source: FrameSource, landmarker: FaceLandmarker, frame_size: tuple[int, int] | None, frame_time: Callable[[Frame], float]) -> None:
        self._source = source
        self._landmarker = landmarker
        self._frame_size = frame_size
        self._frame_time = frame_time
        self._handoff: queue.Queue[_Detected] = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="flame-live-detection", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    @property
    def finished(self) -> bool:
        return self._done.is_set() and self._handoff.empty()

    def get(self, timeout: float) -> _Detected | None:
        try:
            return self._handoff.get(timeout=timeout)
        except queue.Empty:
            if self._error is not None:
                raise self._error
            return None

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                frame = self._source.slot.get(timeout=0.1)
                if frame is None:
                    if self._source.ended:
                        break
                    continue
                self._hand_over(self._detect(frame))
        except BaseException as error:  # noqa: BLE001 - handed to the fitting stage, which raises it
            self._error = error
        finally:
            self._done.set()

    def _detect(self, frame: Frame) -> _Detected:
        if self._frame_size is not None and frame.image.shape[1::-1] != self._frame_size:
            frame = replace(frame, image=_resized(frame.image, self._frame_size))
        frame_time = self._frame_time(frame)
        started = time.perf_counter()
        observation = self._landmarker.detect(frame.image, round(frame_time * 1000.0))
        return _Detected(frame, frame_time, observation, (time.perf_counter() - started) * 1e3)

    def _hand_over(self, detected: _Detected) -> None:
        while not self._stop.is_set():
            try:
                self._handoff.put(detected, timeout=0.1)
                return
            except queue.Full:
                continue


class _StatusLine:
    """One line that rewrites itself on a terminal; a log line per update elsewhere (files, CI logs)."""

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        self._terminal = enabled and sys.stderr.isatty()
        self._shown = False

    def show(self, text: str) -> None:
        if not self._enabled:
            return
        if self._terminal:
            sys.stderr.write("\r" + text + "\x1b[K")
            sys.stderr.flush()
            self._shown = True
        else:
            log.info(text)

    def finish(self) -> None:
        if self._shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


def camera_metadata(tracker: Tracker) -> dict[str, Any]:
    camera = tracker.camera
    return {
        "image_size": [camera.width, camera.height],
        "fov_deg": camera.fov_deg,  # vertical, as everywhere in flame-live
        "fov": tracker.fov_report(),  # where it comes from: given, estimated, or the default the frames left
        "intrinsics": camera.intrinsics().tolist(),
    }


class LivePipeline:
    """Runs the loop over components opened by the caller (see :func:`run_live`), who also closes them.

    The tracker must have been made for the size of the frames it will see (after ``frame_size``).
    """

    def __init__(
        self,
        source: FrameSource,
        landmarker: FaceLandmarker,
        tracker: Tracker,
        publishers: Sequence[Publisher],
        recorder: SessionRecorder | None = None,
        config: LiveConfig | None = None,
        preview: PreviewWindow | None = None,
    ) -> None:
        self.config = config or LiveConfig()
        self.source = source
        self.landmarker = landmarker
        self.tracker = tracker
        self.publishers = list(publishers)
        self.recorder = recorder
        self.preview = preview
        keyframes = self.config.keyframes or (KeyframeConfig() if self.config.refine else None)
        self.keyframes = KeyframeSelector(keyframes) if keyframes else None
        self.refiner: LiveRefiner | None = None
        #: Set from any thread (a signal handler, a UI) to recalibrate identity and FOV from the frames to come.
        self.recalibrate = threading.Event()
        self._identity_lock = threading.Lock()
        self._refined: tuple[TrackingIdentity, np.ndarray, np.ndarray] | None = None  # from the refiner thread
        self._appearance: tuple[np.ndarray, np.ndarray] | None = None  # (tex, light) of the adopted identity
        self.frames = 0
        self.valid_frames = 0
        self.source_lost: str | None = None
        self._image_size = (tracker.camera.width, tracker.camera.height)
        self._blendshapes = _NO_BLENDSHAPES
        self._shape_version: int | None = None
        self._recent = _StageTimes(self.config.metrics_window)
        self._history = _StageTimes(self.config.summary_window)
        self._status = _StatusLine(self.config.show_status)
        self._frame_ms = _Samples(self.config.summary_window)  # after the warm-up frames
        self._last_report = (0.0, 0)  # (monotonic time, frames processed) at the last metrics report
        self._fps = 0.0

    def run(self, stop: threading.Event | None = None) -> LiveSummary:
        """Track until the source ends, `max_frames` are processed, the preview closes or `stop` is set."""
        stop = stop or threading.Event()
        # MediaPipe and the capture thread need the other cores; PyTorch's small solves gain nothing from threads.
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        # Short GIL slices: a background thread (calibration, refinement) then delays a frame by at most ~1 ms
        # each time the fitting stage wants the interpreter back, instead of Python's default 5 ms.
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(_SWITCH_INTERVAL_S)
        started = time.monotonic()
        self._last_report = (started, 0)
        self._publish_shape_if_changed()
        detection = _DetectionStage(self.source, self.landmarker, self.config.frame_size, self._frame_time)
        self.source.start()
        detection.start()
        try:
            while not stop.is_set() and not self._reached_max_frames():
                try:
                    detected = detection.get(timeout=0.1)
                except SourceLostError as error:  # raised in the detection stage, handed over here
                    log.error("%s", error)
                    self.source_lost = str(error)
                    break
                if detected is None:
                    if detection.finished:
                        break
                elif not self._process(detected):
                    break
                self._report_when_due()
            self._report()  # the last figures, also for runs shorter than a report interval
        finally:
            detection.stop()
            self.source.stop()
            if self.keyframes is not None:
                self.keyframes.queue.close()
            if self.refiner is not None:
                self.refiner.stop()
            self._status.finish()
            torch.set_num_threads(torch_threads)
            sys.setswitchinterval(switch_interval)
        return self._summary(time.monotonic() - started)

    def _reached_max_frames(self) -> bool:
        return self.config.max_frames is not None and self.frames >= self.config.max_frames

    def _frame_time(self, frame: Frame) -> float:
        """Seconds on the clock the frame was shot on: media time when every frame of a file is read
        (possibly faster than real time), else the capture clock."""
        if not self.source.delivers_every_frame:
            return frame.t_monotonic
        if frame.source_pts is not None:
            return frame.source_pts
        return frame.index / (self.source.fps or 25.0)

    def _process(self, detected: _Detected) -> bool:
        """Track and publish one detected frame; False when the user closed the preview."""
        frame, observation = detected.frame, detected.observation
        self._adopt_refined_identity()
        if self.recalibrate.is_set():
            self.recalibrate.clear()
            log.info("recalibrating from the next %.0f s of frames", self.tracker.config.calibration_seconds)
            self.tracker.request_recalibration()
        before_fit = time.perf_counter()
        tracked = self.tracker.track(None if observation is None else observation.points, timestamp=detected.frame_time)
        after_fit = time.perf_counter()

        self._publish_shape_if_changed(frame)
        message = self._frame_message(frame, observation, tracked)
        for publisher in self.publishers:
            publisher.publish_frame(message)
        latency_ms = (time.monotonic() - frame.t_monotonic) * 1e3

        self.frames += 1
        self.valid_frames += int(tracked.valid)
        stage_times = (latency_ms, detected.mediapipe_ms, (after_fit - before_fit) * 1e3)
        self._recent.add(*stage_times)
        self._history.add(*stage_times)
        if self.frames > self.config.warmup_frames:
            self._frame_ms.add(detected.mediapipe_ms + (time.perf_counter() - before_fit) * 1e3)
        if self.recorder is not None:
            self.recorder.write(frame, TOPIC_FRAME, message)
        landmarks = None if observation is None else observation.points
        if self.keyframes is not None and (tracked.calibrated or not self.config.refine):
            self.keyframes.offer(frame, landmarks, tracked)
        self._start_refiner_once_calibrated()
        if self.preview is not None:
            arrays = reference_arrays(self.tracker, tracked) if tracked.valid else None
            self.preview.submit(PreviewFrame(frame.image, arrays, landmarks, tracked.valid, self.tracker.calibrated, self._fps, latency_ms))
            return not self.preview.closed
        return True

    def _frame_message(self, frame: Frame, observation: FaceObservation | None, tracked: TrackedFrame) -> dict[str, Any]:
        if observation is not None and np.isfinite(observation.blendshapes).all():
            self._blendshapes = observation.blendshapes
        landmarks = None
        if self.config.include_landmarks:
            landmarks = _NO_LANDMARKS if observation is None else observation.points
        pose = tracked.pose
        return frame_message(
            seq=frame.index,
            t_capture=frame.t_capture,
            valid=tracked.valid,
            exp=tracked.exp,
            jaw_pose=pose[2],
            eye_pose=pose[3:5] if len(pose) >= 5 else _RESTING_EYES,
            neck_pose=pose[1],
            head_rot=tracked.head_rot,
            head_trans=tracked.head_trans,
            fov_deg=tracked.fov_deg,
            blendshapes=self._blendshapes,
            landmarks=landmarks,
            image_size=self._image_size,
        )

    def _start_refiner_once_calibrated(self) -> None:
        """The refiner starts from the landmark calibration's identity, so it waits for it."""
        if self.config.refine and self.refiner is None and self.tracker.calibrated and self.keyframes is not None:
            self.refiner = LiveRefiner(self.tracker.head, self.keyframes.queue, lambda: self.tracker.shape,
                                       self._receive_identity).start()

    def _receive_identity(self, shape: np.ndarray, tex: np.ndarray, light: np.ndarray) -> None:
        """Called on the refiner's thread: prepare the newest result here, for the loop to adopt at once."""
        identity = self.tracker.identity_for(torch.as_tensor(shape))
        with self._identity_lock:
            self._refined = (identity, tex, light)

    def _adopt_refined_identity(self) -> None:
        with self._identity_lock:
            refined, self._refined = self._refined, None
        if refined is not None:
            identity, tex, light = refined
            self.tracker.adopt_prepared_identity(identity)
            self._appearance = (tex, light)

    def _publish_shape_if_changed(self, frame: Frame | None = None) -> None:
        """``flame.shape`` at the start and after every change of identity (calibration, refinement)."""
        if self.tracker.shape_version == self._shape_version:
            return
        self._shape_version = self.tracker.shape_version
        head = self.tracker.head
        shape = self.tracker.shape.detach().cpu().numpy()
        tex, light = self._appearance if self._appearance is not None else (None, None)
        message = shape_message(shape, head.name, head.checksum, tex=tex, light=light)
        for publisher in self.publishers:
            publisher.publish_shape(message)
        if self.recorder is None:
            return
        self.recorder.write(None, TOPIC_SHAPE, message)
        if self.tracker.calibrated:
            calibration = {
                "shape_version": self._shape_version,
                "shape": shape.tolist(),
                "t_capture": None if frame is None else frame.t_capture,
            }
            self.recorder.update_metadata({"calibration": calibration, "camera": camera_metadata(self.tracker)})

    def _report_when_due(self) -> None:
        if time.monotonic() - self._last_report[0] >= self.config.metrics_interval_s:
            self._report()

    def _report(self) -> None:
        """Publish ``flame.metrics`` and refresh the status line."""
        now = time.monotonic()
        last_time, last_frames = self._last_report
        self._fps = (self.frames - last_frames) / max(now - last_time, 1e-6)
        self._last_report = (now, self.frames)
        recent = self._recent
        extra = {"frames": self.frames, "valid_frames": self.valid_frames, "publisher_dropped": dropped_messages(self.publishers)}
        if self.keyframes is not None:
            extra |= {"keyframes": self.keyframes.selected, "keyframes_dropped": self.keyframes.queue.dropped}
        message = metrics_message(
            fps=self._fps,
            latency_p50_ms=recent.latency_ms.percentile(50),
            latency_p95_ms=recent.latency_ms.percentile(95),
            dropped_frames=self.source.dropped,
            mediapipe_ms=recent.mediapipe_ms.percentile(50),
            tracker_ms=recent.tracker_ms.percentile(50),
            extra=extra,
        )
        for publisher in self.publishers:
            publisher.publish_metrics(message)
        self._status.show(
            f"{self._fps:5.1f} fps | latency p50 {message['latency_p50_ms']:4.0f} ms p95 {message['latency_p95_ms']:4.0f} ms"
            f" | mediapipe {message['mediapipe_ms']:3.0f} ms | tracker {message['tracker_ms']:3.0f} ms"
            f" | dropped {self.source.dropped} | {'calibrated' if self.tracker.calibrated else 'calibrating'}"
        )

    def _summary(self, duration_s: float) -> LiveSummary:
        history = self._history
        return LiveSummary(
            frames=self.frames,
            valid_frames=self.valid_frames,
            dropped_frames=self.source.dropped,
            publisher_dropped=dropped_messages(self.publishers),
            duration_s=duration_s,
            fps=self.frames / duration_s if duration_s > 0 else 0.0,
            latency_p50_ms=history.latency_ms.percentile(50),
            latency_p95_ms=history.latency_ms.percentile(95),
            mediapipe_ms=history.mediapipe_ms.percentile(50),
            tracker_ms=history.tracker_ms.percentile(50),
            tracker_max_ms=history.tracker_ms.maximum(),
            keyframes=0 if self.keyframes is None else self.keyframes.selected,
            keyframes_dropped=0 if self.keyframes is None else self.keyframes.queue.dropped,
            frame_median_ms=self._frame_ms.percentile(50),
            frame_max_ms=self._frame_ms.maximum(),
            preview_frames=0 if self.preview is None else self.preview.drawn,
            preview_draw_ms=0.0 if self.preview is None else self.preview.draw_ms(),
            source_lost=self.source_lost,
        )


def _resized(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    shrinking = size[0] * size[1] < image.shape[0] * image.shape[1]
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


# ---------------------------------------------------------------------------------------------------------------
# Opening everything a live run needs, in an order that reports user mistakes before the slow steps


@dataclass(frozen=True)
class LiveOptions:
    """Everything ``run_stream.py live`` decides."""

    source: str = "0"
    realtime: bool = True
    """Play files at their own rate (dropping frames the loop has no time for); False reads every frame."""
    flame: str | None = None
    """A FLAME folder, "demo", or None for FLAME when the models folder has it, else the demo head."""
    models_dir: Path | None = None
    device: str = "cpu"
    fov_deg: float | None = None
    """Known vertical field of view; None estimates it during calibration."""
    publishers: PublisherOptions = field(default_factory=PublisherOptions)
    record_dir: Path | None = None
    overwrite: bool = False
    open_timeout_s: float = 5.0
    reconnect_attempts: int = SourceOptions.reconnect_attempts
    """How often a stream that dropped is reopened before the run ends with a failure status."""
    repeat: bool = False
    """Play a video file again whenever it ends (soak runs); stop with `max_frames` or the stop event."""
    subscriber_wait_s: float = 0.0
    """Before the first frame, wait up to this long for a first ZeroMQ subscriber (a soak that counts every
    frame); 0 starts at once, as a camera should."""
    loop: LiveConfig = field(default_factory=LiveConfig)


def _session_metadata(options: LiveOptions, source: FrameSource, head: HeadModel, tracker: Tracker) -> dict[str, Any]:
    return {
        "source": source.description,
        "source_fps": source.fps,
        "model": {"name": head.name, "checksum": head.checksum, "is_demo": head.is_demo, "files": head.sources},
        "tracker": {"n_shape": tracker.layer.n_shape, "n_exp": tracker.layer.n_exp, "device": options.device},
        "camera": camera_metadata(tracker),
        "fov_fixed": options.fov_deg is not None,
        "calibration": None,
        "schema_version": SCHEMA_VERSION,
        "landmarks_in_messages": options.loop.include_landmarks,
    }


def run_live(options: LiveOptions, stop: threading.Event | None = None, recalibrate: threading.Event | None = None) -> LiveSummary:
    """Open the source, publishers, models and recorder, run the loop, and close everything again.

    Setting `recalibrate` (from any thread) makes the tracker calibrate identity and FOV again.

    User mistakes (no such camera or file, port in use, recording folder taken) raise UserError; the cheap
    checks come first, so they are reported before the models load. Without a display, --preview is skipped
    with one line and tracking goes on.
    """
    recalibrate = recalibrate or threading.Event()
    with contextlib.ExitStack() as stack:
        show_preview = options.loop.preview and display_available()
        source = open_source(
            options.source,
            options.realtime,
            SourceOptions(
                open_timeout_s=options.open_timeout_s, reconnect_attempts=options.reconnect_attempts, repeat=options.repeat
            ),
        )
        stack.callback(source.stop)
        publishers = open_publishers(options.publishers)
        stack.callback(close_all, publishers)

        models_dir = resolve_models_dir(options.models_dir)
        head = select_head_model(options.flame, models_dir)
        landmarker = stack.enter_context(FaceLandmarker(LandmarkerConfig(find_face_landmarker(models_dir))))
        width, height = options.loop.frame_size or source.size
        tracker_config = TrackerConfig(
            fov_deg=options.fov_deg, output_filter=OneEuroConfig(), device=options.device, calibrate_in_background=True
        )
        tracker = Tracker(head, (height, width), tracker_config)
        log.info("tracking %s (%dx%d) with the %s on %s", source.description, width, height, head.name, options.device)

        recorder = None
        if options.record_dir is not None:
            metadata = _session_metadata(options, source, head, tracker)
            recorder = SessionRecorder(options.record_dir, source.fps, (width, height), metadata, overwrite=options.overwrite)
            stack.enter_context(recorder)
        preview = None
        if show_preview:
            preview = stack.enter_context(PreviewWindow(head, tracker.layer.n_shape, tracker.layer.n_exp, recalibrate))
        pipeline = LivePipeline(source, landmarker, tracker, publishers, recorder, options.loop, preview)
        pipeline.recalibrate = recalibrate
        if options.subscriber_wait_s > 0:
            wait_for_subscribers(publishers, options.subscriber_wait_s, stop)
        return pipeline.run(stop)


def run_live_benchmark(
    source: str | Path,
    flame: str | None = "demo",
    models_dir: Path | None = None,
    device: str = "cpu",
    max_frames: int = 300,
    frame_size: tuple[int, int] | None = (640, 480),
    realtime: bool = True,
    preview: bool = False,
) -> dict[str, Any]:
    """End-to-end speed of the live loop on a file: fps, capture->publish latency, MediaPipe and tracker ms.

    Frames are resized to `frame_size` (640x480 by default, a typical webcam) and published on a ZeroMQ
    socket on a free local port. With realtime=True the file plays at its own rate, as a camera would, so
    fps is capped by the file's rate and slow frames show up as drops; realtime=False measures throughput.
    """
    options = LiveOptions(
        source=str(source),
        realtime=realtime,
        flame=flame,
        models_dir=models_dir,
        device=device,
        publishers=PublisherOptions(zmq="tcp://127.0.0.1:*"),
        loop=LiveConfig(max_frames=max_frames, frame_size=frame_size, show_status=False, preview=preview),
    )
    summary = run_live(options)
    return {
        "source": str(source),
        "frame_size": list(frame_size) if frame_size else None,
        "realtime": realtime,
        "preview": preview,
        "device": device,
        "torch_threads": 1,
        **asdict(summary),
        "frame_max_over_median": summary.frame_max_ms / summary.frame_median_ms if summary.frame_median_ms else float("nan"),
    }


def mediapipe_alone_benchmark(
    source: str | Path, models_dir: Path | None = None, max_frames: int = 300, frame_size: tuple[int, int] | None = (640, 480)
) -> dict[str, float]:
    """MediaPipe alone on the frames the live benchmark sees (resized the same way): the rate the live loop
    could reach if fitting and publishing cost nothing. Decoding is left out, as the live loop decodes in a
    thread of its own."""
    from realtime.sources import iter_frames

    models_dir = resolve_models_dir(models_dir)
    samples = []
    with FaceLandmarker(LandmarkerConfig(find_face_landmarker(models_dir))) as landmarker:
        for frame in iter_frames(str(source)):
            if frame.index >= max_frames:
                break
            started = time.perf_counter()  # resizing counts: the live loop's detection stage does it too
            image = frame.image if frame_size is None or frame.image.shape[1::-1] == frame_size else _resized(frame.image, frame_size)
            landmarker.detect(image, frame.index * 40)
            samples.append(time.perf_counter() - started)
    return {"frames": len(samples), "median_ms": float(np.median(samples) * 1e3), "fps": len(samples) / float(np.sum(samples))}

"""The live loop: newest frame -> MediaPipe -> tracker -> ``flame.frame`` -> publishers, recorder and keyframes.

Two stages run at once, so that the loop keeps MediaPipe's own rate: the detection stage
(:mod:`realtime.detection`: MediaPipe in a process of its own, :mod:`realtime.detection_process`, so that
MediaPipe and the solver never wait for each other's interpreter lock) finds the landmarks of the newest frame
while the fitting stage (this module) fits and publishes the frame before it; one thread, the caller's, feeds
the one and runs the other. Threads: the source's capture thread fills a one-frame slot (a frame the loop had
no time for is replaced and counted as dropped); the recorder writes in its own thread; the tracker calibrates
in its own thread; the refiner prepares identities on its own. Nothing queues without bound: the slot holds one
frame, MediaPipe's process at most three, publishers drop what they cannot send at once, the recorder's queue
is bounded, and the keyframe queue drops its oldest entry when full.

Per frame, in the fitting stage (:meth:`LivePipeline._process`): adopt a refined identity or start a
recalibration (between frames), fit, ``flame.shape`` if the identity changed, ``flame.frame`` to every
publisher (latency is measured here, from the frame's capture), recording, keyframe selection, and handing the
result to the preview window, which draws it on its own thread. About once a second the loop publishes
``flame.metrics`` and refreshes the status line (:mod:`realtime.metrics`). Opening and closing what the loop
runs over is :func:`realtime.live.run_live`'s job.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch

from engine.frames import TrackedFrame, frame_message_from
from engine.landmarks import N_LANDMARKS
from engine.tracker import Tracker
from flame_client.messages import BLENDSHAPE_NAMES, TOPIC_FRAME, TOPIC_SHAPE, shape_message
from realtime.detection import Detected, DetectionStage
from realtime.detection_process import DetectionProcess
from realtime.keyframes import KeyframeConfig, KeyframeSelector
from realtime.metrics import LiveCounts, LiveMetrics, LiveSummary
from realtime.outputs import dropped_messages
from realtime.preview import PreviewFrame, PreviewWindow
from realtime.publishers import Publisher
from realtime.recorder import SessionRecorder
from realtime.refiner import LiveRefiner, RefinedIdentityHandoff, RefinerConfig
from realtime.session_metadata import calibration_metadata
from realtime.sources import Frame, FrameSource, SourceLostError

log = logging.getLogger(__name__)

NO_LANDMARKS = np.full((N_LANDMARKS, 2), np.nan)
NO_BLENDSHAPES = np.zeros(len(BLENDSHAPE_NAMES))
SWITCH_INTERVAL_S = 0.001
"""The interpreter's thread switch interval while the loop runs (see :meth:`LivePipeline.run`)."""


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
    refiner: RefinerConfig = field(default_factory=RefinerConfig)
    """How the background refiner fits (with ``refine``)."""
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


class LivePipeline:
    """Runs the loop over components opened by the caller (see :func:`realtime.live.run_live`), who also closes them.

    The tracker and the detection process must have been made for the size of the frames the loop tracks
    (``frame_size``, else the source's).
    """

    def __init__(
        self,
        source: FrameSource,
        detector: DetectionProcess,
        tracker: Tracker,
        publishers: Sequence[Publisher],
        recorder: SessionRecorder | None = None,
        config: LiveConfig | None = None,
        preview: PreviewWindow | None = None,
    ) -> None:
        self.config = config or LiveConfig()
        self.source = source
        self.detector = detector
        self.tracker = tracker
        self.publishers = list(publishers)
        self.recorder = recorder
        self.preview = preview
        keyframes = self.config.keyframes or (KeyframeConfig() if self.config.refine else None)
        self.keyframes = KeyframeSelector(keyframes) if keyframes else None
        self.refiner: LiveRefiner | None = None
        #: Set from any thread (a signal handler, a UI) to recalibrate identity and FOV from the frames to come.
        self.recalibrate = threading.Event()
        self.refined_identity = RefinedIdentityHandoff(tracker)
        self.metrics = LiveMetrics(self.config.metrics_interval_s, self.config.metrics_window,
                                   self.config.summary_window, self.config.warmup_frames, self.config.show_status)
        self.frames = 0
        self.valid_frames = 0
        self.source_lost: str | None = None
        self._image_size = (tracker.rig.camera.width, tracker.rig.camera.height)
        self._blendshapes = NO_BLENDSHAPES
        self._shape_version: int | None = None

    def run(self, stop: threading.Event | None = None) -> LiveSummary:
        """Track until the source ends, `max_frames` are processed, the preview closes or `stop` is set."""
        stop = stop or threading.Event()
        # MediaPipe and the capture thread need the other cores; PyTorch's small solves gain nothing from threads,
        # and OpenCV's pool, spinning between two resizes of a frame, costs about as much CPU as the resizes themselves (measured).
        torch_threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
        torch.set_num_threads(1)
        cv2.setNumThreads(1)
        # Short GIL slices: a background thread (calibration, refinement) then delays a frame by at most ~1 ms
        # each time the fitting stage wants the interpreter back, instead of Python's default 5 ms.
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        # What exists now (models, tracker, publishers) lives as long as the loop: frozen, the garbage collector
        # no longer walks it, so a full collection during the loop is short (measured: one of 660 ms otherwise).
        gc.collect()
        gc.freeze()
        self.metrics.start()
        cpu_started = self._cpu_seconds()
        self._publish_shape_if_changed()
        keep_images = self.recorder is not None or self.preview is not None or self.keyframes is not None
        detection = DetectionStage(self.source, self.detector, keep_images)
        self.source.start()
        try:
            while not stop.is_set() and not self._reached_max_frames():
                try:
                    detected = detection.get(timeout=0.1)
                except SourceLostError as error:  # the capture thread's, raised where its frames are taken
                    log.error("%s", error)
                    self.source_lost = str(error)
                    break
                if detected is None:
                    if detection.finished:
                        break
                elif not self._process(detected):
                    break
                if self.metrics.report_due():
                    self.metrics.report(self._counts(), self.publishers)
            self.metrics.report(self._counts(), self.publishers)  # the last figures, also for short runs
        finally:
            self.source.stop()
            if self.keyframes is not None:
                self.keyframes.queue.close()
            if self.refiner is not None:
                self.refiner.stop()
            self.metrics.end_status_line()
            torch.set_num_threads(torch_threads)
            cv2.setNumThreads(cv2_threads)
            sys.setswitchinterval(switch_interval)
            gc.unfreeze()
        return self.metrics.summary(self._counts(), self._cpu_seconds() - cpu_started)

    def _cpu_seconds(self) -> float:
        """CPU time used so far by this process (every thread) and MediaPipe's."""
        return time.process_time() + self.detector.cpu_seconds()

    def _process(self, detected: Detected) -> bool:
        """Fit and publish one detected frame; False when the user closed the preview."""
        frame, observation = detected.frame, detected.observation
        self._between_frames()
        calibrating = self.tracker.calibrating_in_background  # it ran during this frame's detection, or still runs
        fit_started, cpu_started = time.perf_counter(), time.thread_time()
        tracked = self.tracker.track(None if observation is None else observation.points, timestamp=detected.frame_time)
        fit_ms = (time.perf_counter() - fit_started) * 1e3

        self._publish_shape_if_changed(frame)
        message = self._frame_message(detected, tracked)
        for publisher in self.publishers:
            publisher.publish_frame(message)
        latency_ms = (time.monotonic() - frame.t_monotonic) * 1e3

        self.frames += 1
        self.valid_frames += int(tracked.valid)
        frame_ms = detected.mediapipe_ms + (time.perf_counter() - fit_started) * 1e3
        fitting_cpu_ms = (time.thread_time() - cpu_started) * 1e3
        self.metrics.record_frame(
            latency_ms, detected.mediapipe_ms, fit_ms, frame_ms, fitting_cpu_ms, detected.idle_ms,
            calibrating or self.tracker.calibrating_in_background,
        )
        if self.recorder is not None:
            self.recorder.write(frame, TOPIC_FRAME, message)
        self._offer_keyframe(detected, tracked)
        if self.preview is not None:
            arrays = self.tracker.rig.reference_arrays(tracked) if tracked.valid else None
            landmarks = None if observation is None else observation.points
            self.preview.submit(PreviewFrame(frame.image, arrays, landmarks, tracked.valid, self.tracker.calibrated,
                                             self.metrics.fps, latency_ms))
            return not self.preview.closed
        return True

    def _between_frames(self) -> None:
        """What other threads asked for since the last frame: a refined identity, a recalibration."""
        self.refined_identity.adopt()
        if self.recalibrate.is_set():
            self.recalibrate.clear()
            log.info("recalibrating from the next %.0f s of frames", self.tracker.config.calibration_seconds)
            self.tracker.request_recalibration()

    def _frame_message(self, detected: Detected, tracked: TrackedFrame) -> dict[str, Any]:
        observation = detected.observation
        if observation is not None and np.isfinite(observation.blendshapes).all():
            self._blendshapes = observation.blendshapes
        landmarks = None
        if self.config.include_landmarks:
            landmarks = NO_LANDMARKS if observation is None else observation.points
        return frame_message_from(
            tracked, seq=detected.frame.index, t_capture=detected.frame.t_capture, blendshapes=self._blendshapes,
            landmarks=landmarks, image_size=self._image_size,
        )

    def _publish_shape_if_changed(self, frame: Frame | None = None) -> None:
        """``flame.shape`` at the start and after every change of identity (calibration, refinement)."""
        if self.tracker.shape_version == self._shape_version:
            return
        self._shape_version = self.tracker.shape_version
        head = self.tracker.rig.head
        shape = self.tracker.rig.shape.detach().cpu().numpy()
        appearance = self.refined_identity.appearance
        tex, light = appearance if appearance is not None else (None, None)
        message = shape_message(shape, head.name, head.checksum, tex=tex, light=light)
        for publisher in self.publishers:
            publisher.publish_shape(message)
        if self.recorder is None:
            return
        self.recorder.write(None, TOPIC_SHAPE, message)
        if self.tracker.calibrated:
            self.recorder.update_metadata(calibration_metadata(self.tracker, shape, None if frame is None else frame.t_capture))

    def _offer_keyframe(self, detected: Detected, tracked: TrackedFrame) -> None:
        """Keyframe selection (for the refiner, only once calibrated), and the refiner's start once it can."""
        landmarks = None if detected.observation is None else detected.observation.points
        if self.keyframes is not None and (tracked.calibrated or not self.config.refine):
            self.keyframes.offer(detected.frame, landmarks, tracked)
        # The refiner starts from the landmark calibration's identity, so it waits for it.
        if self.config.refine and self.refiner is None and self.tracker.calibrated and self.keyframes is not None:
            self.refiner = LiveRefiner(self.tracker.rig.head, self.keyframes.queue, lambda: self.tracker.rig.shape,
                                       self.refined_identity.receive, self.config.refiner).start()

    def _reached_max_frames(self) -> bool:
        return self.config.max_frames is not None and self.frames >= self.config.max_frames

    def _counts(self) -> LiveCounts:
        keyframes = self.keyframes
        return LiveCounts(
            frames=self.frames,
            valid_frames=self.valid_frames,
            dropped_frames=self.source.dropped,
            publisher_dropped=dropped_messages(self.publishers),
            calibrated=self.tracker.calibrated,
            keyframes=None if keyframes is None else keyframes.selected,
            keyframes_dropped=0 if keyframes is None else keyframes.queue.dropped,
            preview_frames=0 if self.preview is None else self.preview.drawn,
            preview_draw_ms=0.0 if self.preview is None else self.preview.draw_ms(),
            source_lost=self.source_lost,
        )

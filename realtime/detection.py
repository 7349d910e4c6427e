"""The live loop's detection stage: MediaPipe in a process of its own, a frame ahead of the fitting stage.

The fitting stage's thread takes the newest frame from the source's latest-frame slot and resizes it to the
loop's frame size straight into MediaPipe's shared memory (:mod:`realtime.detection_process`); MediaPipe then
detects it in its own process while this thread fits and publishes the frame before. When the source delivers
every frame (a file read flat out), the next frames stay queued there while one is detected, so MediaPipe
never waits for this process; a camera's newest frame goes alone, as soon as MediaPipe is free (a camera frame
queued behind another would be older when its turn comes than the newest one in the slot), and the frames
captured meanwhile are replaced (and counted) in the source's slot. No thread of its own: a hand-off to the
fitting stage would cost a thread switch per frame, in CPU and in latency, for no gain, since MediaPipe's
queue already overlaps detection with fitting.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, replace

from engine.landmarks import FaceObservation
from realtime.detection_process import DetectionProcess
from realtime.sources import Frame, FrameSource

#: Frames in MediaPipe's process at once when the source delivers every frame (a file read flat out): one
#: being detected and two waiting for it, so MediaPipe never waits, even when this process waits for a core
#: for as long as a detection takes.
IN_FLIGHT = 3


@dataclass(frozen=True)
class Detected:
    """A frame with its landmarks, from the detection stage to the fitting stage."""

    frame: Frame
    """The frame; its image is the one MediaPipe saw (resized to the loop's size) when the stage keeps images,
    else the source's own."""
    frame_time: float
    """Seconds on the clock the frame was shot on (see ``FrameSource.frame_time``)."""
    observation: FaceObservation | None
    """MediaPipe's landmarks and blendshapes; None when it found no face."""
    mediapipe_ms: float
    """MediaPipe's own time for the frame, measured in its process."""
    idle_ms: float = 0.0
    """How long MediaPipe's process waited for this frame after the one before (see ``Detection.idle_ms``)."""


class DetectionStage:
    """MediaPipe's process, kept fed from the source by the fitting stage's own thread.

    ``get`` returns the next detected frame, None when none came within its timeout; it raises what the
    source raised. After the source ends, ``finished`` is true once every detected frame was taken.
    """

    def __init__(self, source: FrameSource, detector: DetectionProcess, keep_images: bool = True) -> None:
        """Frames are resized to the detection process's image size (the loop's frame size) when they differ;
        ``keep_images`` hands each resized image on with its frame (for recording, preview, keyframes), else
        the resized image lives only in MediaPipe's shared memory."""
        if detector.slots < IN_FLIGHT:
            raise ValueError(f"the detection process needs at least {IN_FLIGHT} slots, it has {detector.slots}")
        self._source = source
        self._detector = detector
        self._keep_images = keep_images
        self._in_flight = IN_FLIGHT if source.delivers_every_frame else 1
        self._submitted: collections.deque[tuple[Frame, float]] = collections.deque()  # in MediaPipe's process, in order
        self.finished = False

    def get(self, timeout: float) -> Detected | None:
        """The oldest frame in MediaPipe's process once detected; before it returns, the frames waiting in the
        source go to MediaPipe, which detects them while the caller fits this one."""
        deadline = time.monotonic() + timeout
        self._top_up(wait_s=timeout)
        if not self._submitted:
            self.finished = self._source.ended
            return None
        detection = self._detector.collect(timeout_s=max(0.0, deadline - time.monotonic()))
        if detection is None:
            return None
        frame, frame_time = self._submitted.popleft()
        self._top_up(wait_s=0.0)
        return Detected(frame, frame_time, detection.observation, detection.mediapipe_ms, detection.idle_ms)

    def _top_up(self, wait_s: float) -> None:
        """Submit frames until ``IN_FLIGHT`` (a camera: one) are in MediaPipe's process; wait up to ``wait_s``
        for a frame only while none is in flight (with one in flight, its result comes first)."""
        while self._detector.in_flight < self._in_flight:
            frame = self._source.slot.get(timeout=0.0 if self._submitted else wait_s)
            if frame is None:
                return
            self._submitted.append(self._submit(frame))

    def _submit(self, frame: Frame) -> tuple[Frame, float]:
        frame_time = self._source.frame_time(frame)
        seen = self._detector.submit(frame.image, round(frame_time * 1000.0), resize=True)
        if self._keep_images and seen.shape != frame.image.shape:
            frame = replace(frame, image=seen.copy())  # the slot is reused once the frame is collected
        return frame, frame_time

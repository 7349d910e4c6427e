"""The live loop's detection stage: MediaPipe in a process of its own, fed by a thread, ahead of the fitting stage.

The stage's thread takes the newest frame from the source's latest-frame slot and resizes it to the loop's frame
size straight into MediaPipe's shared memory (:mod:`realtime.detection_process`); when the source delivers every
frame (a file read flat out), it keeps the next frames queued while one is detected, so MediaPipe never waits
for this process; a camera's newest frame goes alone, as soon as MediaPipe is free. Each result goes to the
fitting stage through a one-result hand-off: it waits while the fitting stage is busy, so no detected frame
ages there, and the frames captured meanwhile are replaced (and counted) in the source's slot instead.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, replace

from engine.landmarks import FaceObservation
from realtime.detection_process import DetectionProcess
from realtime.handoff import DropOldestQueue
from realtime.sources import Frame, FrameSource

#: Frames in MediaPipe's process at once when the source delivers every frame (a file read flat out): one
#: being detected and two waiting for it, so MediaPipe never waits, even when this process's threads wait for a
#: core or the interpreter lock for as long as a detection takes. A camera's frames go one at a time: a frame
#: waiting behind another would be older when its turn comes than the newest one in the slot.
IN_FLIGHT = 3


@dataclass(frozen=True)
class Detected:
    """A frame with its landmarks, handed from the detection stage to the fitting stage."""

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
    """MediaPipe's process fed by a thread of this one, ahead of the fitting stage.

    ``get`` returns the next detected frame, None on timeout, or raises what the stage raised. After the
    source ends, ``finished`` is true once every detected frame was taken.
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
        self._handoff: DropOldestQueue[Detected] = DropOldestQueue(1)
        self._thread = threading.Thread(target=self._run, name="flame-live-detection", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._handoff.close()
        self._thread.join(timeout=5.0)

    @property
    def finished(self) -> bool:
        return self._handoff.ended

    def get(self, timeout: float) -> Detected | None:
        return self._handoff.get(timeout=timeout)

    def _run(self) -> None:
        error: BaseException | None = None
        submitted: collections.deque[tuple[Frame, float]] = collections.deque()  # in MediaPipe's process, in order
        try:
            while not self._handoff.closed:
                if self._detector.in_flight < self._in_flight:
                    # With a frame in flight, only a frame already waiting is taken: the result comes first.
                    frame = self._source.slot.get(timeout=0.0 if submitted else 0.1)
                    if frame is not None:
                        submitted.append(self._submit(frame))
                        continue
                    if not submitted:
                        if self._source.ended:
                            break
                        continue
                detection = self._detector.collect(timeout_s=0.1)
                if detection is not None:
                    frame, frame_time = submitted.popleft()
                    if not self._handoff.hand_over(Detected(frame, frame_time, detection.observation, detection.mediapipe_ms, detection.idle_ms)):
                        break
        except BaseException as exc:  # noqa: BLE001 - handed to the fitting stage, which raises it
            error = exc
        finally:
            self._handoff.close(error)

    def _submit(self, frame: Frame) -> tuple[Frame, float]:
        frame_time = self._source.frame_time(frame)
        seen = self._detector.submit(frame.image, round(frame_time * 1000.0), resize=True)
        if self._keep_images and seen.shape != frame.image.shape:
            frame = replace(frame, image=seen.copy())  # the slot is reused once the frame is collected
        return frame, frame_time

"""The live loop's detection stage: MediaPipe in a process of its own, fed by a thread, ahead of the fitting stage.

The stage's thread takes the newest frame from the source's latest-frame slot, resizes it to the loop's frame
size and hands it to MediaPipe's process (:mod:`realtime.detection_process`); when the source delivers every
frame (a file read flat out), it submits the next frame while one is detected, so MediaPipe never waits for
this process; a camera's newest frame goes alone, as soon as MediaPipe is free. Each result goes to the fitting
stage through a one-result hand-off: it waits while the fitting stage is busy, so no detected frame ages there,
and the frames captured meanwhile are replaced (and counted) in the source's slot instead.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, replace

import cv2
import numpy as np

from engine.landmarks import FaceObservation
from realtime.detection_process import DetectionProcess
from realtime.handoff import DropOldestQueue
from realtime.sources import Frame, FrameSource

#: Frames in MediaPipe's process at once when the source delivers every frame (a file read flat out): one
#: being detected, the next one waiting for it, so MediaPipe never waits. A camera's frames go one at a time:
#: a frame waiting behind another would be older when its turn comes than the newest one in the slot.
IN_FLIGHT = 2


@dataclass(frozen=True)
class Detected:
    """A frame with its landmarks, handed from the detection stage to the fitting stage."""

    frame: Frame
    frame_time: float
    """Seconds on the clock the frame was shot on (see ``FrameSource.frame_time``)."""
    observation: FaceObservation | None
    """MediaPipe's landmarks and blendshapes; None when it found no face."""
    mediapipe_ms: float
    """MediaPipe's own time for the frame, measured in its process."""


def resized(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`image` at (width, height) `size`: area averaging when shrinking, bilinear when enlarging."""
    shrinking = size[0] * size[1] < image.shape[0] * image.shape[1]
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


class DetectionStage:
    """MediaPipe's process fed by a thread of this one, ahead of the fitting stage.

    ``get`` returns the next detected frame, None on timeout, or raises what the stage raised. After the
    source ends, ``finished`` is true once every detected frame was taken.
    """

    def __init__(self, source: FrameSource, detector: DetectionProcess) -> None:
        """Frames are resized to the detection process's image size (the loop's frame size) when they differ."""
        if detector.slots < IN_FLIGHT:
            raise ValueError(f"the detection process needs at least {IN_FLIGHT} slots, it has {detector.slots}")
        self._source = source
        self._detector = detector
        self._in_flight = IN_FLIGHT if source.delivers_every_frame else 1
        height, width = detector.image_size
        self._frame_size = (width, height)
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
                    if not self._handoff.hand_over(Detected(frame, frame_time, detection.observation, detection.mediapipe_ms)):
                        break
        except BaseException as exc:  # noqa: BLE001 - handed to the fitting stage, which raises it
            error = exc
        finally:
            self._handoff.close(error)

    def _submit(self, frame: Frame) -> tuple[Frame, float]:
        if frame.image.shape[1::-1] != self._frame_size:
            frame = replace(frame, image=resized(frame.image, self._frame_size))
        frame_time = self._source.frame_time(frame)
        self._detector.submit(frame.image, round(frame_time * 1000.0))
        return frame, frame_time

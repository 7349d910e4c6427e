"""The live loop's detection stage: MediaPipe in its own thread, one frame ahead of the fitting stage.

The stage takes the newest frame from the source's latest-frame slot, resizes it to the loop's frame size,
finds its landmarks and hands the result to the fitting stage through a one-result hand-off: it waits while the
fitting stage is busy, so no detected frame ages there, and the frames captured meanwhile are replaced (and
counted) in the source's slot instead.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace

import cv2
import numpy as np

from engine.landmarks import FaceLandmarker, FaceObservation
from realtime.handoff import DropOldestQueue
from realtime.sources import Frame, FrameSource


@dataclass(frozen=True)
class Detected:
    """A frame with its landmarks, handed from the detection stage to the fitting stage."""

    frame: Frame
    frame_time: float
    """Seconds on the clock the frame was shot on (see ``FrameSource.frame_time``)."""
    observation: FaceObservation | None
    """MediaPipe's landmarks and blendshapes; None when it found no face."""
    mediapipe_ms: float


def resized(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`image` at (width, height) `size`: area averaging when shrinking, bilinear when enlarging."""
    shrinking = size[0] * size[1] < image.shape[0] * image.shape[1]
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


class DetectionStage:
    """MediaPipe in its own thread, one frame ahead of the fitting stage.

    ``get`` returns the next detected frame, None on timeout, or raises what the stage raised. After the
    source ends, ``finished`` is true once every detected frame was taken.
    """

    def __init__(self, source: FrameSource, landmarker: FaceLandmarker, frame_size: tuple[int, int] | None) -> None:
        self._source = source
        self._landmarker = landmarker
        self._frame_size = frame_size
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
        try:
            while not self._handoff.closed:
                frame = self._source.slot.get(timeout=0.1)
                if frame is None:
                    if self._source.ended:
                        break
                    continue
                if not self._handoff.hand_over(self._detect(frame)):
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the fitting stage, which raises it
            error = exc
        finally:
            self._handoff.close(error)

    def _detect(self, frame: Frame) -> Detected:
        if self._frame_size is not None and frame.image.shape[1::-1] != self._frame_size:
            frame = replace(frame, image=resized(frame.image, self._frame_size))
        frame_time = self._source.frame_time(frame)
        started = time.perf_counter()
        observation = self._landmarker.detect(frame.image, round(frame_time * 1000.0))
        return Detected(frame, frame_time, observation, (time.perf_counter() - started) * 1e3)

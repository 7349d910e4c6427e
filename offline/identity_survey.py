"""The identity survey of offline tracking: frames tracked with the mean identity, to find the most diverse
(head pose and expression), on which identity and FOV are then calibrated.

``track`` surveys a sample spread evenly over the whole input, detected up front (:func:`survey_samples`,
in a MediaPipe process of its own beside the main pass's), so the calibration is ready a moment after the
start and every frame can be tracked as soon as it is detected. A landmarks file is surveyed whole
(:class:`Survey` over every frame).
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np

from engine.head_model import HeadModel
from engine.tracker import Tracker, TrackerConfig, diversity_feature, select_diverse

if TYPE_CHECKING:
    from realtime.detection_process import DetectionProcess

log = logging.getLogger(__name__)

SURVEY_SAMPLES = 64
"""Frames surveyed for the calibration, spread evenly over the input (all of a shorter one)."""
PRE_ROLL = 1
"""Frames detected just before each sampled one, so that MediaPipe's video mode finds the sampled face from
the frame before it, as in the main pass. Measured on the clips of ../shared/data/clips: the sampled frames'
landmarks then lie 0.04-0.3 px from the main pass's, against 0.2-0.6 px with none and 0.7-0.9 px with each
frame detected on its own (image mode, which also took another face in a GIF with two: an identity
calibrated on those fits the main pass's landmarks 0.1-1.2 % of the inter-ocular distance worse)."""


class Survey:
    """Frames tracked with the mean identity, in order (with gaps, for a sample), remembering which were
    tracked and how each looked (pose and expression), to choose the most diverse for calibration."""

    def __init__(self, head: HeadModel, config: TrackerConfig, image_size: tuple[int, int], fps: float) -> None:
        # The survey only needs poses and expressions with the mean identity: it never calibrates itself.
        self._scout = Tracker(head, image_size, replace(config, calibration_seconds=math.inf))
        self._fps = fps
        self.candidates: list[int] = []
        self.landmarks: dict[int, tuple[np.ndarray | None, np.ndarray | None]] = {}
        """The candidates' landmarks (mp478, lmk68), to calibrate on."""
        self._features: list[np.ndarray] = []
        self.surveyed = 0
        """Frames added so far."""
        self.seconds = 0.0
        """Time spent surveying."""

    def add(self, index: int, mp478: np.ndarray | None, lmk68: np.ndarray | None = None) -> None:
        started = time.perf_counter()
        frame = self._scout.track(mp478, lmk68, timestamp=index / self._fps)
        if frame.valid:
            self.candidates.append(index)
            self.landmarks[index] = (mp478, lmk68)
            self._features.append(diversity_feature(frame.pose, frame.exp))
        self.surveyed += 1
        self.seconds += time.perf_counter() - started

    def choose(self, count: int) -> list[int]:
        """The ``count`` most diverse frames with a face (fewer when fewer were tracked)."""
        return [self.candidates[i] for i in select_diverse(self._features, count)]


def frame_count(source: str) -> int | None:
    """How many frames a video file, image or folder of images holds (None: not known without decoding it).

    A video's packets are counted (no decoding); a folder's image files. Unreadable frames, skipped when
    decoding, make this an upper bound."""
    from realtime.sources import IMAGE_SUFFIXES

    path = Path(source)
    if "://" in source or not path.exists():
        return None
    if path.is_dir():
        return sum(1 for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return 1
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            return sum(1 for packet in container.demux(stream) if packet.size)
    except (av.error.FFmpegError, IndexError):
        return None


def sample_indices(n_frames: int, count: int) -> list[int]:
    """``count`` frame indices spread evenly over ``n_frames`` (every frame when there are no more)."""
    if n_frames <= count:
        return list(range(n_frames))
    return sorted({int((i + 0.5) * n_frames / count) for i in range(count)})


def survey_samples(
    source: str, detector: DetectionProcess, indices: list[int], image_size: tuple[int, int], fps: float, survey: Survey
) -> None:
    """Detect the frames ``indices`` of ``source`` with ``detector`` (MediaPipe's process in video mode, made
    for ``image_size``; a few frames in flight while the next is decoded), each after the :data:`PRE_ROLL`
    frames before it, and add them to ``survey`` in order."""
    sampled = set(indices)
    wanted = {index - back for index in indices for back in range(PRE_ROLL + 1) if index >= back}
    submitted: collections.deque[int] = collections.deque()

    def take() -> None:
        index, found = submitted.popleft(), detector.collect().observation
        if index in sampled:
            survey.add(index, None if found is None else found.points.astype(np.float64))

    for index, image in _sampled_frames(source, wanted):
        if image.shape[:2] != image_size:
            continue
        if detector.in_flight == detector.slots:
            take()
        detector.submit(image, int(round(index * 1000 / fps)))
        submitted.append(index)
    while detector.in_flight:
        take()


def _sampled_frames(source: str, wanted: set[int]) -> Iterator[tuple[int, np.ndarray]]:
    """The frames ``wanted`` of ``source``, RGB, in order. A video file's other frames are decoded but never
    converted to RGB (a third of decoding's cost); a damaged end stops early, as :mod:`realtime.sources` does."""
    from realtime.sources import IMAGE_SUFFIXES, iter_frames

    last = max(wanted)
    path = Path(source)
    if path.is_file() and path.suffix.lower() not in IMAGE_SUFFIXES:
        try:
            with av.open(str(path)) as container:
                for index, frame in enumerate(container.decode(container.streams.video[0])):
                    if index > last:
                        return
                    if index in wanted:
                        yield index, frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as error:
            log.warning("%s: the identity survey stopped at an unreadable frame (%s)", source, error)
        return
    for frame in iter_frames(source):
        if frame.index > last:
            return
        if frame.index in wanted:
            yield frame.index, frame.image

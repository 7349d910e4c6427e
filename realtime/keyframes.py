"""Keyframe selection for the refiner: frames whose pose or expression the chosen set has not seen yet.

A frame's feature is the one the tracker chooses its calibration frames by (:func:`engine.tracker.diversity_feature`:
head rotation, then the leading expression coefficients, weighted): calibration and refinement both want views
that constrain the identity. A tracked frame becomes a keyframe when its feature lies farther than
``min_distance`` from every feature already selected, so a still head yields one keyframe and each new
head turn or expression adds more. Keyframes go into a :class:`realtime.handoff.DropOldestQueue` that never
blocks the live loop: when the refiner falls behind, the oldest waiting keyframe is dropped (and counted).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.frames import TrackedFrame
from engine.tracker import diversity_feature
from realtime.handoff import DropOldestQueue
from realtime.sources import Frame


@dataclass(frozen=True)
class KeyframeConfig:
    queue_size: int = 8
    """Keyframes waiting for the refiner; beyond this the oldest is dropped."""
    min_distance: float = 0.3
    """Novelty threshold in units of :func:`engine.tracker.diversity_feature`: 0.3 is about 9 degrees of head
    rotation, or one expression coefficient changed by 1."""
    memory: int = 512
    """Selected features remembered for the novelty test; the oldest is forgotten beyond this."""


@dataclass(frozen=True)
class Keyframe:
    """One frame for the refiner: the image, what MediaPipe saw in it and what the tracker fitted."""

    image: np.ndarray
    """HxWx3 uint8 RGB, as tracked (shared with the recorder: do not modify in place)."""
    landmarks: np.ndarray
    """(478, 2) MediaPipe landmarks, pixels of ``image``."""
    tracked: TrackedFrame
    t_capture: float
    """Wall-clock capture time (time.time()), as in the frame's ``flame.frame`` message."""
    frame_index: int


class KeyframeSelector:
    """Decides which tracked frames are novel and queues them; used by the live loop's thread only."""

    def __init__(self, config: KeyframeConfig | None = None) -> None:
        self.config = config or KeyframeConfig()
        self.queue: DropOldestQueue[Keyframe] = DropOldestQueue(self.config.queue_size)
        self.selected = 0
        self._features: np.ndarray | None = None  # (memory, D) ring buffer, allocated with the first feature
        self._count = 0

    def offer(self, frame: Frame, landmarks: np.ndarray | None, tracked: TrackedFrame) -> bool:
        """Queue the frame if it is tracked and novel; True when it became a keyframe."""
        if not tracked.valid or landmarks is None:
            return False
        feature = diversity_feature(tracked.pose, tracked.exp)
        if not self._is_novel(feature):
            return False
        self._remember(feature)
        self.queue.offer(Keyframe(frame.image, landmarks, tracked, frame.t_capture, frame.index))
        self.selected += 1
        return True

    def _is_novel(self, feature: np.ndarray) -> bool:
        if self._features is None or self._count == 0:
            return True
        known = self._features[: min(self._count, len(self._features))]
        return bool(np.min(np.linalg.norm(known - feature, axis=1)) > self.config.min_distance)

    def _remember(self, feature: np.ndarray) -> None:
        if self._features is None:
            self._features = np.empty((self.config.memory, feature.size))
        self._features[self._count % len(self._features)] = feature
        self._count += 1

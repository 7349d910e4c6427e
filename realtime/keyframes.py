"""Keyframe selection for the refiner: frames whose pose or expression the chosen set has not seen yet.

A frame's feature is its head rotation away from frontal (radians) followed by its leading expression
coefficients (weighted). A tracked frame becomes a keyframe when its feature lies farther than
``min_distance`` from every feature already selected, so a still head yields one keyframe and each new
head turn or expression adds more. Keyframes go into a :class:`KeyframeQueue` that never blocks the live
loop: when the refiner falls behind, the oldest waiting keyframe is dropped (and counted).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

from engine.frames import TrackedFrame
from flame_client.rotations import head_rotation_from_frontal
from realtime.sources import Frame


@dataclass(frozen=True)
class KeyframeConfig:
    queue_size: int = 8
    """Keyframes waiting for the refiner; beyond this the oldest is dropped."""
    min_distance: float = 0.15
    """Novelty threshold in feature units: 0.15 is about 9 degrees of head rotation."""
    expression_components: int = 10
    """Leading expression coefficients in the feature."""
    expression_weight: float = 0.3
    """Scale of the expression coefficients against radians of rotation."""
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


class KeyframeQueue:
    """A bounded FIFO between the live loop (put, never waits) and the refiner (get, waits)."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"the keyframe queue needs room for at least one keyframe, not {maxsize}")
        self._items: deque[Keyframe] = deque(maxlen=maxsize)
        self._condition = threading.Condition()
        self._dropped = 0
        self._closed = False

    @property
    def dropped(self) -> int:
        """Keyframes pushed out unrefined because the queue was full."""
        with self._condition:
            return self._dropped

    @property
    def closed(self) -> bool:
        with self._condition:
            return self._closed

    def __len__(self) -> int:
        with self._condition:
            return len(self._items)

    def put(self, keyframe: Keyframe) -> None:
        """Add a keyframe without waiting; when full, the oldest one is dropped to make room."""
        with self._condition:
            if len(self._items) == self._items.maxlen:
                self._dropped += 1
            self._items.append(keyframe)
            self._condition.notify()

    def get(self, timeout: float | None = None) -> Keyframe | None:
        """The oldest waiting keyframe; None after `timeout` seconds, or at once when closed and empty."""
        with self._condition:
            self._condition.wait_for(lambda: self._items or self._closed, timeout)
            return self._items.popleft() if self._items else None

    def close(self) -> None:
        """No more keyframes will come (the live loop ended); waiting getters return."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()


class KeyframeSelector:
    """Decides which tracked frames are novel and queues them; used by the live loop's thread only."""

    def __init__(self, config: KeyframeConfig | None = None) -> None:
        self.config = config or KeyframeConfig()
        self.queue = KeyframeQueue(self.config.queue_size)
        self.selected = 0
        self._features: np.ndarray | None = None  # (memory, D) ring buffer, allocated with the first feature
        self._count = 0

    def feature(self, tracked: TrackedFrame) -> np.ndarray:
        """Head rotation from frontal (radians), then the weighted leading expression coefficients."""
        expression = tracked.exp[: self.config.expression_components]
        return np.concatenate([head_rotation_from_frontal(tracked.head_rot), self.config.expression_weight * expression])

    def offer(self, frame: Frame, landmarks: np.ndarray | None, tracked: TrackedFrame) -> bool:
        """Queue the frame if it is tracked and novel; True when it became a keyframe."""
        if not tracked.valid or landmarks is None:
            return False
        feature = self.feature(tracked)
        if not self._is_novel(feature):
            return False
        self._remember(feature)
        self.queue.put(Keyframe(frame.image, landmarks, tracked, frame.t_capture, frame.index))
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

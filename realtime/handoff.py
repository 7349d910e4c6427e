"""The one hand-off between the live threads: a bounded queue whose producer never has to wait.

Every stage of the live loop passes work on through a :class:`DropOldestQueue`: the capture thread frames to
the loop's thread (room for one: the newest frame wins), the loop's thread keyframes to the refiner and results
to the preview window. When the queue is full,
:meth:`DropOldestQueue.offer` drops the oldest waiting item and counts it, so a slow consumer costs dropped
items, never a stalled producer or a growing backlog; a producer that must deliver everything (a file read
frame by frame) uses :meth:`DropOldestQueue.hand_over` (or :meth:`DropOldestQueue.hand_over_all`, a burst
at once), which waits for room instead. :meth:`DropOldestQueue.close`
ends the stream, optionally with the error that ended it: consumers take what is left, then get None (or the
error, raised).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

Item = TypeVar("Item")


class DropOldestQueue(Generic[Item]):
    """A bounded FIFO between threads: ``offer`` never waits (the oldest item makes room and is counted),
    ``hand_over`` waits for room, ``get`` waits for an item, ``close`` ends the stream."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a hand-off queue needs room for at least one item, not {capacity}")
        self._items: deque[Item] = deque(maxlen=capacity)
        self._condition = threading.Condition()
        self._dropped = 0
        self._closed = False
        self._error: BaseException | None = None

    @property
    def dropped(self) -> int:
        """Items pushed out by newer ones before a consumer took them."""
        with self._condition:
            return self._dropped

    @property
    def closed(self) -> bool:
        """True once the producer closed the queue (items may still wait to be taken)."""
        with self._condition:
            return self._closed

    @property
    def ended(self) -> bool:
        """True once the queue is closed and its last item has been taken."""
        with self._condition:
            return self._closed and not self._items

    def __len__(self) -> int:
        with self._condition:
            return len(self._items)

    def offer(self, item: Item) -> bool:
        """Add `item` without waiting, dropping (and counting) the oldest when full; False if closed."""
        with self._condition:
            if self._closed:
                return False
            if len(self._items) == self._items.maxlen:
                self._dropped += 1
            self._items.append(item)
            self._condition.notify_all()
            return True

    def hand_over(self, item: Item) -> bool:
        """Wait until there is room, then add `item`; False if the queue closed meanwhile."""
        return self.hand_over_all([item])

    def hand_over_all(self, items: list[Item]) -> bool:
        """Wait until there is room for all of ``items`` (at most the capacity), then add them in order; False
        if the queue closed meanwhile. A producer working in bursts wakes once per burst, not once per item."""
        if len(items) > self._items.maxlen:
            raise ValueError(f"{len(items)} items do not fit a queue of {self._items.maxlen}")
        with self._condition:
            self._condition.wait_for(lambda: len(self._items) + len(items) <= self._items.maxlen or self._closed)
            if self._closed:
                return False
            self._items.extend(items)
            self._condition.notify_all()
            return True

    def get(self, timeout: float | None = None) -> Item | None:
        """The oldest waiting item, waiting up to `timeout` seconds (None: until one comes or the end).

        Returns None on timeout or at the end of the stream (tell them apart with `ended`). Raises the error
        the queue was closed with, once the items before it have been taken.
        """
        with self._condition:
            self._condition.wait_for(lambda: self._items or self._closed, timeout)
            if self._items:
                item = self._items.popleft()
                self._condition.notify_all()  # a waiting hand_over has room now
                return item
            if self._closed and self._error is not None:
                raise self._error
            return None

    def close(self, error: BaseException | None = None) -> None:
        """End the stream (with the `error` that ended it, if any; the last call's error counts); waiting producers
        and consumers return."""
        with self._condition:
            self._closed = True
            self._error = error
            self._condition.notify_all()

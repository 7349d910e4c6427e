"""The one hand-off between live threads: newest wins in a one-item slot, the oldest is dropped (and counted)
from a longer queue, a waiting hand-over for every-frame reading, and the end of the stream with its error."""

from __future__ import annotations

import threading

import pytest

from realtime.handoff import DropOldestQueue


def test_a_one_item_slot_hands_out_the_newest_and_counts_the_replaced_ones() -> None:
    slot: DropOldestQueue[int] = DropOldestQueue(1)
    for item in range(3):
        assert slot.offer(item)
    assert slot.get(timeout=0) == 2
    assert slot.dropped == 2
    assert slot.get(timeout=0.01) is None and not slot.ended

    slot.offer(3)
    slot.close()
    assert slot.closed and not slot.ended, "the last item is still to be taken after the end"
    assert slot.get() == 3
    assert slot.get() is None and slot.ended
    assert not slot.offer(4), "a closed queue takes no more items"


def test_a_full_queue_drops_its_oldest_item_and_keeps_the_order_of_the_rest() -> None:
    queue: DropOldestQueue[int] = DropOldestQueue(2)
    for item in range(4):
        queue.offer(item)
    assert queue.dropped == 2 and len(queue) == 2
    assert [queue.get(timeout=0), queue.get(timeout=0)] == [2, 3]


def test_the_error_that_ended_the_stream_is_raised_after_the_items_before_it() -> None:
    queue: DropOldestQueue[int] = DropOldestQueue(1)
    queue.offer(0)
    queue.close(RuntimeError("decoder crashed"))
    assert queue.get() == 0
    with pytest.raises(RuntimeError, match="decoder crashed"):
        queue.get()


def test_hand_over_waits_for_room_and_drops_nothing() -> None:
    queue: DropOldestQueue[int] = DropOldestQueue(1)
    assert queue.hand_over(0)
    second_done = threading.Event()
    producer = threading.Thread(target=lambda: queue.hand_over(1) and second_done.set())
    producer.start()
    assert not second_done.wait(0.1), "the second item must wait while the first is untaken"
    assert queue.get() == 0
    producer.join(5)
    assert second_done.is_set()
    assert queue.get() == 1 and queue.dropped == 0


def test_hand_over_all_waits_for_room_for_the_whole_burst() -> None:
    queue: DropOldestQueue[int] = DropOldestQueue(4)
    assert queue.hand_over_all([0, 1, 2])
    burst_done = threading.Event()
    producer = threading.Thread(target=lambda: queue.hand_over_all([3, 4]) and burst_done.set())
    producer.start()
    assert not burst_done.wait(0.1), "two items do not fit beside three in four places"
    assert queue.get() == 0
    producer.join(5)
    assert burst_done.is_set()
    assert [queue.get() for _ in range(4)] == [1, 2, 3, 4] and queue.dropped == 0
    with pytest.raises(ValueError):
        queue.hand_over_all([0] * 5)


def test_close_releases_a_waiting_consumer_and_a_waiting_producer() -> None:
    queue: DropOldestQueue[int] = DropOldestQueue(1)
    queue.hand_over(0)
    results: list[object] = []
    producer = threading.Thread(target=lambda: results.append(queue.hand_over(1)))
    producer.start()
    empty: DropOldestQueue[int] = DropOldestQueue(1)
    consumer = threading.Thread(target=lambda: results.append(empty.get()))
    consumer.start()
    queue.close()
    empty.close()
    producer.join(5)
    consumer.join(5)
    assert not producer.is_alive() and not consumer.is_alive()
    assert sorted(results, key=repr) == [False, None]


def test_a_queue_needs_room() -> None:
    with pytest.raises(ValueError):
        DropOldestQueue(0)

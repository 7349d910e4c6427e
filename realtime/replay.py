"""Publishing a recorded session again with its original timing, so receivers can be tested without a camera.

Each recorded ``flame.frame`` and ``flame.shape`` message goes out as it was published live, re-stamped on
this replay's clock: ``t_publish`` is now, and a frame's ``t_capture`` is now minus the capture-to-publish
delay recorded live. So a receiver's latencies (flame-client's capture->receive and publish->receive) mean
what they mean live, instead of counting the time since the recording; the original times stay in the
recording. Metrics describe the machine that ran live, not this replay, and are not repeated.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flame_client.messages import TOPIC_FRAME, TOPIC_SHAPE, MessageError, validate
from realtime.outputs import PublisherOptions, close_all, dropped_messages, open_publishers, wait_for_subscribers
from realtime.publishers import Publisher
from realtime.session import SessionReader

log = logging.getLogger(__name__)


#: How long a replay waits for its first ZeroMQ subscriber before it starts anyway.
DEFAULT_SUBSCRIBER_WAIT_S = 3.0


@dataclass(frozen=True)
class ReplaySummary:
    frames: int
    shapes: int
    skipped: int
    """Recorded messages that break the wire schema (a damaged or edited file), not published."""
    duration_s: float
    not_sent: int = 0
    """Messages a publisher could not send and dropped (a receiver too slow for the replay's pace)."""
    unheard: bool = False
    """No ZeroMQ subscriber had connected when the replay started: ZeroMQ delivered nothing until one did."""

    def describe(self) -> str:
        skipped = f", skipped {self.skipped} invalid messages" if self.skipped else ""
        not_sent = f", {self.not_sent} messages could not be sent (receivers too slow)" if self.not_sent else ""
        unheard = "; no ZeroMQ subscriber was connected at the start" if self.unheard else ""
        return f"replayed {self.frames} frames and {self.shapes} identities in {self.duration_s:.1f} s{skipped}{not_sent}{unheard}"


def replay_session(
    reader: SessionReader,
    publishers: Sequence[Publisher],
    speed: float = 1.0,
    stop: threading.Event | None = None,
    subscriber_wait_s: float = DEFAULT_SUBSCRIBER_WAIT_S,
) -> ReplaySummary:
    """Publish the session's frame and shape messages at their recorded pace divided by `speed`, once the
    ZeroMQ publisher has a subscriber (or after ``subscriber_wait_s``)."""
    stop = stop or threading.Event()
    heard = wait_for_subscribers(publishers, subscriber_wait_s, stop)
    dropped_before = dropped_messages(list(publishers))
    started = time.monotonic()
    frames = shapes = skipped = 0
    for record in reader.iter_timed(speed):
        if stop.is_set():
            break
        if record.topic not in (TOPIC_FRAME, TOPIC_SHAPE):
            continue
        message = _restamped(record.topic, record.message, time.time())
        try:
            validate(record.topic, message)
        except MessageError as error:
            skipped += 1
            log.log(logging.WARNING if skipped == 1 else logging.DEBUG, "skipping a recorded %s: %s", record.topic, error)
            continue
        if record.topic == TOPIC_FRAME:
            for publisher in publishers:
                publisher.publish_frame(message)
            frames += 1
        else:
            for publisher in publishers:
                publisher.publish_shape(message)
            shapes += 1
    not_sent = dropped_messages(list(publishers)) - dropped_before
    return ReplaySummary(frames, shapes, skipped, time.monotonic() - started, not_sent, not heard)


def _restamped(topic: str, message: dict, now: float) -> dict:
    """The message on the replay's clock (see the module docstring)."""
    restamped = {**message, "t_publish": now}
    if topic == TOPIC_FRAME and isinstance(message.get("t_capture"), int | float) and isinstance(message.get("t_publish"), int | float):
        restamped["t_capture"] = now - max(message["t_publish"] - message["t_capture"], 0.0)
    return restamped


def run_replay(
    directory: Path,
    publisher_options: PublisherOptions,
    speed: float = 1.0,
    stop: threading.Event | None = None,
    subscriber_wait_s: float = DEFAULT_SUBSCRIBER_WAIT_S,
) -> ReplaySummary:
    """Open the session and the publishers, replay, and close the publishers."""
    reader = SessionReader(directory)
    publishers = open_publishers(publisher_options)
    try:
        return replay_session(reader, publishers, speed, stop, subscriber_wait_s)
    finally:
        close_all(publishers)

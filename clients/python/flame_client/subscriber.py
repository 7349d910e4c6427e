"""Receive flame-live's ZeroMQ stream: every message validated against the wire schema before you see it."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

import zmq

from flame_client.messages import DEFAULT_ZMQ_ADDRESS, MAX_MESSAGE_BYTES, TOPICS, MessageError, decode

logger = logging.getLogger(__name__)

#: ZeroMQ itself disconnects a peer that sends more than this, so a hostile sender cannot exhaust memory;
#: smaller oversized messages reach decode and are rejected there with a reason.
_TRANSPORT_LIMIT_BYTES = 4 * MAX_MESSAGE_BYTES


class SubscriberError(Exception):
    """The subscriber cannot start (for example a malformed address); the message is one line."""


class Subscriber:
    """A ZeroMQ subscriber yielding validated ``(topic, message)`` pairs; invalid messages are counted, not raised.

    ``for topic, message in Subscriber(address, timeout_s=5):`` stops after ``timeout_s`` seconds without a valid
    message (``None`` waits forever); :meth:`receive` waits for one message with its own timeout.
    """

    def __init__(
        self,
        address: str = DEFAULT_ZMQ_ADDRESS,
        topics: Iterable[str] = TOPICS,
        timeout_s: float | None = 5.0,
        context: zmq.Context | None = None,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.rejected = 0
        self.last_rejection: str | None = None
        self._socket = (context or zmq.Context.instance()).socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, _TRANSPORT_LIMIT_BYTES)
        for topic in topics:
            if topic not in TOPICS:
                self._socket.close()
                raise SubscriberError(f"unknown topic {topic!r}; choose from {', '.join(TOPICS)}")
            self._socket.setsockopt_string(zmq.SUBSCRIBE, topic)
        try:
            self._socket.connect(address)
        except zmq.ZMQError as error:
            self._socket.close()
            reason = f"cannot connect to {address!r} ({error.strerror}); expected tcp://HOST:PORT"
            raise SubscriberError(reason) from None

    def receive(self, timeout_s: float | None = None) -> tuple[str, dict[str, Any]] | None:
        """The next valid message, or ``None`` when ``timeout_s`` passes first (``None`` waits forever)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            wait_ms = None if deadline is None else max(0, round(1000 * (deadline - time.monotonic())))
            if not self._socket.poll(wait_ms):
                return None
            frames = self._socket.recv_multipart(zmq.NOBLOCK)
            try:
                return decode(frames)
            except MessageError as error:
                self._reject(str(error))

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        while (received := self.receive(self.timeout_s)) is not None:
            yield received

    def close(self) -> None:
        self._socket.close(linger=0)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _reject(self, reason: str) -> None:
        self.rejected += 1
        self.last_rejection = reason
        # The first rejection is worth a warning; a stream of them would flood the log, so the rest are debug.
        logger.log(logging.WARNING if self.rejected == 1 else logging.DEBUG, "rejected a message: %s", reason)

"""Receive flame-live's ZeroMQ stream: every message validated against the wire schema before you see it."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from flame_client.messages import DEFAULT_ZMQ_ADDRESS, MAX_MESSAGE_BYTES, TOPICS, MessageError, decode

logger = logging.getLogger(__name__)

#: ZeroMQ itself drops the connection to a peer that sends a message part larger than this, so a hostile
#: sender cannot exhaust memory; the subscriber then reconnects and counts the rejection. Smaller oversized
#: messages reach decode and are rejected there with a reason.
TRANSPORT_LIMIT_BYTES = 2 * MAX_MESSAGE_BYTES
#: Messages ZeroMQ queues for a reader that is busy (about 1.5 s of a 30 fps stream); newer ones are dropped.
RECEIVE_QUEUE_MESSAGES = 50
#: A dropped connection that ZeroMQ does not retry within this time is one it gave up on (a message over the
#: transport limit); a publisher that went away is retried at once.
_RETRY_NOTICE_S = 0.5


class SubscriberError(Exception):
    """The subscriber cannot start (for example a malformed address); the message is one line."""


class Subscriber:
    """A ZeroMQ subscriber yielding validated ``(topic, message)`` pairs; invalid messages are counted, not raised.

    ``for topic, message in Subscriber(address, timeout_s=5):`` stops after ``timeout_s`` seconds without a valid
    message (``None`` waits forever); :meth:`receive` waits for one message with its own timeout.

    Memory stays bounded whatever the publisher sends: ZeroMQ queues at most RECEIVE_QUEUE_MESSAGES messages
    and drops the connection on a message part over TRANSPORT_LIMIT_BYTES, after which the subscriber
    reconnects (``reconnects``) and counts the message in ``rejected``.
    """

    def __init__(
        self,
        address: str = DEFAULT_ZMQ_ADDRESS,
        topics: Iterable[str] = TOPICS,
        timeout_s: float | None = 5.0,
        context: zmq.Context | None = None,
    ) -> None:
        topics = tuple(topics)
        for topic in topics:
            if topic not in TOPICS:
                raise SubscriberError(f"unknown topic {topic!r}; choose from {', '.join(TOPICS)}")
        self.address = address
        self.timeout_s = timeout_s
        self.topics = topics
        self.rejected = 0
        self.reconnects = 0
        self.last_rejection: str | None = None
        self._context = context or zmq.Context.instance()
        self._pending: collections.deque[list[bytes]] = collections.deque()
        self._open()

    def _open(self) -> None:
        """The SUB socket, with a monitor that reports when ZeroMQ drops the connection."""
        self._socket = self._context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, TRANSPORT_LIMIT_BYTES)
        self._socket.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE_MESSAGES)
        for topic in self.topics:
            self._socket.setsockopt_string(zmq.SUBSCRIBE, topic)
        self._monitor = self._socket.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED)
        try:
            self._socket.connect(self.address)
        except zmq.ZMQError as error:
            self.close()
            reason = f"cannot connect to {self.address!r} ({error.strerror}); expected tcp://HOST:PORT"
            raise SubscriberError(reason) from None
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)

    def receive(self, timeout_s: float | None = None) -> tuple[str, dict[str, Any]] | None:
        """The next valid message, or ``None`` when ``timeout_s`` passes first (``None`` waits forever)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if self._pending:
                frames = self._pending.popleft()
            else:
                wait_ms = None if deadline is None else max(0, round(1000 * (deadline - time.monotonic())))
                ready = dict(self._poller.poll(wait_ms))
                if not ready:
                    return None
                if self._socket not in ready:
                    self._check_connection()
                    continue
                frames = self._receive_parts()
                if frames is None:
                    continue
            try:
                return decode(frames)
            except MessageError as error:
                self._reject(str(error))

    def _receive_parts(self) -> list[bytes] | None:
        """One message's topic and payload; the parts of a message with more are read and dropped one by one."""
        parts = [self._socket.recv(zmq.NOBLOCK)]
        n_parts = 1
        while self._socket.getsockopt(zmq.RCVMORE):
            part = self._socket.recv(zmq.NOBLOCK)  # ZeroMQ delivers a message whole: the rest is there
            n_parts += 1
            if len(parts) < 2:
                parts.append(part)
        if n_parts > 2:
            self._reject(f"expected 2 frames [topic, payload], got {n_parts}")
            return None
        return parts

    def _check_connection(self) -> None:
        """Reconnect when ZeroMQ dropped the connection for good (it does so after an oversized message part)."""
        event = parse_monitor_message(self._monitor.recv_multipart())["event"]
        if event != zmq.EVENT_DISCONNECTED or self._monitor.poll(round(1000 * _RETRY_NOTICE_S)):
            return  # a retry is under way (or this is the retry's own notice)
        self._reject(
            f"the publisher sent a message part over {TRANSPORT_LIMIT_BYTES} bytes and ZeroMQ dropped the "
            "connection; reconnected"
        )
        while self._socket.poll(0):  # what arrived before the oversized message is still good
            frames = self._receive_parts()
            if frames is not None:
                self._pending.append(frames)
        self.close()
        self._open()
        self.reconnects += 1

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        while (received := self.receive(self.timeout_s)) is not None:
            yield received

    def close(self) -> None:
        self._socket.disable_monitor()
        self._monitor.close(linger=0)
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

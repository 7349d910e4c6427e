"""The Python client against real publishers on 127.0.0.1: the library, and the CLI run as a subprocess."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from flame_client import Subscriber, SubscriberError
from flame_client.subscriber import RECEIVE_QUEUE_MESSAGES, TRANSPORT_LIMIT_BYTES
from flame_client.messages import (
    TOPIC_FRAME,
    TOPIC_METRICS,
    TOPIC_SHAPE,
    encode,
    frame_message,
    metrics_message,
    shape_message,
)
from realtime.publishers import ZmqPublisher


def make_frame(seq: int) -> dict:
    return frame_message(
        seq=seq, t_capture=time.time() - 0.02, valid=seq % 5 != 0, exp=np.full(50, 0.1), jaw_pose=np.zeros(3),
        eye_pose=np.zeros(6), neck_pose=np.zeros(3), head_rot=[np.pi, 0.1 * np.sin(seq / 10), 0.0],
        head_trans=[0.0, 0.0, 0.6], fov_deg=60.0, blendshapes=np.full(52, 0.2),
    )  # fmt: skip


class BackgroundStream:
    """Publishes on its own thread until stopped, the way the live loop would."""

    def __init__(self, publish_once: Callable[[int], None], rate_hz: float = 100.0) -> None:
        self._publish_once = publish_once
        self._period = 1.0 / rate_hz
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        seq = 0
        while not self._stop.wait(self._period):
            self._publish_once(seq)
            seq += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@pytest.fixture
def live_publisher() -> Iterator[str]:
    """A ZmqPublisher streaming frames, a shape and metrics; yields its address."""
    with ZmqPublisher("tcp://127.0.0.1:*") as publisher:
        publisher.publish_shape(shape_message(np.zeros(100), "FLAME 2020", "0123456789abcdef"))

        def publish_once(seq: int) -> None:
            publisher.publish_frame(make_frame(seq))
            if seq % 20 == 0:
                publisher.publish_metrics(metrics_message(30.0, 40.0, 50.0, 0, 10.0, 8.0))

        stream = BackgroundStream(publish_once)
        yield publisher.endpoint
        stream.stop()


@pytest.fixture
def mixed_publisher() -> Iterator[str]:
    """A raw PUB socket alternating a valid frame with invalid messages of three kinds; yields its address."""
    context = zmq.Context()
    socket_ = context.socket(zmq.PUB)
    socket_.setsockopt(zmq.LINGER, 0)
    socket_.bind("tcp://127.0.0.1:*")
    future_version = dict(make_frame(0), v=99)
    invalid = [
        [TOPIC_FRAME.encode(), msgpack.packb(future_version)],
        [TOPIC_FRAME.encode(), b"\xc1 not msgpack"],
        [TOPIC_METRICS.encode(), b"\x00" * 300_000],
    ]
    lock = threading.Lock()

    def publish_once(seq: int) -> None:
        with lock:
            socket_.send_multipart(invalid[seq % len(invalid)])
            socket_.send_multipart(encode(TOPIC_FRAME, make_frame(seq)))

    stream = BackgroundStream(publish_once)
    yield socket_.getsockopt_string(zmq.LAST_ENDPOINT)
    stream.stop()
    socket_.close()
    context.term()


def unused_tcp_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


# ---------------------------------------------------------------------------------------------------------------
# Library


def test_subscriber_yields_validated_messages_of_every_topic(live_publisher: str) -> None:
    topics = set()
    with Subscriber(live_publisher, timeout_s=5) as subscriber:
        for topic, message in subscriber:
            topics.add(topic)
            if topic == TOPIC_FRAME:
                assert len(message["blendshapes"]) == 52 and isinstance(message["valid"], bool)
            if topics == {TOPIC_FRAME, TOPIC_SHAPE, TOPIC_METRICS}:
                break
        assert subscriber.rejected == 0
    assert topics == {TOPIC_FRAME, TOPIC_SHAPE, TOPIC_METRICS}


def test_subscriber_skips_and_counts_invalid_messages_without_raising(mixed_publisher: str) -> None:
    with Subscriber(mixed_publisher, topics=[TOPIC_FRAME, TOPIC_METRICS]) as subscriber:
        frames = [subscriber.receive(timeout_s=5) for _ in range(10)]
        assert all(item is not None and item[0] == TOPIC_FRAME for item in frames)
        assert subscriber.rejected >= 8
        assert subscriber.last_rejection is not None and "\n" not in subscriber.last_rejection


@pytest.fixture
def raw_publisher() -> Iterator[zmq.Socket]:
    context = zmq.Context()
    socket_ = context.socket(zmq.PUB)
    socket_.setsockopt(zmq.LINGER, 0)
    socket_.bind("tcp://127.0.0.1:*")
    yield socket_
    socket_.close()
    context.term()


def _receive_one_frame(subscriber: Subscriber, publisher: zmq.Socket, seq: int) -> bool:
    """Publish frames until the subscriber gets one (subscriptions take a moment to arrive); False after 100."""
    for attempt in range(100):
        publisher.send_multipart(encode(TOPIC_FRAME, make_frame(seq + attempt)))
        if subscriber.receive(timeout_s=0.1) is not None:
            return True
    return False


def test_subscriber_reconnects_after_a_message_over_the_transport_limit(raw_publisher: zmq.Socket) -> None:
    address = raw_publisher.getsockopt_string(zmq.LAST_ENDPOINT)
    with Subscriber(address, topics=[TOPIC_FRAME]) as subscriber:
        assert _receive_one_frame(subscriber, raw_publisher, 0)
        raw_publisher.send_multipart([TOPIC_FRAME.encode(), b"\x00" * (TRANSPORT_LIMIT_BYTES + 1)])
        assert _receive_one_frame(subscriber, raw_publisher, 1000), "deaf after one oversized message"
        assert subscriber.rejected == 1 and subscriber.reconnects == 1
        assert "ZeroMQ dropped the connection; reconnected" in subscriber.last_rejection


def test_subscriber_drops_extra_message_parts_and_keeps_going(raw_publisher: zmq.Socket) -> None:
    address = raw_publisher.getsockopt_string(zmq.LAST_ENDPOINT)
    with Subscriber(address, topics=[TOPIC_FRAME]) as subscriber:
        assert _receive_one_frame(subscriber, raw_publisher, 0)
        raw_publisher.send_multipart([TOPIC_FRAME.encode()] + [b"\x00" * 1000] * 200)
        assert _receive_one_frame(subscriber, raw_publisher, 1000)
        assert subscriber.rejected == 1 and subscriber.last_rejection == "expected 2 frames [topic, payload], got 201"


_QUEUE_CHILD = r"""
import sys, time
from flame_client import Subscriber
def rss_kb():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
with Subscriber(sys.argv[1], topics=["flame.frame"], timeout_s=None) as subscriber:
    print("subscribed", rss_kb(), flush=True)
    sys.stdin.readline()  # the publisher has sent everything: let it pile up, then read it all
    time.sleep(1.0)
    received = 0
    while subscriber.receive(timeout_s=1.0) is not None or subscriber.rejected > received:
        received = subscriber.rejected
    print("done", rss_kb(), subscriber.rejected, flush=True)
"""


def test_queued_large_messages_cost_the_subscriber_bounded_memory(raw_publisher: zmq.Socket) -> None:
    """300 payloads just under the transport limit (120 MB) while the reader is busy: ZeroMQ queues only a few."""
    address = raw_publisher.getsockopt_string(zmq.LAST_ENDPOINT)
    raw_publisher.setsockopt(zmq.SNDHWM, 1000)
    child = subprocess.Popen([sys.executable, "-c", _QUEUE_CHILD, address], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    started = child.stdout.readline().split()
    assert started[0] == "subscribed"
    for _ in range(50):  # until the subscription has reached the publisher
        raw_publisher.send_multipart([TOPIC_FRAME.encode(), b"probe"])
        time.sleep(0.02)
    payload = b"\x00" * (TRANSPORT_LIMIT_BYTES - 1024)  # valid size for ZeroMQ, rejected by decode
    for _ in range(300):
        raw_publisher.send_multipart([TOPIC_FRAME.encode(), payload])
    child.stdin.write("sent\n")
    child.stdin.flush()
    finished = child.stdout.readline().split()
    child.wait(timeout=60)
    assert finished[0] == "done" and int(finished[2]) >= 300  # every message reached it in the end
    growth_mb = (int(finished[1]) - int(started[1])) / 1024
    assert growth_mb < RECEIVE_QUEUE_MESSAGES * TRANSPORT_LIMIT_BYTES / 2**20 + 40, f"grew {growth_mb:.0f} MB"


def test_subscriber_iteration_ends_when_the_stream_goes_silent() -> None:
    started = time.monotonic()
    with Subscriber(unused_tcp_address(), timeout_s=0.3) as subscriber:
        assert list(subscriber) == []
        assert subscriber.receive(timeout_s=0.1) is None
    assert time.monotonic() - started < 5


def test_subscriber_refuses_unknown_topics_and_bad_addresses() -> None:
    with pytest.raises(SubscriberError, match="unknown topic 'flame.mesh'"):
        Subscriber(topics=["flame.mesh"])
    with pytest.raises(SubscriberError, match="cannot connect to 'localhost:5555'"):
        Subscriber("localhost:5555")


# ---------------------------------------------------------------------------------------------------------------
# Command line


def run_client(*arguments: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flame_client", *arguments],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def test_cli_receives_and_validates_a_live_stream(live_publisher: str) -> None:
    result = run_client("--address", live_publisher, "--count", "150", "--timeout", "10")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("received 150 messages (flame.frame ") and lines[-1].endswith("rejected 0")
    assert "flame.shape 1" in lines[-1]
    report = next(line for line in lines if line.startswith("frames "))
    assert "latency capture->receive p50" in report and "model FLAME 2020 [01234567]" in report


def test_cli_counts_rejected_messages_and_keeps_going(mixed_publisher: str) -> None:
    result = run_client("--address", mixed_publisher, "--count", "30", "--timeout", "10", "--quiet")
    assert result.returncode == 0, result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("received 30 messages (flame.frame 30)")
    assert int(summary.rsplit("rejected ", 1)[1]) >= 20
    assert "rejected a message" in result.stderr and "Traceback" not in result.stderr


def test_cli_plot_runs_off_screen(live_publisher: str) -> None:
    arguments = ("--address", live_publisher, "--count", "60", "--timeout", "10", "--plot")
    result = run_client(*arguments, env={"MPLBACKEND": "Agg"})
    assert result.returncode == 0, result.stderr
    assert "received 60 messages" in result.stdout


def test_installed_command_times_out_with_a_one_line_error() -> None:
    command = shutil.which("flame-client", path=str(Path(sys.executable).parent))
    if command is None:
        pytest.skip("the flame-client command is not installed (pip install -e .)")
    arguments = [command, "--address", unused_tcp_address(), "--timeout", "0.5"]
    result = subprocess.run(arguments, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: no valid message from tcp://127.0.0.1:")
    assert len(result.stderr.strip().splitlines()) == 1

"""Wire schema v1: builders, encode/decode round trips over real ZeroMQ sockets, and rejection of bad input."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest
import zmq

from flame_client import messages
from flame_client.messages import (
    BLENDSHAPE_NAMES,
    MAX_MESSAGE_BYTES,
    TOPIC_FRAME,
    TOPIC_METRICS,
    TOPIC_SHAPE,
    MessageError,
    decode,
    encode,
    frame_message,
    metrics_message,
    shape_message,
)
from realtime.publishers import ZmqPublisher


def make_frame(seq: int = 7, valid: bool = True, landmarks: bool = True) -> dict:
    rng = np.random.default_rng(seq)
    return frame_message(
        seq=seq,
        t_capture=time.time() - 0.03,
        valid=valid,
        exp=rng.normal(size=50).astype(np.float32),
        jaw_pose=rng.normal(scale=0.1, size=3),
        eye_pose=rng.normal(scale=0.1, size=(2, 3)),
        neck_pose=np.zeros(3),
        head_rot=np.array([math.pi - 0.1, 0.2, 0.05]),
        head_trans=np.array([0.01, -0.02, 0.6]),
        fov_deg=60.0,
        blendshapes=rng.uniform(size=52),
        landmarks=rng.uniform(0, 640, size=(478, 2)) if landmarks else None,
        image_size=(640, 480) if landmarks else None,
    )


def make_shape() -> dict:
    return shape_message(np.linspace(-1, 1, 100), "FLAME 2020", "0123456789abcdef", light=np.ones(27))


def make_metrics() -> dict:
    return metrics_message(29.7, 41.0, 55.5, 3, 12.5, 9.0, extra={"frames_total": 1200})


def test_builders_turn_numpy_into_plain_python() -> None:
    frame = make_frame()
    assert frame["v"] == messages.SCHEMA_VERSION
    assert len(frame["eye_pose"]) == 6 and len(frame["landmarks"]) == 2 * 478
    plain_types = {type(value) for key in ("exp", "eye_pose", "blendshapes", "landmarks") for value in frame[key]}
    assert plain_types == {float}
    assert type(frame["seq"]) is int and type(frame["valid"]) is bool and frame["image_size"] == [640, 480]


def test_blendshape_names_are_mediapipes_52_in_order() -> None:
    assert len(BLENDSHAPE_NAMES) == 52 == len(set(BLENDSHAPE_NAMES))
    assert BLENDSHAPE_NAMES[0] == "_neutral" and BLENDSHAPE_NAMES[9] == "eyeBlinkLeft"
    assert BLENDSHAPE_NAMES[25] == "jawOpen" and "tongueOut" not in BLENDSHAPE_NAMES


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"jaw_pose": np.zeros(4)}, "'jaw_pose' has 4 values, expected 3"),
        ({"blendshapes": np.zeros(51)}, "'blendshapes' has 51 values"),
        ({"exp": np.array([0.0, np.nan])}, "'exp' contains a non-finite value at index 1"),
        ({"landmarks": np.array([[1.0, np.inf]])}, "'landmarks' contains a non-finite value"),
    ],
)
def test_frame_builder_refuses_wrong_counts_and_non_finite_values(changes: dict, reason: str) -> None:
    arguments = dict(
        seq=1, t_capture=1.0, valid=True, exp=np.zeros(10), jaw_pose=np.zeros(3), eye_pose=np.zeros(6),
        neck_pose=np.zeros(3), head_rot=np.zeros(3), head_trans=np.zeros(3), fov_deg=50.0, blendshapes=np.zeros(52),
    )  # fmt: skip
    arguments.update(changes)
    with pytest.raises(MessageError, match=reason):
        frame_message(**arguments)


def test_landmarks_may_hold_nan_for_unobserved_points() -> None:
    frame = make_frame(landmarks=False)
    frame["landmarks"] = [1.0, 2.0, float("nan"), float("nan")]
    topic, received = decode(encode(TOPIC_FRAME, frame))
    assert math.isnan(received["landmarks"][2]) and received["landmarks"][:2] == [1.0, 2.0]


def _connected_pair(publisher: ZmqPublisher, context: zmq.Context) -> zmq.Socket:
    """A plain SUB socket on the publisher, returned once a probe frame has made it through (slow joiner)."""
    subscriber = context.socket(zmq.SUB)
    subscriber.setsockopt(zmq.LINGER, 0)
    subscriber.setsockopt(zmq.SUBSCRIBE, b"flame.")
    subscriber.connect(publisher.endpoint)
    for _ in range(200):
        publisher.publish_frame(make_frame(seq=0, landmarks=False))
        if subscriber.poll(20):
            break
    else:
        raise AssertionError("subscriber never connected")
    while subscriber.poll(50):
        subscriber.recv_multipart()
    return subscriber


def test_every_topic_round_trips_through_zeromq_and_plain_msgpack() -> None:
    context = zmq.Context()
    sent = {TOPIC_FRAME: make_frame(), TOPIC_SHAPE: make_shape(), TOPIC_METRICS: make_metrics()}
    with ZmqPublisher("tcp://127.0.0.1:*") as publisher:
        subscriber = _connected_pair(publisher, context)
        publisher.publish_frame(sent[TOPIC_FRAME])
        publisher.publish_shape(sent[TOPIC_SHAPE])
        publisher.publish_metrics(sent[TOPIC_METRICS])
        received = {}
        while len(received) < 3 and subscriber.poll(2000):
            frames = subscriber.recv_multipart()
            topic = frames[0].decode("ascii")
            # Default msgpack settings and no extension hook: what any MessagePack library would see.
            received[topic] = msgpack.unpackb(frames[1])
            assert decode(frames) == (topic, sent[topic])
        subscriber.close()
    context.term()
    assert received == sent


def test_unknown_frame_keys_are_dropped_and_metrics_extras_kept() -> None:
    frame = make_frame(landmarks=False)
    frame["future_field"] = [1, 2, 3]
    assert "future_field" not in decode([TOPIC_FRAME.encode(), msgpack.packb(frame)])[1]
    assert decode(encode(TOPIC_METRICS, make_metrics()))[1]["frames_total"] == 1200.0


def _payload_with(topic: str, **changes: object) -> list[bytes]:
    builders = {TOPIC_FRAME: lambda: make_frame(landmarks=False), TOPIC_SHAPE: make_shape, TOPIC_METRICS: make_metrics}
    message = builders[topic]()
    message.update(changes)
    return [topic.encode(), msgpack.packb(message)]


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        (_payload_with(TOPIC_FRAME, v=2), "unsupported schema version 2"),
        (_payload_with(TOPIC_SHAPE, v="1"), "unsupported schema version '1'"),
        ([b"flame.frames", b"\x80"], "unknown topic 'flame.frames'"),
        ([TOPIC_FRAME.encode()], "expected 2 frames"),
        ([TOPIC_FRAME.encode(), b"\xc1garbage"], "not valid MessagePack"),
        ([TOPIC_FRAME.encode(), msgpack.packb(msgpack.ExtType(5, b"x"))], "not valid MessagePack"),
        ([TOPIC_FRAME.encode(), msgpack.packb([1, 2])], "payload must be a map"),
        ([TOPIC_FRAME.encode(), b"\x00" * (MAX_MESSAGE_BYTES + 1)], "over the 262144-byte limit"),
        (_payload_with(TOPIC_FRAME, blendshapes=[0.5] * 51), "'blendshapes' has 51 values, expected 52"),
        (_payload_with(TOPIC_FRAME, exp=[0.0, float("inf")]), r"'exp'\[1\] must be finite"),
        (_payload_with(TOPIC_FRAME, head_rot=[0.0, "1", 0.0]), r"'head_rot'\[1\] must be a number, got str"),
        (_payload_with(TOPIC_FRAME, valid=1), "'valid' must be true or false"),
        (_payload_with(TOPIC_FRAME, seq=-1), "'seq' must be a non-negative integer"),
        (_payload_with(TOPIC_FRAME, fov_deg=0.0), "'fov_deg' must be between 0 and 180"),
        (_payload_with(TOPIC_FRAME, landmarks=[1.0, 2.0, 3.0]), "'landmarks' has 3 values"),
        (_payload_with(TOPIC_SHAPE, shape=None), "'shape' must be an array of numbers"),
        (_payload_with(TOPIC_SHAPE, model="x" * 101), "'model' must be a string"),
        (_payload_with(TOPIC_METRICS, fps=float("nan")), "'fps' must be finite"),
        (_payload_with(TOPIC_METRICS, **{"Bad Name": 1.0}), "not lower_snake_case"),
    ],
)
def test_invalid_messages_are_rejected_with_a_one_line_reason(frames: list[bytes], reason: str) -> None:
    with pytest.raises(MessageError, match=reason) as caught:
        decode(frames)
    assert "\n" not in str(caught.value)


def test_missing_field_is_named() -> None:
    frame = make_frame(landmarks=False)
    del frame["head_trans"]
    with pytest.raises(MessageError, match="flame.frame: missing field 'head_trans'"):
        decode([TOPIC_FRAME.encode(), msgpack.packb(frame)])


def test_encode_refuses_what_decode_would_reject() -> None:
    frame = make_frame(landmarks=False)
    frame["exp"] = []
    with pytest.raises(MessageError, match="'exp' has 0 values"):
        encode(TOPIC_FRAME, frame)


def test_schema_and_client_import_without_torch_or_mediapipe() -> None:
    code = (
        "import sys, flame_client.messages, realtime.publishers, flame_client, flame_client.cli\n"
        "heavy = sorted(m for m in ('torch', 'mediapipe', 'cv2', 'matplotlib') if m in sys.modules)\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

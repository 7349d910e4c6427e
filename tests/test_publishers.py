"""Publishers over real sockets on 127.0.0.1: ZeroMQ behaviour, native OSC and VMC as python-osc receives them,
and the conversion of our head rotation into a Unity avatar's bones."""

from __future__ import annotations

import math
import queue
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import zmq
from pythonosc.dispatcher import Dispatcher
from pythonosc.osc_bundle import OscBundle
from pythonosc.osc_packet import OscPacket
from pythonosc.osc_server import BlockingOSCUDPServer
from scipy.spatial.transform import Rotation

from engine.errors import UserError
from flame_client.messages import BLENDSHAPE_NAMES, TOPIC_SHAPE, decode, frame_message, metrics_message, shape_message
from flame_client.rotations import quaternion_multiply, rotate_vector
from realtime.publishers import GREETING_INTERVAL_S, OscPublisher, VmcOptions, VmcPublisher, ZmqPublisher
from realtime.vmc import ARKIT_BLENDSHAPE_NAMES, PERFECT_SYNC_NAMES, unity_neck_and_head

FRONTAL_HEAD_ROT = np.array([math.pi, 0.0, 0.0])


def make_frame(valid: bool = True, head_rot: np.ndarray = FRONTAL_HEAD_ROT, landmarks: bool = False) -> dict:
    blendshapes = np.full(52, 0.25)
    blendshapes[BLENDSHAPE_NAMES.index("eyeBlinkLeft")] = 0.9
    blendshapes[BLENDSHAPE_NAMES.index("eyeBlinkRight")] = 0.1
    blendshapes[BLENDSHAPE_NAMES.index("jawOpen")] = 0.6
    return frame_message(
        seq=42, t_capture=1_700_000_000.125, valid=valid, exp=np.arange(20) / 10, jaw_pose=[0.1, 0.0, 0.0],
        eye_pose=np.arange(6) / 100, neck_pose=[0.0, 0.05, 0.0], head_rot=head_rot, head_trans=[0.01, 0.02, 0.6],
        fov_deg=55.0, blendshapes=blendshapes, t_publish=1_700_000_000.25,
        landmarks=np.random.default_rng(0).uniform(0, 640, size=(478, 2)) if landmarks else None,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# A real OSC receiver


class RecordingDispatcher(Dispatcher):
    """python-osc's dispatcher, also keeping each datagram as (is_bundle, [(address, arguments), ...])."""

    def __init__(self) -> None:
        super().__init__()
        self.datagrams: queue.Queue[tuple[bool, list[tuple[str, list]]]] = queue.Queue()

    def call_handlers_for_packet(self, data: bytes, client_address: tuple[str, int]) -> list:
        contents = [(timed.message.address, list(timed.message.params)) for timed in OscPacket(data).messages]
        self.datagrams.put((OscBundle.dgram_is_bundle(data), contents))
        return super().call_handlers_for_packet(data, client_address)

    def next(self) -> tuple[bool, list[tuple[str, list]]]:
        return self.datagrams.get(timeout=5)


@pytest.fixture
def osc_server() -> Iterator[tuple[RecordingDispatcher, int]]:
    dispatcher = RecordingDispatcher()
    # One thread handling datagrams in arrival order, so tests can rely on the order they were sent in.
    server = BlockingOSCUDPServer(("127.0.0.1", 0), dispatcher)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield dispatcher, server.server_address[1]
    server.shutdown()
    server.server_close()


def _arguments(contents: list[tuple[str, list]], address: str) -> list:
    matches = [arguments for found, arguments in contents if found == address]
    assert len(matches) == 1, f"{address} appears {len(matches)} times"
    return matches[0]


# ---------------------------------------------------------------------------------------------------------------
# VMC


def test_perfect_sync_names_are_the_52_arkit_names_in_upper_camel_case() -> None:
    assert len(PERFECT_SYNC_NAMES) == 52 == len(set(PERFECT_SYNC_NAMES))
    assert {"EyeBlinkLeft", "JawOpen", "MouthSmileRight", "BrowInnerUp", "TongueOut"} <= set(PERFECT_SYNC_NAMES)
    assert set(ARKIT_BLENDSHAPE_NAMES) == set(BLENDSHAPE_NAMES[1:]) | {"tongueOut"}
    for name, arkit in zip(PERFECT_SYNC_NAMES, ARKIT_BLENDSHAPE_NAMES):
        assert name[0].isupper() and name[0].lower() + name[1:] == arkit


@pytest.mark.parametrize("mirror", [True, False])
def test_vmc_sends_status_bones_then_all_blendshapes_and_apply_in_one_bundle(osc_server, mirror: bool) -> None:
    dispatcher, port = osc_server
    with VmcPublisher("127.0.0.1", port, VmcOptions(mirror=mirror)) as publisher:
        publisher.publish_frame(make_frame())
        is_bundle, pose = dispatcher.next()
        blend_is_bundle, blends = dispatcher.next()

    assert is_bundle and [address for address, _ in pose] == [
        "/VMC/Ext/OK", "/VMC/Ext/T", "/VMC/Ext/Root/Pos", "/VMC/Ext/Bone/Pos", "/VMC/Ext/Bone/Pos",
    ]  # fmt: skip
    assert _arguments(pose, "/VMC/Ext/OK") == [1, 3, 0, 1]
    assert isinstance(_arguments(pose, "/VMC/Ext/T")[0], float)
    assert _arguments(pose, "/VMC/Ext/Root/Pos") == ["root", 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    bones = {arguments[0]: arguments[1:] for address, arguments in pose if address == "/VMC/Ext/Bone/Pos"}
    assert set(bones) == {"Neck", "Head"}
    for values in bones.values():
        assert len(values) == 7 and all(isinstance(value, float) for value in values)
        assert np.linalg.norm(values[3:]) == pytest.approx(1.0, abs=1e-6)

    assert blend_is_bundle and len(blends) == 53
    assert [address for address, _ in blends] == ["/VMC/Ext/Blend/Val"] * 52 + ["/VMC/Ext/Blend/Apply"]
    assert blends[-1][1] == []
    values = {arguments[0]: arguments[1] for address, arguments in blends[:-1]}
    assert set(values) == set(PERFECT_SYNC_NAMES)
    # The person's left eye is nearly closed: a mirror image closes the avatar's right eye, a puppet its left.
    assert values["EyeBlinkRight" if mirror else "EyeBlinkLeft"] == pytest.approx(0.9)
    assert values["EyeBlinkLeft" if mirror else "EyeBlinkRight"] == pytest.approx(0.1)
    assert values["JawOpen"] == pytest.approx(0.6) and values["TongueOut"] == 0.0


def test_vmc_without_a_face_sends_only_the_status(osc_server) -> None:
    dispatcher, port = osc_server
    with VmcPublisher("127.0.0.1", port) as publisher:
        publisher.publish_frame(make_frame(valid=False))
        publisher.publish_frame(make_frame(valid=True))
        is_bundle, contents = dispatcher.next()
        _, next_contents = dispatcher.next()
    assert is_bundle and [address for address, _ in contents] == ["/VMC/Ext/OK", "/VMC/Ext/T"]
    assert contents[0][1] == [1, 3, 0, 0]
    assert _arguments(next_contents, "/VMC/Ext/OK") == [1, 3, 0, 1], "the face-less frame sent more than its status"


def _head_rot_from_axes(forward_cam: tuple[float, ...], up_cam: tuple[float, ...]) -> np.ndarray:
    """head_rot from where the face's forward (+z) and up (+y) axes point in OpenCV camera space.

    Built from geometry alone, independently of the code under test; x = y cross z (FLAME is right-handed).
    """
    forward, up = np.asarray(forward_cam, dtype=float), np.asarray(up_cam, dtype=float)
    return Rotation.from_matrix(np.column_stack([np.cross(up, forward), up, forward])).as_rotvec()


def _avatar_axes(head_rot: np.ndarray, mirror: bool, neck_share: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Where the avatar's head faces and where its top points, in Unity axes (+x right, +y up, +z forward)."""
    neck, head = unity_neck_and_head(head_rot, np.zeros(3), mirror, neck_share)
    world = quaternion_multiply(neck, head)
    return rotate_vector(world, [0, 0, 1]), rotate_vector(world, [0, 1, 0])


ANGLE = math.radians(30)
S, C = math.sin(ANGLE), math.cos(ANGLE)


def test_a_head_facing_the_camera_leaves_the_avatar_at_rest() -> None:
    for mirror in (True, False):
        neck, head = unity_neck_and_head(FRONTAL_HEAD_ROT, np.zeros(3), mirror, 0.5)
        np.testing.assert_allclose(neck, [0, 0, 0, 1], atol=1e-12)
        np.testing.assert_allclose(head, [0, 0, 0, 1], atol=1e-12)


def test_yaw_to_the_users_left_turns_a_mirrored_avatar_to_its_right() -> None:
    # Facing the camera the face points along -z; the user's left is the image's right (+x).
    head_rot = _head_rot_from_axes(forward_cam=(S, 0, -C), up_cam=(0, -1, 0))
    mirrored_forward, _ = _avatar_axes(head_rot, mirror=True)
    puppet_forward, _ = _avatar_axes(head_rot, mirror=False)
    # The avatar faces the user from the screen: its right (+x) is on the user's left, as in a mirror.
    np.testing.assert_allclose(mirrored_forward, [S, 0, C], atol=1e-9)
    # A puppet copies the motion literally: it turns to its own left (-x).
    np.testing.assert_allclose(puppet_forward, [-S, 0, C], atol=1e-9)


def test_looking_up_tilts_the_avatars_face_up_in_both_modes() -> None:
    # Chin up: the face turns toward the image's top (-y) and the top of the head tips away from the camera.
    head_rot = _head_rot_from_axes(forward_cam=(0, -S, -C), up_cam=(0, -C, S))
    for mirror in (True, False):
        forward, up = _avatar_axes(head_rot, mirror)
        np.testing.assert_allclose(forward, [0, S, C], atol=1e-9)
        np.testing.assert_allclose(up, [0, C, -S], atol=1e-9)


def test_tilting_toward_the_left_shoulder_rolls_a_mirrored_avatar_toward_its_right() -> None:
    head_rot = _head_rot_from_axes(forward_cam=(0, 0, -1), up_cam=(S, -C, 0))
    _, mirrored_up = _avatar_axes(head_rot, mirror=True)
    _, puppet_up = _avatar_axes(head_rot, mirror=False)
    np.testing.assert_allclose(mirrored_up, [S, C, 0], atol=1e-9)
    np.testing.assert_allclose(puppet_up, [-S, C, 0], atol=1e-9)


def test_the_neck_takes_its_share_and_the_head_the_rest_plus_flames_neck_joint() -> None:
    head_rot = _head_rot_from_axes(forward_cam=(S, 0, -C), up_cam=(0, -1, 0))
    neck, head = unity_neck_and_head(head_rot, np.zeros(3), mirror=True, neck_share=0.25)
    assert 2 * math.degrees(math.acos(neck[3])) == pytest.approx(7.5)
    assert 2 * math.degrees(math.acos(head[3])) == pytest.approx(22.5)
    neck, head = unity_neck_and_head(FRONTAL_HEAD_ROT, np.array([0.0, 0.3, 0.0]), mirror=False, neck_share=0.5)
    np.testing.assert_allclose(neck, [0, 0, 0, 1], atol=1e-12)
    np.testing.assert_allclose(head, [0, -math.sin(0.15), 0, math.cos(0.15)], atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Native OSC


def test_osc_frame_bundle_carries_every_parameter(osc_server) -> None:
    dispatcher, port = osc_server
    frame = make_frame()
    with OscPublisher("127.0.0.1", port, blendshape_addresses=True) as publisher:
        publisher.publish_frame(frame)
        is_bundle, contents = dispatcher.next()
    assert is_bundle
    assert _arguments(contents, "/flame/frame") == [42, 1_700_000_000.125, 1_700_000_000.25, 1]
    assert _arguments(contents, "/flame/head") == pytest.approx(frame["head_rot"] + frame["head_trans"], rel=1e-6)
    pose = frame["neck_pose"] + frame["jaw_pose"] + frame["eye_pose"]
    assert _arguments(contents, "/flame/pose") == pytest.approx(pose, rel=1e-6, abs=1e-9)
    assert _arguments(contents, "/flame/exp") == pytest.approx(frame["exp"], rel=1e-6)
    assert _arguments(contents, "/flame/blendshapes") == pytest.approx(frame["blendshapes"])
    assert _arguments(contents, "/flame/fov") == [pytest.approx(55.0)]
    assert _arguments(contents, "/flame/blendshape/jawOpen") == [pytest.approx(0.6)]
    assert len([address for address, _ in contents if address.startswith("/flame/blendshape/")]) == 52


def test_osc_without_a_face_sends_only_the_frame_header(osc_server) -> None:
    dispatcher, port = osc_server
    with OscPublisher("127.0.0.1", port) as publisher:
        publisher.publish_frame(make_frame(valid=False))
        publisher.publish_frame(make_frame(valid=True))
        _, contents = dispatcher.next()
        _, next_contents = dispatcher.next()
    assert contents == [("/flame/frame", [42, 1_700_000_000.125, 1_700_000_000.25, 0])]
    assert _arguments(next_contents, "/flame/frame")[-1] == 1


def test_osc_shape_and_metrics(osc_server) -> None:
    dispatcher, port = osc_server
    with OscPublisher("127.0.0.1", port) as publisher:
        publisher.publish_shape(shape_message(np.arange(10) / 10, "FLAME 2023", "feedc0de", light=np.ones(27)))
        _, shape = dispatcher.next()
        publisher.publish_metrics(metrics_message(30.0, 40.0, 50.0, 2, 11.0, 7.5, extra={"frames_total": 99}))
        _, metrics = dispatcher.next()
    assert _arguments(shape, "/flame/model") == ["FLAME 2023", "feedc0de"]
    assert _arguments(shape, "/flame/shape") == pytest.approx(list(np.arange(10) / 10))
    assert _arguments(shape, "/flame/light") == [1.0] * 27
    received = {address: arguments[0] for address, arguments in metrics}
    assert received["/flame/metrics/fps"] == 30.0 and received["/flame/metrics/frames_total"] == 99.0
    assert received["/flame/metrics/dropped_frames"] == 2.0 and "/flame/metrics/t_publish" in received


@pytest.mark.parametrize("publisher_type", [OscPublisher, VmcPublisher])
def test_udp_publishers_reject_bad_hosts_and_ports(publisher_type: type) -> None:
    with pytest.raises(UserError, match="port 70000 is not between 1 and 65535"):
        publisher_type("127.0.0.1", 70000)
    with pytest.raises(UserError, match="cannot resolve"):
        publisher_type("no-such-host.invalid", 9000)


# ---------------------------------------------------------------------------------------------------------------
# ZeroMQ


def test_a_slow_subscriber_never_blocks_publishing() -> None:
    context = zmq.Context()
    with ZmqPublisher("tcp://127.0.0.1:*") as publisher:
        subscriber = context.socket(zmq.SUB)
        subscriber.setsockopt(zmq.RCVHWM, 10)
        subscriber.setsockopt(zmq.LINGER, 0)
        subscriber.setsockopt(zmq.SUBSCRIBE, b"")
        subscriber.connect(publisher.endpoint)
        frame = make_frame(landmarks=True)  # about 10 KB, so the kernel's socket buffers fill up quickly
        while not subscriber.poll(10):
            publisher.publish_frame(frame)
        # From here on the subscriber reads nothing; every publish must still return.
        published = 3000
        for _ in range(published):
            publisher.publish_frame(frame)
        delivered = 0
        while subscriber.poll(200):
            subscriber.recv_multipart()
            delivered += 1
        subscriber.close()
    context.term()
    assert delivered < published, "messages were queued for the slow subscriber instead of dropped"


def test_a_port_in_use_is_a_user_error_naming_the_port_and_option() -> None:
    with ZmqPublisher("tcp://127.0.0.1:*") as first:
        port = first.endpoint.rsplit(":", 1)[1]
        with pytest.raises(UserError) as caught:
            ZmqPublisher(f"tcp://127.0.0.1:{port}")
    message = str(caught.value)
    assert f"port {port} is already in use" in message and "--zmq" in message and "\n" not in message
    # Closing released the port at once (LINGER 0).
    ZmqPublisher(f"tcp://127.0.0.1:{port}").close()


def test_a_malformed_address_is_a_user_error() -> None:
    with pytest.raises(UserError, match="give --zmq as tcp://HOST:PORT"):
        ZmqPublisher("tcp://127.0.0.1")


def test_a_late_subscriber_receives_the_current_shape_at_once() -> None:
    context = zmq.Context()
    shape = shape_message(np.zeros(100), "demo head (not FLAME)", "0011223344556677")
    with ZmqPublisher("tcp://127.0.0.1:*") as publisher:
        publisher.publish_shape(shape)
        subscriber = context.socket(zmq.SUB)
        subscriber.setsockopt(zmq.LINGER, 0)
        subscriber.setsockopt(zmq.SUBSCRIBE, TOPIC_SHAPE.encode())
        subscriber.connect(publisher.endpoint)
        received = None
        for _ in range(200):  # frames only: the shape must come from the subscription itself
            publisher.publish_frame(make_frame())
            if subscriber.poll(20):
                received = decode(subscriber.recv_multipart())
                break
        subscriber.close()
    context.term()
    assert received == (TOPIC_SHAPE, shape)


def test_a_flood_of_subscriptions_gets_the_identity_once_per_interval_and_frames_keep_flowing() -> None:
    """One local process sending 5000 subscriptions must not make the live loop re-send the identity each time."""
    context = zmq.Context()
    shape = shape_message(np.zeros(100), "demo head (not FLAME)", "0011223344556677", tex=np.full(12288, 0.5))
    with ZmqPublisher("tcp://127.0.0.1:*") as publisher:
        publisher.publish_shape(shape)
        observer = context.socket(zmq.SUB)  # an ordinary client reading both topics
        observer.setsockopt(zmq.LINGER, 0)
        observer.setsockopt(zmq.RCVHWM, 100_000)
        observer.setsockopt(zmq.SUBSCRIBE, b"flame.")
        observer.connect(publisher.endpoint)
        while not observer.poll(10):  # connected once the identity greeting arrives
            publisher.publish_frame(make_frame())
        while observer.poll(100):
            observer.recv_multipart()
        flooder = context.socket(zmq.XSUB)
        flooder.setsockopt(zmq.LINGER, 0)
        flooder.connect(publisher.endpoint)
        for _ in range(5000):
            flooder.send(b"\x01" + TOPIC_SHAPE.encode())
        sends_before, started = publisher.identity_sends, time.monotonic()
        topics = []
        for _ in range(300):
            publisher.publish_frame(make_frame())
            topic = None
            while topic != "flame.frame" and observer.poll(2000):  # read up to this frame before the next
                topic, _message = decode(observer.recv_multipart())
                topics.append(topic)
            if topic != "flame.frame":
                break  # the frame was lost
        elapsed = time.monotonic() - started
        flooder.close()
        observer.close()
    context.term()
    allowed = 2 + elapsed / GREETING_INTERVAL_S
    assert topics.count("flame.frame") == 300 and publisher.dropped == 0
    assert topics.count(TOPIC_SHAPE) <= allowed and publisher.identity_sends - sends_before <= allowed


@pytest.mark.parametrize("publisher_type", [OscPublisher, VmcPublisher])
def test_udp_senders_listen_only_on_the_address_that_reaches_the_receiver(publisher_type: type) -> None:
    with publisher_type("127.0.0.1", 9100) as local, publisher_type("localhost", 9100) as by_name:
        assert local.local_address[0] == "127.0.0.1" and by_name.local_address[0] == "127.0.0.1"
        local.publish_frame(make_frame())  # sending does not widen the binding
        assert local.local_address[0] == "127.0.0.1"
    remote = "192.0.2.1"  # TEST-NET-1: never a real host; the route to it picks one of our interfaces
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((remote, 9100))
        except OSError:
            pytest.skip("this machine has no route beyond loopback")
        interface = probe.getsockname()[0]
    with publisher_type(remote, 9100) as publisher:
        assert publisher.local_address[0] == interface != "0.0.0.0"

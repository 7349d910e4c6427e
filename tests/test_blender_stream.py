"""The Blender add-on's parts that need no Blender: OSC decoding, the UDP receiver (real sockets on 127.0.0.1, fed
by our own OSC publisher, VMC packets and garbage), the MessagePack reader and "Import tracking"'s file readers.
The add-on inside Blender is tested in tests/test_blender_addon.py."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import time
import zipfile

import msgpack
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from flame_client.messages import frame_message, metrics_message, shape_message
from flame_live_blender.msgpack_reader import MsgpackError, iter_objects
from flame_live_blender.osc import OscError, decode_packet
from flame_live_blender.poses import pose_from_axis_angles, pose_from_tracking
from flame_live_blender.recordings import RecordingError, load_motion, poses_on_frames
from flame_live_blender.stream import StreamError, StreamFrame, UdpReceiver
from realtime.publishers import OscPublisher, VmcPublisher, osc_bundle, osc_message
from realtime.session import SessionReader
from run_stream import main


def make_frame(seq: int, valid: bool = True, t_publish: float | None = None) -> dict:
    rng = np.random.default_rng(seq)
    return frame_message(
        seq=seq, t_capture=1_700_000_000.0 + seq / 25, valid=valid, exp=rng.normal(size=50),
        jaw_pose=rng.normal(size=3) * 0.1, eye_pose=rng.normal(size=6) * 0.1, neck_pose=rng.normal(size=3) * 0.1,
        head_rot=[math.pi, 0.1, 0.0],
        head_trans=[0.01, 0.02, 0.6], fov_deg=40.0, blendshapes=np.full(52, 0.5), t_publish=t_publish,
    )  # fmt: skip


def poll_until(receiver: UdpReceiver, packets: int) -> list[StreamFrame]:
    """Poll until `packets` datagrams were read; localhost UDP is delivered at once, the loop only guards a busy box."""
    deadline = time.monotonic() + 10
    frames = receiver.poll()
    while receiver.counts.packets < packets and time.monotonic() < deadline:
        time.sleep(0.005)
        frames += receiver.poll()
    return frames


@pytest.fixture
def receiver():
    with_receiver = UdpReceiver("127.0.0.1", 0)
    yield with_receiver
    with_receiver.close()


def test_the_receiver_keeps_the_newest_frame_from_our_osc_publisher(receiver: UdpReceiver) -> None:
    with OscPublisher("127.0.0.1", receiver.port) as publisher:
        publisher.publish_shape(shape_message(np.zeros(10), "demo head (not FLAME)", "abc"))
        publisher.publish_metrics(
            metrics_message(
                fps=25.0, latency_p50_ms=1.0, latency_p95_ms=2.0, dropped_frames=0, mediapipe_ms=1.0, tracker_ms=1.0
            )
        )
        for seq in range(3):
            publisher.publish_frame(make_frame(seq))
        publisher.publish_frame(make_frame(3, valid=False))
    frames = poll_until(receiver, 6)
    assert [frame.seq for frame in frames] == [0, 1, 2]
    frame, sent = frames[-1], make_frame(2)
    assert receiver.counts.frames == 3 and receiver.counts.no_face == 1 and receiver.counts.other_flame == 2
    assert receiver.counts.foreign == receiver.counts.invalid == 0
    np.testing.assert_allclose(frame.exp, sent["exp"], atol=1e-6)  # 32-bit floats on the wire
    np.testing.assert_allclose(frame.head_rot, sent["head_rot"], atol=1e-6)
    np.testing.assert_allclose(frame.head_trans, sent["head_trans"], atol=1e-6)
    np.testing.assert_allclose(frame.neck_pose, sent["neck_pose"], atol=1e-6)
    np.testing.assert_allclose(frame.jaw_pose, sent["jaw_pose"], atol=1e-6)
    np.testing.assert_allclose(frame.eye_pose, sent["eye_pose"], atol=1e-6)
    assert frame.t_capture == sent["t_capture"]


def test_foreign_packets_are_counted_and_ignored(receiver: UdpReceiver) -> None:
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target = ("127.0.0.1", receiver.port)
    with VmcPublisher("127.0.0.1", receiver.port) as vmc:
        vmc.publish_frame(make_frame(1))  # two bundles of another OSC protocol
    garbage = [
        b"",
        b"hello",
        b"\x00" * 8,
        b"#bundle\x00" + b"\x00" * 8 + b"\x00\x00\x00\x40",
        np.random.default_rng(0).bytes(300),
    ]
    for datagram in garbage:
        sender.sendto(datagram, target)
    broken = osc_bundle(
        [osc_message("/flame/frame", "iddi", 7, 1.0, 2.0, 1), osc_message("/flame/head", "fff", 0.0, 0.0, 0.0)]
    )
    sender.sendto(broken, target)
    nan_exp = osc_bundle([
        osc_message("/flame/frame", "iddi", 8, 1.0, 2.0, 1), osc_message("/flame/head", "ffffff", *[0.0] * 6),
        osc_message("/flame/pose", "f" * 12, *[0.0] * 12), osc_message("/flame/exp", "ff", float("nan"), 0.0),
    ])  # fmt: skip
    sender.sendto(nan_exp, target)
    with OscPublisher("127.0.0.1", receiver.port) as publisher:
        publisher.publish_frame(make_frame(5))
    sender.close()
    frames = poll_until(receiver, 2 + len(garbage) + 3)
    assert [frame.seq for frame in frames] == [5]
    assert receiver.counts.foreign == 2 + len(garbage)
    assert receiver.counts.invalid == 2


def test_late_frames_are_ignored_but_a_restarted_sender_is_followed(receiver: UdpReceiver) -> None:
    with OscPublisher("127.0.0.1", receiver.port) as publisher:
        publisher.publish_frame(make_frame(10, t_publish=100.0))
        publisher.publish_frame(make_frame(9, t_publish=99.0))  # overtaken on the way: late
        assert [frame.seq for frame in poll_until(receiver, 2)] == [10]
        assert receiver.counts.late == 1
        publisher.publish_frame(make_frame(0, t_publish=200.0))  # a new run of the sender starts again at 0
        assert [frame.seq for frame in poll_until(receiver, 3)] == [0]


def test_a_port_in_use_is_one_clear_line(receiver: UdpReceiver) -> None:
    with pytest.raises(StreamError, match=f"port {receiver.port} is already in use"):
        UdpReceiver("127.0.0.1", receiver.port)
    with pytest.raises(StreamError, match="between 1 and 65535"):
        UdpReceiver("127.0.0.1", 70000)


def test_the_osc_decoder_refuses_malformed_packets_with_one_reason() -> None:
    good = osc_message("/flame/exp", "ff", 1.0, 2.0)
    assert decode_packet(good)[0].arguments == (1.0, 2.0)
    assert decode_packet(osc_bundle([good, osc_bundle([good])]))[1].address == "/flame/exp"
    for packet in (
        good[:-4],
        good + b"\x00\x00\x00",
        b"/a\x00\x00,q\x00\x00",
        b"/ab\x00,f\x00\x00",
        b"/a\x00x,f\x00\x00\x00\x00\x00\x00",
    ):
        with pytest.raises(OscError):
            decode_packet(packet)
    rng = np.random.default_rng(1)
    for _ in range(2000):  # random corruption of a real frame bundle: OscError or a decode, never anything else
        packet = bytearray(osc_bundle([good, osc_message("/flame/frame", "iddi", 1, 2.0, 3.0, 1)]))
        packet[rng.integers(len(packet))] = rng.integers(256)
        try:
            decode_packet(bytes(packet))
        except OscError:
            pass


def test_the_msgpack_reader_reads_what_msgpack_writes_and_stops_at_a_cut() -> None:
    objects = [
        {"t": 1.5, "topic": "flame.frame", "v": None, "msg": {"exp": [0.5, -2.25] * 40, "valid": True, "seq": 70000}},
        {
            "ints": [0, 1, 127, 128, 255, 65536, 2**40, -1, -32, -33, -200, -40000, -(2**40)],
            "s": "é" * 40,
            "b": b"\x01\x02",
        },
        {
            "long": "x" * 70000,
            "f32": np.float32(0.25).item(),
            "nested": [[[]]],
            "flag": False,
            "map": {str(i): i for i in range(20)},
        },
    ]
    data = b"".join(msgpack.packb(item, use_bin_type=True) for item in objects)
    assert list(iter_objects(data)) == objects
    assert list(iter_objects(data[:-3])) == objects[:2]
    assert list(iter_objects(msgpack.packb(1.0, use_single_float=True))) == [1.0]
    with pytest.raises(MsgpackError):
        list(iter_objects(b"\xc1"))


def test_stream_and_tracking_poses_place_the_head_in_the_same_gltf_world() -> None:
    """A track frame (cam: OpenGL view) and the live stream's camera-space pose of the same placement agree."""
    cam = np.array([0.3, -0.2, 0.1, 0.01, -0.02, -0.5])
    joints = np.random.default_rng(2).normal(size=12) * 0.1
    tracked = pose_from_tracking(cam, joints[:3], joints[3:6], joints[6:], np.arange(5.0))
    cam_rotation = Rotation.from_euler("ZYX", [cam[2], cam[0], cam[1]]).as_matrix()  # Rz(roll) Ry(yaw) Rx(pitch)
    np.testing.assert_allclose(tracked.head_rotation, cam_rotation, atol=1e-12)
    to_camera = np.diag([1.0, -1.0, -1.0])  # the README: x_cam = diag(1,-1,-1) (R(cam) x + t)
    head_rot = Rotation.from_matrix(to_camera @ cam_rotation).as_rotvec()
    streamed = pose_from_axis_angles(head_rot, to_camera @ cam[3:], joints[:3], joints[3:6], joints[6:], np.arange(5.0))
    np.testing.assert_allclose(streamed.head_rotation, tracked.head_rotation, atol=1e-12)
    np.testing.assert_allclose(streamed.head_translation, tracked.head_translation, atol=1e-12)
    np.testing.assert_array_equal(streamed.joint_poses, tracked.joint_poses)
    np.testing.assert_array_equal(tracked.joint_poses[2:], joints[6:].reshape(2, 3))  # left eye, then right eye


def test_import_tracking_reads_a_recorded_session_like_the_projects_reader(recorded_session) -> None:
    motion = load_motion(recorded_session)
    frames = [record for record in SessionReader(recorded_session).messages() if record.topic == "flame.frame"]
    assert len(motion.poses) == len(frames) == 40 and motion.valid_frames > 30
    index, record = next((i, r) for i, r in enumerate(frames) if r.message["valid"])
    pose = motion.poses[index]
    to_gltf = np.diag([1.0, -1.0, -1.0])  # flame_client.rig: glTF world is OpenCV camera space turned about x
    np.testing.assert_allclose(
        pose.head_rotation, to_gltf @ Rotation.from_rotvec(record.message["head_rot"]).as_matrix(), atol=1e-12
    )
    np.testing.assert_allclose(pose.head_translation, to_gltf @ record.message["head_trans"], atol=1e-12)
    np.testing.assert_allclose(pose.exp, record.message["exp"])
    assert motion.times[0] == 0.0 and motion.times[-1] == pytest.approx(frames[-1].t_capture - frames[0].t_capture)


def test_import_tracking_refuses_folders_it_cannot_read(tmp_path) -> None:
    with pytest.raises(RecordingError, match="neither tracking.npz"):
        load_motion(tmp_path)
    with pytest.raises(RecordingError, match="is not a folder"):
        load_motion(tmp_path / "missing")
    np.savez(tmp_path / "tracking.npz", exp=np.zeros((2, 5)))
    with pytest.raises(RecordingError, match="lacks jaw_pose, neck_pose, eye_pose, cam"):
        load_motion(tmp_path)
    session = tmp_path / "session"
    session.mkdir()
    (session / "session.json").write_text("{}")
    (session / "frames.msgpack").write_bytes(msgpack.packb({"topic": "flame.shape", "msg": {}}))
    with pytest.raises(RecordingError, match="holds no frames"):
        load_motion(session)


def test_the_addon_zip_runs_its_maths_without_pyzmq_or_msgpack(tmp_path) -> None:
    """Blender has neither: the zip's own modules and its copy of flame_client's rig maths must do without."""
    out = tmp_path / "flame_live_blender.zip"
    assert main(["blender-addon", "--out", str(out)]) == 0
    names = zipfile.ZipFile(out).namelist()
    assert "flame_live_blender/__init__.py" in names and "flame_live_blender/packaging.py" not in names
    vendored = "flame_live_blender/vendored/flame_client"
    assert {f"{vendored}/rig.py", f"{vendored}/rotations.py"} <= set(names)
    script = (
        "import sys; sys.modules['zmq'] = sys.modules['msgpack'] = None; sys.path.insert(0, sys.argv[1]);"
        "from flame_live_blender import recordings, stream; from flame_live_blender.rig_maths import rig;"
        "print(rig.__name__, len(rig.pose_corrective_weights([0.1, 0, 0], [0.2, 0, 0], [0] * 3, [0] * 3)))"
    )
    done = subprocess.run([sys.executable, "-I", "-c", script, str(out)], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["flame_live_blender.vendored.flame_client.rig", "36"]


def test_samples_land_on_scene_frames_and_faceless_ones_hold_the_last_pose() -> None:
    a, b, c = (pose_from_axis_angles([math.pi, 0, 0], [0, 0, 0.5], [k, 0, 0], [0] * 3, [0] * 6, [k]) for k in range(3))
    times = [0.0, 0.04, 0.08, 0.12, 0.16, 0.20, 0.21]
    by_frame, held = poses_on_frames(times, [None, a, None, b, None, c, b], start_frame=10, fps=25)
    assert held == 2  # the leading faceless sample has nothing to hold and is not keyed
    assert by_frame == {11: a, 12: a, 13: b, 14: b, 15: b}  # 0.21 s rounds to frame 15 too: the last sample wins

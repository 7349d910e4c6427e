"""Live Link Face packets for Unreal, received on a real UDP socket and read by a decoder written here from the
public layout (think-biq/LLV's "Frame layout" and src/llv/gesicht.py, JimWest/PyLiveLinkFace's decode), not from
our encoder; the angles also against Epic's own route (quaternion conversion, FQuat::Rotator); then the whole
`live --livelink` command on a real clip, and its bad input."""

from __future__ import annotations

import math
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from engine.errors import UserError
from flame_client.messages import BLENDSHAPE_NAMES, frame_message
from realtime.outputs import publisher_options
from realtime.publishers import LiveLinkPublisher

REPO_ROOT = Path(__file__).resolve().parents[1]
GRID_CLIP = "bbaf2n.mpg"  # 75 frames, a frontal speaker
FRONTAL_HEAD_ROT = np.array([math.pi, 0.0, 0.0])

#: Unreal's EARFaceBlendShape enum, in order, as the public readers list it.
CURVES = (
    "EyeBlinkLeft EyeLookDownLeft EyeLookInLeft EyeLookOutLeft EyeLookUpLeft EyeSquintLeft EyeWideLeft EyeBlinkRight "
    "EyeLookDownRight EyeLookInRight EyeLookOutRight EyeLookUpRight EyeSquintRight EyeWideRight JawForward JawLeft "
    "JawRight JawOpen MouthClose MouthFunnel MouthPucker MouthLeft MouthRight MouthSmileLeft MouthSmileRight "
    "MouthFrownLeft MouthFrownRight MouthDimpleLeft MouthDimpleRight MouthStretchLeft MouthStretchRight "
    "MouthRollLower MouthRollUpper MouthShrugLower MouthShrugUpper MouthPressLeft MouthPressRight MouthLowerDownLeft "
    "MouthLowerDownRight MouthUpperUpLeft MouthUpperUpRight BrowDownLeft BrowDownRight BrowInnerUp BrowOuterUpLeft "
    "BrowOuterUpRight CheekPuff CheekSquintLeft CheekSquintRight NoseSneerLeft NoseSneerRight TongueOut HeadYaw "
    "HeadPitch HeadRoll LeftEyeYaw LeftEyePitch LeftEyeRoll RightEyeYaw RightEyePitch RightEyeRoll"
).split()


@dataclass
class Packet:
    version: int
    device_id: str
    subject: str
    frame: int
    subframe: float
    rate: tuple[int, int]
    curves: dict[str, float]


def decode(data: bytes) -> Packet:
    """uint8 version; int32-length-prefixed device id and subject; int32 frame, float32 sub-frame, int32 rate
    numerator and denominator; uint8 count; count float32 values. All big-endian; nothing may be left over."""
    (version,) = struct.unpack_from(">B", data, 0)
    offset = 1
    strings = []
    for _ in range(2):
        (length,) = struct.unpack_from(">i", data, offset)
        strings.append(data[offset + 4 : offset + 4 + length].decode("utf-8"))
        offset += 4 + length
    frame, subframe, numerator, denominator, count = struct.unpack_from(">ifiiB", data, offset)
    offset += 17
    values = struct.unpack_from(f">{count}f", data, offset)
    assert offset + 4 * count == len(data), "bytes left over after the last value"
    curves = dict(zip(CURVES, values, strict=True))
    return Packet(version, strings[0], strings[1], frame, subframe, (numerator, denominator), curves)


def make_frame(
    head_rot: np.ndarray = FRONTAL_HEAD_ROT,
    eye_pose: np.ndarray | None = None,
    valid: bool = True,
    t_capture: float = 1_700_000_000.5,
) -> dict:
    blendshapes = np.full(52, 0.25)
    blendshapes[BLENDSHAPE_NAMES.index("eyeBlinkLeft")] = 0.9
    blendshapes[BLENDSHAPE_NAMES.index("eyeBlinkRight")] = 0.1
    blendshapes[BLENDSHAPE_NAMES.index("jawOpen")] = 0.6
    blendshapes[BLENDSHAPE_NAMES.index("mouthSmileRight")] = 1.2  # out of range: sent clamped to 1
    return frame_message(
        seq=7, t_capture=t_capture, valid=valid, exp=np.zeros(10), jaw_pose=np.zeros(3),
        eye_pose=np.zeros(6) if eye_pose is None else eye_pose, neck_pose=np.zeros(3), head_rot=head_rot,
        head_trans=[0.0, 0.0, 0.6], fov_deg=50.0, blendshapes=blendshapes,
    )  # fmt: skip


@pytest.fixture
def receiver() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        yield sock


def receive(receiver: socket.socket, frame_msg: dict, subject: str = "flame-live") -> tuple[Packet, tuple[str, int]]:
    with LiveLinkPublisher("127.0.0.1", receiver.getsockname()[1], subject) as publisher:
        publisher.publish_frame(frame_msg)
        data, sender = receiver.recvfrom(2048)
    return decode(data), sender


def rotation_about(axis: str, degrees: float) -> np.ndarray:
    """FLAME axes: x = the person's left, y = up, z = out of the face."""
    return {"x": np.array([1.0, 0, 0]), "y": np.array([0, 1.0, 0]), "z": np.array([0, 0, 1.0])}[axis] * math.radians(degrees)


def head_rot_turned(axis: str, degrees: float) -> np.ndarray:
    """head_rot of a head turned from frontal about its own axis: R = R_frontal R_head."""
    from scipy.spatial.transform import Rotation

    return (Rotation.from_rotvec(FRONTAL_HEAD_ROT) * Rotation.from_rotvec(rotation_about(axis, degrees))).as_rotvec()


# ---------------------------------------------------------------------------------------------------------------
# The packet


def test_a_frame_becomes_one_version_6_packet_with_61_named_values(receiver) -> None:
    packet, sender = receive(receiver, make_frame(), subject="MetaHuman face")
    assert sender[0] == "127.0.0.1", "a local receiver is reached from the loopback address"
    assert (packet.version, packet.subject, packet.rate) == (6, "MetaHuman face", (60, 1))
    assert len(packet.device_id) == 36, "a UUID, like the phone's"
    assert len(packet.curves) == 61
    assert packet.curves["EyeBlinkLeft"] == pytest.approx(0.9) and packet.curves["EyeBlinkRight"] == pytest.approx(0.1)
    assert packet.curves["JawOpen"] == pytest.approx(0.6) and packet.curves["MouthSmileRight"] == 1.0
    assert packet.curves["TongueOut"] == 0.0, "MediaPipe has no tongue"
    set_apart = ("EyeBlinkLeft", "EyeBlinkRight", "JawOpen", "MouthSmileRight", "TongueOut")
    shapes = [packet.curves[name] for name in CURVES[:52] if name not in set_apart]
    assert shapes == pytest.approx([0.25] * len(shapes))
    angles = [packet.curves[name] for name in CURVES[52:]]
    assert angles == pytest.approx([0.0] * 9, abs=1e-6), "a head looking into the camera, eyes at rest"


def test_frame_time_counts_frames_at_60_fps_from_utc_midnight(receiver) -> None:
    t_capture = 1_700_000_000.0 + 12.34  # 1_700_000_000 is 22:13:20 UTC
    packet, _ = receive(receiver, make_frame(t_capture=t_capture))
    seconds_since_midnight = (22 * 3600 + 13 * 60 + 20) + 12.34
    assert packet.frame + packet.subframe == pytest.approx(seconds_since_midnight * 60, abs=1e-3)
    assert 0.0 <= packet.subframe < 1.0


@pytest.mark.parametrize(
    ("axis", "curve", "sign"),
    [
        ("y", "HeadYaw", -1.0),  # turning to the person's own left is a negative Unreal yaw (Epic's conversion)
        ("x", "HeadPitch", 1.0),  # chin toward the chest
        ("z", "HeadRoll", -1.0),  # the top of the head toward the right shoulder
    ],
)
def test_head_angles_are_our_fits_turn_in_unreal_rotator_units(receiver, axis: str, curve: str, sign: float) -> None:
    packet, _ = receive(receiver, make_frame(head_rot=head_rot_turned(axis, 30.0)))
    assert packet.curves[curve] == pytest.approx(sign * 30.0 / 180.0, abs=1e-5)
    others = [packet.curves[name] for name in ("HeadYaw", "HeadPitch", "HeadRoll") if name != curve]
    assert others == pytest.approx([0.0, 0.0], abs=1e-5)


def test_eye_angles_come_from_flames_eye_joints_left_then_right(receiver) -> None:
    eye_pose = np.concatenate([rotation_about("y", 20.0), rotation_about("x", 10.0)])
    packet, _ = receive(receiver, make_frame(eye_pose=eye_pose))
    assert packet.curves["LeftEyeYaw"] == pytest.approx(-20.0 / 180.0, abs=1e-5)
    assert packet.curves["RightEyePitch"] == pytest.approx(10.0 / 180.0, abs=1e-5)
    rest = [packet.curves[name] for name in ("LeftEyePitch", "LeftEyeRoll", "RightEyeYaw", "RightEyeRoll")]
    assert rest == pytest.approx([0.0] * 4, abs=1e-5)
    assert [packet.curves[name] for name in ("HeadYaw", "HeadPitch", "HeadRoll")] == pytest.approx([0.0] * 3, abs=1e-6)


def unreal_rotator_fractions(arkit_rotation: np.ndarray) -> np.ndarray:
    """(yaw, pitch, roll) / 180 degrees the way Epic's code gets them: ARKit's quaternion to Unreal's axes with
    ``FQuat(-Z, X, Y, -W)`` (FAppleARKitConversion::ToFTransform), then ``FQuat::Rotator``'s formulas."""
    from scipy.spatial.transform import Rotation

    qx, qy, qz, qw = Rotation.from_matrix(arkit_rotation).as_quat()
    x, y, z, w = -qz, qx, qy, -qw
    yaw = math.atan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))
    pitch = math.asin(2 * (z * x - w * y))
    roll = math.atan2(-2 * (w * x + y * z), 1 - 2 * (x * x + y * y))
    return np.degrees([yaw, pitch, roll]) / 180.0


def test_angles_match_epics_quaternion_route_for_random_poses(receiver) -> None:
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(4)
    for _ in range(5):
        head_rot = (Rotation.from_rotvec(FRONTAL_HEAD_ROT) * Rotation.from_rotvec(rng.uniform(-0.6, 0.6, 3))).as_rotvec()
        eye_pose = rng.uniform(-0.3, 0.3, 6)
        packet, _ = receive(receiver, make_frame(head_rot=head_rot, eye_pose=eye_pose))
        face_anchor = np.diag([1.0, -1.0, -1.0]) @ Rotation.from_rotvec(head_rot).as_matrix()  # ARKit camera: y up, z back
        expected = np.concatenate([
            unreal_rotator_fractions(face_anchor),
            unreal_rotator_fractions(Rotation.from_rotvec(eye_pose[:3]).as_matrix()),
            unreal_rotator_fractions(Rotation.from_rotvec(eye_pose[3:]).as_matrix()),
        ])  # fmt: skip
        assert [packet.curves[name] for name in CURVES[52:]] == pytest.approx(expected.tolist(), abs=1e-6)


def test_a_frame_without_a_face_sends_nothing(receiver) -> None:
    with LiveLinkPublisher("127.0.0.1", receiver.getsockname()[1]) as publisher:
        publisher.publish_frame(make_frame(valid=False, t_capture=1_700_000_000.0))
        publisher.publish_frame(make_frame(t_capture=1_700_000_001.0))
        packet = decode(receiver.recv(2048))
    assert packet.frame == math.floor((1_700_000_001.0 % 86400) * 60), "the first packet is the valid frame's"


def test_bad_livelink_options_are_user_errors() -> None:
    assert publisher_options(None, None, None, "").livelink == ("127.0.0.1", 11111)
    assert publisher_options(None, None, None, "10.0.0.5").livelink == ("10.0.0.5", 11111)
    with pytest.raises(UserError, match="expected HOST:PORT"):
        publisher_options(None, None, None, "host:port")
    with pytest.raises(UserError, match="between 1 and 65535"):
        publisher_options(None, None, None, ":70000")
    with pytest.raises(UserError, match="already in use by --osc"):
        publisher_options(None, "127.0.0.1:11111", None, "")
    with pytest.raises(UserError, match="subject"):
        LiveLinkPublisher("127.0.0.1", 11111, "")


# ---------------------------------------------------------------------------------------------------------------
# The command


def live_command(models: Path, *arguments: str) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "run_stream.py"), "live", "--flame", "demo", "--models", str(models), *arguments]


def test_live_livelink_sends_a_packet_per_tracked_frame(shared_clips: Path, landmarker_task: Path, receiver) -> None:
    port = receiver.getsockname()[1]
    command = live_command(
        landmarker_task.parent, "--source", str(shared_clips / GRID_CLIP), "--as-fast-as-possible",
        "--max-frames", "5", "--no-zmq", "--livelink", f"127.0.0.1:{port}",
    )  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    receiver.settimeout(0.5)
    packets = []
    while True:
        try:
            packets.append(decode(receiver.recv(2048)))
        except TimeoutError:
            break
    assert 1 <= len(packets) <= 5, "one packet per frame with a face"
    for packet in packets:
        assert packet.version == 6 and packet.subject == "flame-live"
        assert all(0.0 <= packet.curves[name] <= 1.0 for name in CURVES[:52])
        assert all(abs(packet.curves[name]) < 0.25 for name in ("HeadYaw", "HeadPitch", "HeadRoll")), "a frontal speaker"
    assert packets[0].curves["JawOpen"] >= 0.0 and any(packet.curves["EyeBlinkLeft"] > 0.0 for packet in packets)


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--livelink", "localhost:eleven"], "--livelink 'localhost:eleven': expected HOST:PORT"),
        (["--osc", "127.0.0.1:11111", "--livelink"], "--livelink: port 11111 on 127.0.0.1 is already in use by --osc"),
        (["--livelink", "no-such-host.invalid:11111"], "cannot resolve the Live Link Face host"),
    ],
)
def test_bad_livelink_arguments_are_one_clear_line(arguments: list[str], expected: str, shared_clips: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        live_command(tmp_path, "--source", str(shared_clips / GRID_CLIP), "--no-zmq", *arguments),
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]

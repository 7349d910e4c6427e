"""The Unity receiver's plain C# (clients/unity/Runtime/Protocol), compiled with mono's mcs and run against our
real OSC publisher on 127.0.0.1: decoded values, pose-corrective weights and head transforms against Python's.

Unity itself is not available here: FlameLiveReceiver.cs (the MonoBehaviour) is not compiled by these tests."""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from flame_client.messages import frame_message, metrics_message, shape_message
from flame_client.rig import MESH_NODE_NAME, Skeleton, frame_rig_pose, pose_corrective_weights
from realtime.publishers import OscPublisher, VmcPublisher

REPO_ROOT = Path(__file__).resolve().parents[1]
UNITY_DIR = REPO_ROOT / "clients" / "unity"
PROTOCOL_DIR = UNITY_DIR / "Runtime" / "Protocol"
CHECK_PROGRAM = UNITY_DIR / "Tests~" / "ProtocolCheck.cs"
OPENCV_TO_GLTF = np.diag([1.0, -1.0, -1.0])
GLTF_TO_UNITY = np.diag([-1.0, 1.0, 1.0])

needs_mono = pytest.mark.skipif(
    shutil.which("mcs") is None or shutil.which("mono") is None,
    reason="needs mono's C# compiler and runtime: apt-get install -y mono-mcs mono-runtime",
)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def check_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The receiver's protocol files and the check program, compiled without any Unity assembly."""
    executable = tmp_path_factory.mktemp("unity") / "ProtocolCheck.exe"
    sources = sorted(str(path) for path in PROTOCOL_DIR.glob("*.cs")) + [str(CHECK_PROGRAM)]
    result = subprocess.run(
        ["mcs", "-nologo", "-warnaserror+", f"-out:{executable}", *sources], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return executable


class Receiver:
    """The C# check program listening on a port; one JSON line per frame it takes."""

    def __init__(self, executable: Path, frames: int, rig: Path | None = None) -> None:
        self.port = free_udp_port()
        command = ["mono", str(executable), str(self.port), str(frames)] + ([str(rig)] if rig else [])
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = self.process.stdout.readline()
        assert first.strip() == f"listening {self.port}", first + self.process.stderr.read()

    def next_line(self) -> dict:
        line = self.process.stdout.readline()
        assert line, "the receiver stopped: " + self.process.stderr.read()
        return json.loads(line)

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def receiver_factory(check_program: Path) -> Iterator:
    """Starts check programs (FRAMES, optional RIG.glb) and stops them after the test."""
    started: list[Receiver] = []

    def start(frames: int, rig: Path | None = None) -> Receiver:
        started.append(Receiver(check_program, frames, rig))
        return started[-1]

    yield start
    for receiver in started:
        receiver.close()


def random_frame(rng: np.random.Generator, seq: int, valid: bool = True, eyelids: bool = False) -> dict:
    head = Rotation.from_rotvec([math.pi, 0.0, 0.0]) * Rotation.from_rotvec(rng.uniform(-0.5, 0.5, 3))
    return frame_message(
        seq=seq, t_capture=1_700_000_000.0 + seq / 30, valid=valid, exp=rng.normal(0, 1, 50),
        jaw_pose=rng.uniform(-0.4, 0.4, 3), eye_pose=rng.uniform(-0.3, 0.3, 6), neck_pose=rng.uniform(-0.3, 0.3, 3),
        head_rot=head.as_rotvec(), head_trans=rng.uniform(-0.1, 0.1, 3) + [0, 0, 0.6], fov_deg=rng.uniform(30, 70),
        blendshapes=rng.uniform(0, 1, 52), eyelids=rng.uniform(0, 1, 2) if eyelids else None,
    )  # fmt: skip


def as_sent(values: list[float]) -> np.ndarray:
    """What OSC carries: 32-bit floats."""
    return np.asarray(values, dtype=np.float32).astype(np.float64)


def as_received(frame: dict) -> dict:
    """The frame as the receiver sees it: every float through float32."""
    keys = ("exp", "neck_pose", "jaw_pose", "eye_pose", "head_rot", "head_trans")
    return {**frame, **{key: as_sent(frame[key]) for key in keys}}


def write_rig_glb(path: Path, skeleton: Skeleton) -> None:
    """A binary glTF container whose JSON has the exported rig's mesh extras (flame_client.rig's names)."""
    document = {"asset": {"version": "2.0"}, "meshes": [{"name": MESH_NODE_NAME, "extras": skeleton.to_extras()}]}
    chunk = json.dumps(document).encode()
    chunk += b" " * (-len(chunk) % 4)
    body = len(chunk).to_bytes(4, "little") + b"JSON" + chunk
    path.write_bytes(b"glTF" + (2).to_bytes(4, "little") + (12 + len(body)).to_bytes(4, "little") + body)


def same_rotation(quaternion: list[float], matrix: np.ndarray) -> bool:
    return np.allclose(Rotation.from_quat(quaternion).as_matrix(), matrix, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------


def test_every_package_asset_has_a_meta_file_with_its_own_guid() -> None:
    """Unity ignores assets without .meta files in a package installed from git (an immutable folder)."""
    assets = [
        path for path in UNITY_DIR.rglob("*")
        if path.suffix != ".meta" and not any(part.endswith("~") for part in path.relative_to(UNITY_DIR).parts)
    ]  # fmt: skip
    assert {"package.json", "README.md", "FlameLiveReceiver.cs"} <= {path.name for path in assets}
    guids = []
    for path in assets:
        meta = path.with_name(path.name + ".meta")
        assert meta.is_file(), f"{path.relative_to(UNITY_DIR)} has no .meta file"
        guids += re.findall(r"^guid: ([0-9a-f]{32})$", meta.read_text(), flags=re.MULTILINE)
    assert len(guids) == len(assets) == len(set(guids))
    orphans = [meta for meta in UNITY_DIR.rglob("*.meta") if not meta.with_suffix("").exists()]
    assert not orphans, f"meta files without an asset: {orphans}"


def test_protocol_files_do_not_reference_unity() -> None:
    for path in PROTOCOL_DIR.glob("*.cs"):
        assert not re.search(r"using\s+UnityEngine|UnityEngine\.", path.read_text()), f"{path.name} must not use Unity"
    assembly = json.loads((PROTOCOL_DIR / "FlameLive.Protocol.asmdef").read_text())
    assert assembly["noEngineReferences"] is True


@needs_mono
def test_frames_from_our_osc_publisher_decode_to_the_sent_values(receiver_factory) -> None:
    rng = np.random.default_rng(3)
    frames = [random_frame(rng, seq, eyelids=seq % 2 == 1) for seq in range(4)] + [random_frame(rng, 4, valid=False)]
    receiver = receiver_factory(len(frames))
    with OscPublisher("127.0.0.1", receiver.port, blendshape_addresses=True) as publisher:
        publisher.publish_shape(shape_message(rng.normal(0, 1, 100), "demo head (not FLAME)", "abc123"))
        publisher.publish_metrics(metrics_message(30.0, 20.0, 30.0, 0, 5.0, 6.0))
        for sent in frames:
            publisher.publish_frame(sent)
            # One at a time: the receiver keeps only the newest frame, as a game loop would.
            decoded = receiver.next_line()
            assert decoded["seq"] == sent["seq"] and decoded["valid"] == sent["valid"]
            assert decoded["t_capture"] == sent["t_capture"] and decoded["t_publish"] == sent["t_publish"]
            if not sent["valid"]:
                continue
            for key in ("head_rot", "head_trans", "neck_pose", "jaw_pose", "eye_pose", "exp", "blendshapes"):
                np.testing.assert_array_equal(decoded[key], as_sent(sent[key]), err_msg=key)
            assert decoded["fov_deg"] == as_sent([sent["fov_deg"]])[0]
            np.testing.assert_array_equal(decoded["eyelids"], as_sent(sent.get("eyelids", [])))  # empty: none sent
            received = as_received(sent)
            eyes = received["eye_pose"].reshape(2, 3)
            expected = pose_corrective_weights(received["neck_pose"], received["jaw_pose"], eyes[0], eyes[1])
            np.testing.assert_allclose(decoded["pose_correctives"], expected, atol=1e-6)
    stats = receiver.next_line()
    assert stats["frames"] == len(frames) and stats["rejected"] == 0, stats


@needs_mono
def test_head_and_joint_transforms_in_gltf_and_unity_axes(receiver_factory) -> None:
    rng = np.random.default_rng(5)
    frames = [random_frame(rng, seq) for seq in range(3)]
    frontal = random_frame(rng, 3)
    frontal["head_rot"] = [math.pi, 0.0, 0.0]
    frames.append(frontal)
    receiver = receiver_factory(len(frames))
    with OscPublisher("127.0.0.1", receiver.port) as publisher:
        for sent in frames:
            publisher.publish_frame(sent)
            decoded = receiver.next_line()
            rotation = Rotation.from_rotvec(as_sent(sent["head_rot"])).as_matrix()
            gltf_rotation = OPENCV_TO_GLTF @ rotation
            assert same_rotation(decoded["gltf_head_rotation"], gltf_rotation)
            np.testing.assert_allclose(decoded["gltf_head_translation"], OPENCV_TO_GLTF @ as_sent(sent["head_trans"]))
            # Unity's import negates X: positions are S p, rotations S R S (S = diag(-1, 1, 1)).
            assert same_rotation(decoded["unity_head_rotation"], GLTF_TO_UNITY @ gltf_rotation @ GLTF_TO_UNITY)
            np.testing.assert_allclose(
                decoded["unity_head_position"], GLTF_TO_UNITY @ OPENCV_TO_GLTF @ as_sent(sent["head_trans"])
            )
            jaw = Rotation.from_rotvec(as_sent(sent["jaw_pose"])).as_matrix()
            assert same_rotation(decoded["unity_jaw_rotation"], GLTF_TO_UNITY @ jaw @ GLTF_TO_UNITY)
    assert same_rotation(decoded["gltf_head_rotation"], np.eye(3)), "a head looking into the camera is unrotated"


def assert_joints_follow_flame_client(receiver: Receiver, skeleton: Skeleton, frames: list[dict]) -> None:
    """Each frame, sent by our OSC publisher, makes the C# receiver pose the joints as flame_client.rig does."""
    with OscPublisher("127.0.0.1", receiver.port) as publisher:
        for sent in frames:
            publisher.publish_frame(sent)
            decoded = receiver.next_line()
            expected = frame_rig_pose(skeleton, as_received(sent))
            np.testing.assert_allclose(np.reshape(decoded["joint_translations"], (5, 3)), expected.translations, atol=1e-9)
            for quaternion, matrix in zip(decoded["joint_rotations"], Rotation.from_quat(expected.rotations).as_matrix()):
                assert same_rotation(quaternion, matrix)


@needs_mono
def test_joint_transforms_match_flame_clients_rig_pose(receiver_factory, tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    n_exp = 20
    skeleton = Skeleton(rest=rng.normal(0, 0.05, (5, 3)), exp_basis=rng.normal(0, 1e-3, (5, 3, n_exp)))
    rig = tmp_path / "rig.glb"
    write_rig_glb(rig, skeleton)
    frames = [random_frame(rng, seq) for seq in range(3)]  # 50 expression components: more than the rig's 20
    assert_joints_follow_flame_client(receiver_factory(len(frames), rig), skeleton, frames)


@needs_mono
def test_a_rig_from_export_gltf_is_read_and_driven_like_flame_client_does(
    receiver_factory, flame_dir: Path, tmp_path: Path
) -> None:
    from engine.assets import load_flame
    from engine.gltf import build_glb, skeleton_of

    head = load_flame(flame_dir)
    rng = np.random.default_rng(2)
    shape, n_exp = rng.normal(0, 1, head.n_shape), 20
    rig = tmp_path / "head.glb"
    rig.write_bytes(build_glb(head, shape, n_exp))
    frames = [random_frame(rng, seq) for seq in range(2)]
    assert_joints_follow_flame_client(receiver_factory(len(frames), rig), skeleton_of(head, shape, n_exp), frames)


@needs_mono
def test_a_glb_without_a_flame_skeleton_is_one_clear_line(check_program: Path, tmp_path: Path) -> None:
    not_a_rig = tmp_path / "other.glb"
    write_rig_glb(not_a_rig, Skeleton(rest=np.zeros((5, 3)), exp_basis=np.zeros((5, 3, 0))))
    not_a_rig.write_bytes(not_a_rig.read_bytes().replace(b"flameJointRest", b"somethingElse1"))
    result = subprocess.run(
        ["mono", str(check_program), str(free_udp_port()), "1", str(not_a_rig)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "has no FLAME skeleton" in result.stderr and "export --gltf" in result.stderr


@needs_mono
def test_foreign_and_broken_datagrams_are_counted_and_never_stop_the_receiver(receiver_factory) -> None:
    receiver = receiver_factory(1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
        target = ("127.0.0.1", receiver.port)
        raw.sendto(b"hello", target)  # not OSC
        raw.sendto(b"#bundle\x00" + bytes(8) + (1000).to_bytes(4, "big") + bytes(4), target)  # element overruns
        raw.sendto(b"/flame/frame\x00\x00\x00\x00,iddi\x00\x00\x00" + bytes(8), target)  # arguments cut short
    with VmcPublisher("127.0.0.1", receiver.port) as vmc:
        vmc.publish_frame(random_frame(np.random.default_rng(0), 0))  # another protocol on our port
    with OscPublisher("127.0.0.1", receiver.port) as publisher:
        publisher.publish_frame(random_frame(np.random.default_rng(1), 9))
        assert receiver.next_line()["seq"] == 9
    stats = receiver.next_line()
    assert stats["frames"] == 1 and stats["rejected"] == 5, stats  # VMC sends two bundles per frame
    assert "multiple of 4" in stats["first_rejection"]
    assert "not a flame-live message (address /VMC/Ext/" in stats["last_rejection"]


@needs_mono
def test_a_port_in_use_is_one_clear_line(check_program: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        result = subprocess.run(["mono", str(check_program), str(port), "1"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == (
        f"error: port {port} is already in use (another receiver running?); "
        "choose another port and run flame-live with --osc 127.0.0.1:PORT"
    )

"""The glTF rig: evaluated with glTF's own morph and skinning formulas (written here, from the glTF 2.0
specification, not from engine/flame.py) it is FLAME's posed mesh; Khronos' validator finds no error."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from engine.assets import load_flame
from engine.demo_head import build_demo_head
from engine.flame import FlameLayer, rodrigues
from engine.frames import FrameParams
from engine.head_model import HeadModel
from engine.tracker import Tracker, TrackerConfig
from flame_client.messages import TOPIC_FRAME, TOPIC_SHAPE, frame_message, shape_message
from flame_client.rig import Skeleton, frame_rig_pose, target_names
from realtime.recorder import SessionRecorder

REPO = Path(__file__).resolve().parents[1]
VALIDATOR_DIR = REPO / ".cache" / "gltf-validator"
VALIDATOR_VERSION = "2.0.0-dev.3.10"
FPS = 30.0


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "run_stream.py"), *args], capture_output=True, text=True, cwd=cwd, timeout=600)


# ---------------------------------------------------------------------------------------------------------------
# glTF 2.0, read and evaluated from the specification


class Gltf:
    """A .glb read back: the JSON document and its accessors as float64 arrays."""

    _COMPONENTS = {5120: np.int8, 5121: np.uint8, 5122: np.int16, 5123: np.uint16, 5125: np.uint32, 5126: np.float32}
    _WIDTHS = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT4": 16}

    def __init__(self, path: Path) -> None:
        data = path.read_bytes()
        magic, version, length = struct.unpack_from("<4sII", data, 0)
        assert (magic, version, length) == (b"glTF", 2, len(data))
        json_length, json_type = struct.unpack_from("<I4s", data, 12)
        assert json_type == b"JSON"
        self.doc = json.loads(data[20 : 20 + json_length])
        bin_length, bin_type = struct.unpack_from("<I4s", data, 20 + json_length)
        assert bin_type == b"BIN\0"
        self.binary = data[28 + json_length : 28 + json_length + bin_length]

    def accessor(self, index: int) -> np.ndarray:
        accessor = self.doc["accessors"][index]
        view = self.doc["bufferViews"][accessor["bufferView"]]
        width = self._WIDTHS[accessor["type"]]
        dtype = np.dtype(self._COMPONENTS[accessor["componentType"]])
        start = view.get("byteOffset", 0) + accessor.get("byteOffset", 0)
        values = np.frombuffer(self.binary, dtype, accessor["count"] * width, start)
        return values.reshape(accessor["count"], width).astype(np.float64)

    def node(self, name: str) -> int:
        return next(i for i, node in enumerate(self.doc["nodes"]) if node.get("name") == name)

    def keyframes(self) -> int:
        animation = self.doc["animations"][0]
        return self.accessor(animation["samplers"][0]["input"]).shape[0]

    def evaluate(self, keyframe: int | None = None) -> np.ndarray:
        """World positions of the skinned, morphed mesh at rest or at an animation keyframe (glTF 2.0, 3.7 and 3.8)."""
        nodes = self.doc["nodes"]
        translation = {i: np.array(n.get("translation", [0.0, 0.0, 0.0])) for i, n in enumerate(nodes)}
        rotation = {i: np.array(n.get("rotation", [0.0, 0.0, 0.0, 1.0])) for i, n in enumerate(nodes)}
        mesh_node = self.node("flame_head")
        mesh = self.doc["meshes"][nodes[mesh_node]["mesh"]]
        weights = np.array(mesh.get("weights", []))
        if keyframe is not None:
            animation = self.doc["animations"][0]
            for channel in animation["channels"]:
                sampler = animation["samplers"][channel["sampler"]]
                output = self.accessor(sampler["output"])
                node, path = channel["target"]["node"], channel["target"]["path"]
                if path == "weights":
                    weights = output.reshape(-1, weights.size)[keyframe]
                else:
                    {"translation": translation, "rotation": rotation}[path][node] = output[keyframe]
        parent = {child: i for i, n in enumerate(nodes) for child in n.get("children", [])}

        def world(i: int) -> np.ndarray:
            local = np.eye(4)
            local[:3, :3] = Rotation.from_quat(rotation[i]).as_matrix()
            local[:3, 3] = translation[i]
            return world(parent[i]) @ local if i in parent else local

        skin = self.doc["skins"][nodes[mesh_node]["skin"]]
        inverse_bind = self.accessor(skin["inverseBindMatrices"]).reshape(-1, 4, 4).transpose(0, 2, 1)  # column-major
        joint_matrices = np.stack([world(j) @ ibm for j, ibm in zip(skin["joints"], inverse_bind)])
        (primitive,) = mesh["primitives"]
        attributes = primitive["attributes"]
        positions = self.accessor(attributes["POSITION"])
        for weight, target in zip(weights, primitive["targets"]):
            positions = positions + weight * self.accessor(target["POSITION"])
        homogeneous = np.concatenate([positions, np.ones((positions.shape[0], 1))], axis=1)
        skinning = np.zeros((positions.shape[0], 4, 4))
        for set_index in range(2):
            if f"JOINTS_{set_index}" in attributes:
                joints = self.accessor(attributes[f"JOINTS_{set_index}"]).astype(int)
                amounts = self.accessor(attributes[f"WEIGHTS_{set_index}"])
                skinning += np.einsum("vk,vkab->vab", amounts, joint_matrices[joints])
        return np.einsum("vab,vb->va", skinning, homogeneous)[:, :3]


def matched(gltf: Gltf, rest: np.ndarray) -> np.ndarray:
    """For each glTF vertex, the FLAME vertex at its rest position (a seam vertex appears once per UV)."""
    distance, index = cKDTree(rest).query(gltf.accessor(gltf.doc["meshes"][0]["primitives"][0]["attributes"]["POSITION"]))
    assert distance.max() < 1e-6
    assert np.unique(index).size == rest.shape[0], "every FLAME vertex is in the glTF mesh"
    return index


# ---------------------------------------------------------------------------------------------------------------
# Sequences: a track folder with random frames, and a recorded live session


def euler(yaw: float, pitch: float, roll: float) -> np.ndarray:
    return Rotation.from_euler("ZYX", [roll, yaw, pitch]).as_matrix()  # Rz(roll) Ry(yaw) Rx(pitch)


def random_track_folder(folder: Path, head: HeadModel, n_shape: int, n_exp: int, frames: int, seed: int) -> dict[str, np.ndarray]:
    """tracking.npz and meta.json as 'track' writes them, with random frames; frame 2 is invalid."""
    rng = np.random.default_rng(seed)
    arrays = {
        "shape": np.repeat(rng.normal(size=(1, n_shape)), frames, axis=0), "exp": rng.normal(size=(frames, n_exp)),
        "head_pose": np.zeros((frames, 3)), "jaw_pose": rng.normal(scale=0.15, size=(frames, 3)) + [0.2, 0, 0],
        "neck_pose": rng.normal(scale=0.2, size=(frames, 3)), "eye_pose": rng.normal(scale=0.2, size=(frames, 6)),
        "cam": np.concatenate([rng.uniform(-0.5, 0.5, size=(frames, 3)), rng.normal(scale=0.05, size=(frames, 3)) + [0, 0, -0.6]], axis=1),
        "fov": np.full(frames, 40.0), "K": np.repeat(np.array([[[600.0, 0, 320], [0, 600, 240], [0, 0, 1]]]), frames, axis=0),
        "valid": np.arange(frames) != 2,
    }  # fmt: skip
    arrays["head_pose"][-1] = [0.1, -0.2, 0.05]  # the reference format allows a posed root: it must count too
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "tracking.npz", **arrays)
    (folder / "meta.json").write_text(json.dumps({"fps": FPS, "model": {"checksum": head.checksum}, "image_size": {"height": 480, "width": 640}}))
    return arrays


def flame_world(layer: FlameLayer, arrays: dict[str, np.ndarray], frame: int) -> np.ndarray:
    """FLAME's posed mesh of a track frame in the tracked camera's OpenGL view, x = R(cam) x_model + t."""
    pose = np.stack([arrays["head_pose"][frame], arrays["neck_pose"][frame], arrays["jaw_pose"][frame], *arrays["eye_pose"][frame].reshape(2, 3)])
    with torch.no_grad():
        model = layer.vertices(
            torch.from_numpy(arrays["shape"][frame : frame + 1]), torch.from_numpy(arrays["exp"][frame : frame + 1]),
            torch.from_numpy(pose[None]), torch.zeros(1, 3, dtype=torch.float64),
        )[0].numpy()  # fmt: skip
    cam = arrays["cam"][frame]
    return model @ euler(*cam[:3]).T + cam[3:]


def check_track_export(head: HeadModel, tmp_path: Path, n_shape: int, n_exp: int, flame_args: list[str]) -> Gltf:
    arrays = random_track_folder(tmp_path / "track", head, n_shape, n_exp, frames=5, seed=1)
    result = run_cli("export", "--gltf", str(tmp_path / "rig.glb"), "--params", str(tmp_path / "track"), *flame_args)
    assert result.returncode == 0, result.stderr
    gltf = Gltf(tmp_path / "rig.glb")
    layer = FlameLayer(head, n_shape, n_exp, dtype=torch.float64)
    with torch.no_grad():
        zero = layer.zero_params()
        rest = layer.vertices(torch.from_numpy(arrays["shape"][:1]), zero["exp"], zero["pose"], zero["transl"])[0].numpy()
    index = matched(gltf, rest)
    assert gltf.keyframes() == 5
    times = gltf.accessor(gltf.doc["animations"][0]["samplers"][0]["input"])[:, 0]
    np.testing.assert_allclose(times, np.arange(5) / FPS, atol=1e-6)
    for keyframe in range(5):
        held = 1 if keyframe == 2 else keyframe  # the invalid frame holds the last valid pose
        error = np.abs(gltf.evaluate(keyframe) - flame_world(layer, arrays, held)[index]).max()
        assert error <= 1e-5, f"keyframe {keyframe}: {error:.2e} m"
    return gltf


def test_rig_names_and_rest_pose_match_flame(flame_dir: Path, tmp_path: Path) -> None:
    result = run_cli("export", "--gltf", str(tmp_path / "rig.glb"), "--flame", str(flame_dir))
    assert result.returncode == 0, result.stderr
    head = load_flame(flame_dir, n_tex=0)
    gltf = Gltf(tmp_path / "rig.glb")
    names = [node["name"] for node in gltf.doc["nodes"]]
    assert names == ["flame_head", "root", "neck", "jaw", "left_eye", "right_eye"]
    mesh = gltf.doc["meshes"][0]
    assert mesh["extras"]["targetNames"] == list(target_names(TrackerConfig().n_exp))
    assert mesh["extras"]["targetNames"][0] == "exp_000" and mesh["extras"]["targetNames"][-1] == "pose_035"
    assert len(mesh["primitives"][0]["targets"]) == TrackerConfig().n_exp + 36
    assert "TEXCOORD_0" in mesh["primitives"][0]["attributes"], "FLAME has UVs"
    assert "animations" not in gltf.doc
    skeleton = Skeleton.from_extras(mesh["extras"])
    np.testing.assert_allclose(skeleton.rest, head.j_regressor @ head.v_template, atol=1e-12)
    index = matched(gltf, head.v_template)
    np.testing.assert_allclose(gltf.evaluate(), head.v_template[index], atol=1e-6)


def test_animated_export_of_a_track_folder_is_flame_exactly(flame_dir: Path, tmp_path: Path) -> None:
    check_track_export(load_flame(flame_dir, n_tex=0), tmp_path, n_shape=20, n_exp=10, flame_args=["--flame", str(flame_dir)])


def test_animated_export_is_exact_for_the_demo_head(landmarker_task: Path, tmp_path: Path) -> None:
    head = build_demo_head(landmarker_task)
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(landmarker_task, models / landmarker_task.name)
    check_track_export(head, tmp_path, n_shape=head.n_shape, n_exp=head.n_exp, flame_args=["--flame", "demo", "--models", str(models)])


def test_session_export_follows_the_stream_and_its_rig_maths(flame_dir: Path, tmp_path: Path) -> None:
    """A live recording: the rig at each frame is FLAME with the tracker's own root pose and translation,
    and the animation's channels are what flame_client.rig gives a live client for that message."""
    head = load_flame(flame_dir, n_tex=0)
    tracker = Tracker(head, (480, 640), TrackerConfig(n_shape=20, n_exp=10, dtype=torch.float64))
    rng = np.random.default_rng(5)
    shape = rng.normal(size=20)
    tracker.adopt_identity(torch.from_numpy(shape))
    session, layer, expected, messages = tmp_path / "session", FlameLayer(head, 20, 10, dtype=torch.float64), [], []
    with SessionRecorder(session, None, None, {}) as recorder:
        recorder.write(None, TOPIC_SHAPE, shape_message(shape, head.name, head.checksum))
        for index in range(4):
            pose = torch.from_numpy(rng.normal(scale=0.2, size=(1, 5, 3)))
            exp, transl = torch.from_numpy(rng.normal(size=(1, 10))), torch.tensor([[0.01, -0.02, -0.55]], dtype=torch.float64)
            tracked = tracker.frame_from(FrameParams(exp, rodrigues(pose), transl))
            message = frame_message(
                seq=index, t_capture=1000.0 + index / 25, valid=True, exp=tracked.exp, jaw_pose=tracked.pose[2],
                eye_pose=tracked.pose[3:5], neck_pose=tracked.pose[1], head_rot=tracked.head_rot,
                head_trans=tracked.head_trans, fov_deg=45.0, blendshapes=np.zeros(52),
            )  # fmt: skip
            recorder.write(None, TOPIC_FRAME, message)
            messages.append(message)
            with torch.no_grad():
                expected.append(layer.vertices(torch.from_numpy(shape[None]), exp, pose, transl)[0].numpy())
    result = run_cli("export", "--gltf", str(tmp_path / "rig.glb"), "--params", str(session), "--flame", str(flame_dir))
    assert result.returncode == 0, result.stderr
    gltf = Gltf(tmp_path / "rig.glb")
    with torch.no_grad():
        zero = layer.zero_params()
        index = matched(gltf, layer.vertices(torch.from_numpy(shape[None]), zero["exp"], zero["pose"], zero["transl"])[0].numpy())
    skeleton = Skeleton.from_extras(gltf.doc["meshes"][0]["extras"])
    animation = gltf.doc["animations"][0]
    for keyframe, (message, vertices) in enumerate(zip(messages, expected)):
        assert np.abs(gltf.evaluate(keyframe) - vertices[index]).max() <= 1e-5
        live = frame_rig_pose(skeleton, message)
        channel_values = {
            (gltf.doc["nodes"][c["target"]["node"]]["name"], c["target"]["path"]): gltf.accessor(animation["samplers"][c["sampler"]]["output"])
            for c in animation["channels"]
        }  # fmt: skip
        np.testing.assert_allclose(channel_values[("flame_head", "weights")].reshape(4, -1)[keyframe], live.weights, atol=1e-6)
        np.testing.assert_allclose(channel_values[("jaw", "translation")][keyframe], live.translations[2], atol=1e-6)
        np.testing.assert_allclose(np.abs(channel_values[("root", "rotation")][keyframe] @ live.rotations[0]), 1.0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Khronos glTF-Validator on the rig and on an animated export of a real tracked clip

_VALIDATE_JS = """
const validator = require(process.argv[1]);
const bytes = new Uint8Array(require('fs').readFileSync(process.argv[2]));
validator.validateBytes(bytes, {maxIssues: 100}).then(report => {
  console.log(JSON.stringify({errors: report.issues.numErrors, warnings: report.issues.numWarnings,
                              messages: report.issues.messages}));
}, error => { console.error(String(error)); process.exit(1); });
"""


@pytest.fixture(scope="module")
def gltf_validator() -> Path:
    """Khronos' validator (npm gltf-validator) in the git-ignored .cache/, installed as .ci/run does when absent."""
    if shutil.which("node") is None:
        pytest.skip("needs node (Node.js) to run Khronos' glTF validator; install Node.js 18 or newer")
    package = VALIDATOR_DIR / "node_modules" / "gltf-validator"
    if not package.is_dir():
        subprocess.run(["npm", "install", "--prefix", str(VALIDATOR_DIR), "--no-save", f"gltf-validator@{VALIDATOR_VERSION}"],
                       check=True, capture_output=True, timeout=300)  # fmt: skip
    return package


def validate(package: Path, glb: Path) -> dict:
    result = subprocess.run(["node", "-e", _VALIDATE_JS, str(package), str(glb)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def errors_of(report: dict) -> list[dict]:
    return [message for message in report["messages"] if message["severity"] == 0]


def test_validator_finds_no_error_in_a_textured_animated_rig(gltf_validator: Path, flame_dir: Path, tmp_path: Path) -> None:
    import cv2

    head = load_flame(flame_dir, n_tex=0)
    random_track_folder(tmp_path / "track", head, 20, 10, frames=5, seed=2)
    texture = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "track" / "texture.png"), texture)
    for name, params in (("rig.glb", []), ("animated.glb", ["--params", str(tmp_path / "track")])):
        result = run_cli("export", "--gltf", str(tmp_path / name), "--flame", str(flame_dir), *params)
        assert result.returncode == 0, result.stderr
        report = validate(gltf_validator, tmp_path / name)
        assert report["errors"] == 0, errors_of(report)
    material = Gltf(tmp_path / "animated.glb").doc["materials"][0]
    assert material["pbrMetallicRoughness"]["baseColorTexture"] == {"index": 0}
    assert "texture" in result.stdout


def test_real_tracked_clip_exports_a_valid_animated_rig(gltf_validator: Path, landmarker_task: Path, shared_clips: Path, tmp_path: Path) -> None:
    """The README's steps on a real clip: MediaPipe landmarks of its first frames, track, export --gltf."""
    from offline.track_job import detect_landmarks

    frames = 12
    sequence, _ = detect_landmarks(str(shared_clips / "bbaf2n.mpg"), landmarker_task, max_frames=frames)
    landmarks = tmp_path / "landmarks.npz"
    np.savez(landmarks, mp478=sequence.mp478, image_size=np.array(sequence.image_size), fps=sequence.fps)
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(landmarker_task, models / landmarker_task.name)
    demo = ["--flame", "demo", "--models", str(models)]
    result = run_cli("track", str(landmarks), "--out", str(tmp_path / "track"), *demo)
    assert result.returncode == 0, result.stderr
    result = run_cli("export", "--gltf", str(tmp_path / "clip.glb"), "--params", str(tmp_path / "track"), *demo)
    assert result.returncode == 0, result.stderr
    assert f"{frames} frames" in result.stdout
    report = validate(gltf_validator, tmp_path / "clip.glb")
    assert report["errors"] == 0, errors_of(report)
    gltf = Gltf(tmp_path / "clip.glb")
    assert gltf.keyframes() == frames
    camera = gltf.doc["cameras"][0]["perspective"]
    assert camera["aspectRatio"] == pytest.approx(sequence.image_size[1] / sequence.image_size[0])
    # Seen through the exported camera (glTF: at the origin, looking down -Z, +Y up), the head lies on the face.
    height, width = sequence.image_size
    rest = gltf.accessor(gltf.doc["meshes"][0]["primitives"][0]["attributes"]["POSITION"])
    tan_half = np.tan(camera["yfov"] / 2)
    for keyframe in (0, frames - 1):
        vertices = gltf.evaluate(keyframe)
        assert vertices[:, 2].max() < -0.1, "in front of the camera"
        ndc = vertices[:, :2] / -vertices[:, 2:] / [tan_half * camera["aspectRatio"], tan_half]
        pixels = np.stack([(ndc[:, 0] + 1) / 2 * width, (1 - ndc[:, 1]) / 2 * height], axis=1)
        observed = sequence.mp478[keyframe]
        assert np.linalg.norm(pixels.mean(axis=0) - np.nanmean(observed, axis=0)) < 0.05 * width
        assert np.ptp(pixels[:, 1]) == pytest.approx(np.nanmax(observed[:, 1]) - np.nanmin(observed[:, 1]), rel=0.3)
        top, bottom = np.argmax(rest[:, 1]), np.argmin(rest[:, 1])  # the head's crown and chin in model space
        assert pixels[top, 1] < pixels[bottom, 1] and observed[10, 1] < observed[152, 1], "upright, as in the video"


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one clear line


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("session_without_identity", "no identity yet"),
        ("session_without_frames", "holds no tracked frames"),
        ("other_model", "tracked with another model"),
        ("too_many_coefficients", "exp coefficients but the"),
        ("not_glb", "ending in .glb"),
        ("missing", "does not exist"),
        ("empty_folder", "holds neither tracking.npz"),
    ],
)
def test_bad_input_is_one_clear_line(case: str, message: str, flame_dir: Path, tmp_path: Path) -> None:
    head = load_flame(flame_dir, n_tex=0)
    params, out = tmp_path / "params", tmp_path / "rig.glb"
    frame = frame_message(
        seq=0, t_capture=1.0, valid=True, exp=np.zeros(10), jaw_pose=np.zeros(3), eye_pose=np.zeros(6),
        neck_pose=np.zeros(3), head_rot=[np.pi, 0, 0], head_trans=[0, 0, 0.5], fov_deg=40.0, blendshapes=np.zeros(52),
    )  # fmt: skip
    if case.startswith("session"):
        with SessionRecorder(params, None, None, {}) as recorder:
            if case == "session_without_identity":
                recorder.write(None, TOPIC_FRAME, frame)
            else:
                recorder.write(None, TOPIC_SHAPE, shape_message(np.zeros(20), head.name, head.checksum))
    elif case in ("other_model", "too_many_coefficients"):
        random_track_folder(params, head, 20, 10 if case == "other_model" else 500, frames=2, seed=0)
        if case == "other_model":
            (params / "meta.json").write_text(json.dumps({"fps": 25, "model": {"checksum": "0123456789abcdef"}}))
        else:
            (params / "meta.json").unlink()
    elif case == "not_glb":
        out = tmp_path / "rig.gltf"
        params.mkdir()
        random_track_folder(params, head, 20, 10, frames=2, seed=0)
    elif case == "empty_folder":
        params.mkdir()
    result = run_cli("export", "--gltf", str(out), "--params", str(params), "--flame", str(flame_dir), cwd=tmp_path)
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr
    assert not out.exists()

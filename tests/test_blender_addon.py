"""The Blender add-on inside real Blender (``bpy`` 4.2 as a Python module), against our FLAME layer.

Blender runs in its own process and virtual environment: bpy 4.2 needs exactly Python 3.11 and brings its own
copies of many libraries, so it is kept apart from torch. ``$FLAME_LIVE_BLENDER_PYTHON`` names that Python
(``.ci/run`` creates it with ``pip install bpy==4.2.0`` and sets it); without it these tests are skipped with
that reason. tests/blender_driver.py is what runs inside Blender: it installs the add-on zip built by
``run_stream.py blender-addon``, imports the rig .glb from ``run_stream.py export --gltf`` with Blender's glTF
importer and uses the add-on's operators as the panel does.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from engine.export import posed_vertices
from engine.flame import FlameLayer
from engine.model_selection import select_head_model
from realtime.publishers import VmcPublisher
from realtime.session import SessionReader
from run_stream import main

REPO_ROOT = Path(__file__).resolve().parents[1]
DRIVER = REPO_ROOT / "tests" / "blender_driver.py"
BLENDER_PYTHON_VARIABLE = "FLAME_LIVE_BLENDER_PYTHON"
#: Blender's glTF importer maps glTF (x, y, z) to Blender's (x, -z, y); glTF world is diag(1, -1, -1) times
#: OpenCV camera space (flame_client.rig), and at rest FLAME's model space.
BLENDER_FROM_GLTF = np.array([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]])
BLENDER_FROM_CAMERA = BLENDER_FROM_GLTF @ np.diag([1.0, -1.0, -1.0])
TOLERANCE_M = 1e-4


@pytest.fixture(scope="module")
def blender_python() -> str:
    path = os.environ.get(BLENDER_PYTHON_VARIABLE)
    if not path:
        pytest.skip(
            f"needs ${BLENDER_PYTHON_VARIABLE}: a Python 3.11 with 'pip install bpy==4.2.0' (.ci/run makes one)"
        )
    return path


@pytest.fixture(scope="module")
def addon_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("addon") / "flame_live_blender.zip"
    assert main(["blender-addon", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def demo_head(landmarker_task: Path):
    return select_head_model("demo", landmarker_task.parent)


def export_rig(params: Path, out: Path, models: Path, flame: str = "demo") -> Path:
    """The rig a user imports: ``export --gltf`` with the identity (and animation) of a session or track folder."""
    arguments = ["export", "--gltf", str(out), "--params", str(params), "--flame", flame, "--models", str(models)]
    assert main(arguments) == 0
    return out


def run_blender(blender_python: str, home: Path, *arguments: str, **options) -> subprocess.Popen:
    """The driver in Blender's Python, with a private HOME so the add-on installs into a throwaway profile."""
    env = {**os.environ, "HOME": str(home), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([blender_python, str(DRIVER), *arguments], env=env, text=True, **options)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def flame_vertices(head, arrays: dict[str, np.ndarray], space: str) -> np.ndarray:
    """Our FLAME layer in float64 for one frame's arrays (leading dimension 1), as ``export`` poses them."""
    layer = FlameLayer(head, arrays["shape"].shape[1], arrays["exp"].shape[1], dtype=torch.float64)
    return posed_vertices(layer, arrays, space)


def session_shape(session: Path) -> np.ndarray:
    shapes = [record.message["shape"] for record in SessionReader(session).messages() if record.topic == "flame.shape"]
    return np.asarray(shapes[-1])


def test_the_live_link_drives_the_imported_rig_exactly_from_a_replayed_stream(
    blender_python, addon_zip, demo_head, recorded_session, landmarker_task, tmp_path
) -> None:
    rig = export_rig(recorded_session, tmp_path / "rig.glb", landmarker_task.parent)
    port = free_udp_port()
    out = tmp_path / "live.npz"
    arguments = ["live", "--addon", str(addon_zip), "--glb", str(rig), "--port", str(port), "--out", str(out)]
    driver = run_blender(blender_python, tmp_path, *arguments, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        for line in driver.stdout:
            if line.strip() == "READY":
                break
        else:
            pytest.fail("Blender exited before connecting")
        with VmcPublisher("127.0.0.1", port) as vmc:  # another protocol at the add-on's port: counted, ignored
            vmc.publish_frame(
                next(r.message for r in SessionReader(recorded_session).messages() if r.topic == "flame.frame")
            )
        assert main(["replay", str(recorded_session), "--no-zmq", "--osc", f"127.0.0.1:{port}", "--speed", "2"]) == 0
        driver.stdin.close()
        driver.stdout.read()
        assert driver.wait(timeout=120) == 0
    finally:
        driver.kill()
    result = np.load(out)
    no_rig, port_in_use, not_connected, connected = result["results"]
    assert "select the FLAME head rig" in no_rig and "is already in use" in port_in_use
    assert "press Connect first" in not_connected and connected == "FINISHED"
    assert int(result["imported_actions"]) > 0 and bool(
        result["detached"]
    )  # the rig's animation no longer fights the stream
    frames = {
        r.message["seq"]: r.message for r in SessionReader(recorded_session).messages() if r.topic == "flame.frame"
    }
    valid = [seq for seq, message in frames.items() if message["valid"]]
    assert int(result["applied_seq"]) == valid[-1] and int(result["frames"]) == len(valid)
    assert int(result["foreign"]) == 2 and int(result["invalid"]) == 0
    message = frames[valid[-1]]
    arrays = {
        key: np.asarray(message[key], dtype=np.float64)[None] for key in ("exp", "jaw_pose", "neck_pose", "eye_pose")
    }
    model = flame_vertices(demo_head, {**arrays, "shape": session_shape(recorded_session)[None]}, "model")
    camera = model @ Rotation.from_rotvec(message["head_rot"]).as_matrix().T + np.asarray(message["head_trans"])
    expected = camera @ BLENDER_FROM_CAMERA.T
    assert np.abs(result["live_vertices"] - expected).max() <= TOLERANCE_M
    # Record keyed every received frame at the scene's 24 fps; its last key is the newest frame again.
    assert int(result["recorded"]) == len(valid) and 0 < int(result["keyed_frames"]) <= len(valid)
    assert int(result["bone_curves"]) == 5 * 7 and int(result["shape_curves"]) == demo_head.n_exp + 36
    assert np.abs(result["recorded_last_vertices"] - expected).max() <= TOLERANCE_M


@pytest.fixture(scope="module", params=["demo", "flame", "flame with eyelids"])
def tracked(request, tmp_path_factory, landmarker_task: Path, shared_clips: Path) -> tuple[str, Path]:
    """(--flame, folder): 'track' on a short real clip with strong head turns (23 frames at 12.5 fps), with the
    demo head, with the FLAME-format fixture (5023 vertices, UV seams, more than four joints per vertex) and with
    that fixture plus eyelid blendshapes (two more shape keys, driven by the frames' ``eyelids``)."""
    if request.param == "flame with eyelids":
        from flame_fixtures import write_flame_folder

        flame = str(write_flame_folder(tmp_path_factory.mktemp("flame_eyelids"), eyelids=True))
    else:
        flame = "demo" if request.param == "demo" else str(request.getfixturevalue("flame_dir"))
    out = tmp_path_factory.mktemp("tracked") / "track"
    clip = shared_clips / "head-pose-face-detection-female.gif"
    arguments = ["track", str(clip), "--out", str(out), "--models", str(landmarker_task.parent), "--flame", flame]
    assert main(arguments) == 0
    return flame, out


def glb_json(path: Path) -> dict:
    data = path.read_bytes()
    (length,) = struct.unpack_from("<I", data, 12)
    return json.loads(data[20 : 20 + length])


def test_import_tracking_keys_every_frame_and_blenders_exporters_write_the_animated_head(
    blender_python, addon_zip, tracked, landmarker_task, tmp_path
) -> None:
    flame, folder = tracked
    head = select_head_model(flame, landmarker_task.parent)
    rig = export_rig(folder, tmp_path / "rig.glb", landmarker_task.parent, flame)
    exports = tmp_path / "exports"
    exports.mkdir()
    out = tmp_path / "import.npz"
    # 25 scene fps for the clip's 12.5: tracked frame i lands on scene frame 1 + 2 i.
    arguments = ["import", "--addon", str(addon_zip), "--glb", str(rig), "--tracking", str(folder),
                 "--fps", "25", "--out", str(out), "--export-dir", str(exports)]  # fmt: skip
    driver = run_blender(blender_python, tmp_path, *arguments)
    assert driver.wait(timeout=300) == 0
    result = np.load(out)
    no_rig, not_tracking, imported = result["results"]
    assert "select the FLAME head rig" in no_rig and "holds neither tracking.npz" in not_tracking
    assert imported == "FINISHED"
    with np.load(folder / "tracking.npz") as data:
        keys = ("shape", "exp", "jaw_pose", "neck_pose", "eye_pose", "cam") + (("eyelids",) if "eyelids" in data.files else ())
        tracking = {key: data[key].astype(np.float64) for key in keys}
    assert ("eyelids" in keys) == (head.eyelids is not None)
    count = len(tracking["exp"])
    assert list(result["frames"]) == [1 + 2 * i for i in range(count)]
    # The rig splits vertices on UV seams: match each of Blender's vertices to its FLAME vertex at rest.
    rest_arrays = {key: np.zeros_like(tracking[key][:1]) for key in keys}
    rest = flame_vertices(head, {**rest_arrays, "shape": tracking["shape"][-1:]}, "model") @ BLENDER_FROM_GLTF.T
    distance, flame_vertex = cKDTree(rest).query(result["rest_vertices"])
    assert distance.max() <= TOLERANCE_M and len(np.unique(flame_vertex)) == head.n_vertices
    for index in range(count):
        arrays = {key: tracking[key][index : index + 1] for key in keys}
        camera = flame_vertices(head, {**arrays, "shape": tracking["shape"][-1:]}, "camera")
        error = np.abs(result["vertices"][index] - camera[flame_vertex] @ BLENDER_FROM_CAMERA.T).max()
        assert error <= TOLERANCE_M, f"frame {index}: {error} m"
    exported = glb_json(exports / "head.glb")
    paths = {channel["target"]["path"] for animation in exported["animations"] for channel in animation["channels"]}
    assert {"weights", "rotation", "translation"} <= paths
    fbx = (exports / "head.fbx").read_bytes()
    assert fbx.count(b"BlendShapeChannel") >= tracking["exp"].shape[1] + 36 + head.n_eyelids and b"AnimationCurveNode" in fbx

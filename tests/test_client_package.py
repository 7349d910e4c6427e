"""The standalone client package: a fresh venv gets it with numpy, pyzmq and msgpack only, and it decodes the
real publisher's bytes; its rig maths match the FLAME layer."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.assets import load_flame
from engine.flame import FlameLayer
from flame_client.messages import frame_message, shape_message
from flame_client.rig import Skeleton, frame_rig_pose, pose_corrective_weights
from realtime.publishers import ZmqPublisher

REPO_ROOT = Path(__file__).resolve().parents[1]
CLIENT_DIR = REPO_ROOT / "clients" / "python"
#: What pip prints when it cannot reach a package index (offline CI, no proxy): then the test is skipped.
_OFFLINE_SIGNS = ("No matching distribution found", "Could not find a version", "NewConnectionError",
                  "Failed to establish a new connection", "Temporary failure in name resolution", "Network is unreachable")  # fmt: skip

# Runs inside the fresh venv: report what is importable, then receive one frame and one shape from the live
# publisher with the package's own Subscriber and compute the rig pose a client would set.
_CLIENT_SCRIPT = """
import importlib.util, json, sys
import flame_client
from flame_client import Subscriber, TOPIC_FRAME, TOPIC_SHAPE
from flame_client.rig import Skeleton, frame_rig_pose
import numpy as np

heavy = [name for name in ("torch", "mediapipe", "cv2", "engine", "realtime") if importlib.util.find_spec(name)]
received = {}
with Subscriber(sys.argv[1], timeout_s=30) as subscriber:
    for topic, message in subscriber:
        received.setdefault(topic, message)
        if TOPIC_FRAME in received and TOPIC_SHAPE in received:
            break
skeleton = Skeleton(rest=np.arange(15.0).reshape(5, 3) / 100, exp_basis=np.full((5, 3, 50), 1e-3))
pose = frame_rig_pose(skeleton, received[TOPIC_FRAME])
print(json.dumps({
    "heavy": heavy, "module": flame_client.__file__, "frame": received[TOPIC_FRAME], "shape": received[TOPIC_SHAPE],
    "weights": pose.weights.tolist(), "translations": pose.translations.tolist(), "rotations": pose.rotations.tolist(),
}))
"""


def _frame(seq: int) -> dict:
    rng = np.random.default_rng(seq)
    return frame_message(
        seq=seq, t_capture=1.0e9 + seq, valid=True, exp=rng.normal(size=50), jaw_pose=rng.normal(scale=0.2, size=3),
        eye_pose=rng.normal(scale=0.1, size=6), neck_pose=rng.normal(scale=0.1, size=3),
        head_rot=[np.pi - 0.1, 0.2, 0.05], head_trans=[0.01, -0.02, 0.6], fov_deg=50.0,
        blendshapes=rng.uniform(size=52), t_publish=2.0e9,
    )  # fmt: skip


def test_fresh_venv_installs_the_client_alone_and_decodes_the_publisher(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # From a copy, so that pip's in-tree build leaves nothing behind in the checkout.
    leftovers = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    source = shutil.copytree(CLIENT_DIR, tmp_path / "client", ignore=leftovers)
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(source)],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )  # fmt: skip
    if install.returncode != 0:
        if any(sign in install.stderr for sign in _OFFLINE_SIGNS):
            reason = install.stderr.strip().splitlines()[-1]
            pytest.skip(f"no package index reachable to install numpy, pyzmq and msgpack: {reason}")
        pytest.fail(f"pip install ./clients/python failed:\n{install.stderr}")

    stop = threading.Event()
    with ZmqPublisher("tcp://127.0.0.1:*") as publisher:
        publisher.publish_shape(shape_message(np.linspace(-1, 1, 100), "FLAME 2020", "0123456789abcdef"))

        def publish() -> None:  # until the client has subscribed and received a frame
            while not stop.wait(0.02):
                publisher.publish_frame(_frame(7))

        thread = threading.Thread(target=publish, daemon=True)
        thread.start()
        try:
            client = subprocess.run(
                [str(python), "-c", _CLIENT_SCRIPT, publisher.endpoint],
                capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
            )  # fmt: skip
        finally:
            stop.set()
            thread.join(timeout=5)
    assert client.returncode == 0, client.stderr
    report = json.loads(client.stdout)

    assert report["heavy"] == [], f"importable in a venv that should have only the client: {report['heavy']}"
    assert report["module"].startswith(str(venv)), "the venv imported flame_client from somewhere else"
    sent = _frame(7)
    assert report["frame"] == sent
    assert report["shape"]["shape"] == pytest.approx(np.linspace(-1, 1, 100).tolist())
    skeleton = Skeleton(rest=np.arange(15.0).reshape(5, 3) / 100, exp_basis=np.full((5, 3, 50), 1e-3))
    expected = frame_rig_pose(skeleton, sent)
    np.testing.assert_allclose(report["weights"], expected.weights, atol=1e-12)
    np.testing.assert_allclose(report["translations"], expected.translations, atol=1e-12)
    np.testing.assert_allclose(report["rotations"], expected.rotations, atol=1e-12)


def test_pose_corrective_weights_are_the_flame_layers_pose_feature(flame_dir: Path) -> None:
    """With every vertex bound to the unposed root, FLAME's posed mesh minus the template is exactly
    posedirs @ pose_feature; recovering the feature from the layer's output must give our weights."""
    model = load_flame(flame_dir, n_shape=10, n_exp=10, n_tex=0)
    rooted = np.zeros_like(model.lbs_weights)
    rooted[:, 0] = 1.0
    layer = FlameLayer(dataclasses.replace(model, lbs_weights=rooted), dtype=torch.float64)
    rng = np.random.default_rng(3)
    for _ in range(3):
        joints = rng.normal(scale=0.4, size=(4, 3))
        pose = torch.zeros(1, 5, 3, dtype=torch.float64)
        pose[0, 1:] = torch.from_numpy(joints)
        zero = layer.zero_params()
        with torch.no_grad():
            posed = layer.vertices(zero["shape"], zero["exp"], pose, zero["transl"])[0].numpy()
        offsets = (posed - model.v_template).reshape(-1)
        feature = np.linalg.lstsq(model.posedirs.reshape(-1, 36), offsets, rcond=None)[0]
        np.testing.assert_allclose(pose_corrective_weights(*joints), feature, atol=1e-7)

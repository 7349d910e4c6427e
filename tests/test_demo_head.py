"""The demo head built from MediaPipe's canonical face: layout, landmarks, joints, skinning and bases."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.canonical_face import load_canonical_face
from engine.demo_head import DEMO_EXPRESSIONS, DEMO_SHAPES, EYE_CENTRE_DEPTH_M, IRIS_RADIUS_M, build_demo_head
from engine.flame import FlameLayer
from engine.head_model import JOINT_NAMES, HeadModel, ModelFileError
from engine.landmarks import LEFT_IRIS, RIGHT_IRIS, to_68

RIGHT_EYE_CONTOUR = (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246)
LEFT_EYE_CONTOUR = (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466)
LEFT_LIDS, RIGHT_LIDS = (386, 374), (159, 145)  # upper and lower lid at the middle of each eye
INNER_LIPS = (13, 14)
LEFT_CORNER, RIGHT_CORNER = 291, 61
LEFT_BROW = (300, 293, 334, 296, 336, 276, 283, 282, 295, 285)
RIGHT_BROW = (70, 63, 105, 66, 107, 46, 53, 52, 65, 55)
LEFT_CHEEK, RIGHT_CHEEK = 280, 50
FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148, 176)
JAW, LEFT_EYE, RIGHT_EYE = (JOINT_NAMES.index(name) for name in ("jaw", "left_eye", "right_eye"))


@pytest.fixture(scope="module")
def head(landmarker_task: Path) -> HeadModel:
    return build_demo_head(landmarker_task)


@pytest.fixture(scope="module")
def layer(head: HeadModel) -> FlameLayer:
    return FlameLayer(head, dtype=torch.float64)


def _expressed(head: HeadModel, **coefficients: float) -> np.ndarray:
    exp = np.zeros(head.n_exp)
    for name, value in coefficients.items():
        exp[DEMO_EXPRESSIONS.index(name)] = value
    return head.v_template + head.exprdirs @ exp


def _posed(layer: FlameLayer, joint: int, axis_angle: tuple[float, float, float]) -> np.ndarray:
    params = layer.zero_params()
    params["pose"][0, joint] = torch.tensor(axis_angle, dtype=torch.float64)
    return layer.vertices(**params)[0].numpy()


def _distance(vertices: np.ndarray, pair: tuple[int, int]) -> float:
    return float(np.linalg.norm(vertices[pair[0]] - vertices[pair[1]]))


def test_model_is_valid_and_labelled_as_the_demo_head(head: HeadModel, landmarker_task: Path) -> None:
    head.validate()
    assert head.is_demo and head.name == "demo head (not FLAME)"
    assert head.sources == {"face_landmarker.task": hashlib.sha256(landmarker_task.read_bytes()).hexdigest()}
    assert (head.n_vertices, head.n_joints, head.n_shape, head.n_exp) == (478, 5, len(DEMO_SHAPES), len(DEMO_EXPRESSIONS))
    assert head.posedirs.shape == (478, 3, 36) and not head.posedirs.any()
    assert list(head.parents) == [-1, 0, 1, 1, 1]


def test_vertices_are_the_canonical_face_in_metres_with_y_up_and_z_forward(head: HeadModel, landmarker_task: Path) -> None:
    face = load_canonical_face(landmarker_task)
    # Same points in the same order, only scaled (cm -> m) and shifted.
    np.testing.assert_allclose(head.v_template[:468] - head.v_template[0], (face.vertices - face.vertices[0]) * 0.01, atol=1e-12)
    np.testing.assert_array_equal(head.faces[:898], face.triangles)
    nose_tip, chin, forehead = head.v_template[[4, 152, 10]]
    assert nose_tip[2] == head.v_template[:, 2].max()  # the face looks toward +z
    assert forehead[1] - chin[1] > 0.15  # y up, metres
    assert head.v_template[263, 0] > 0 > head.v_template[33, 0]  # the subject's left eye is at +x, as in FLAME
    np.testing.assert_allclose(head.v_template[[234, 454]].mean(axis=0), 0.0, atol=1e-12)  # origin between the ears


def test_mediapipe_embedding_is_exact_for_all_478_landmarks(head: HeadModel) -> None:
    embedding = head.mediapipe
    np.testing.assert_array_equal(embedding.landmark_indices, np.arange(478))
    # Exact for any deformation, not only the template: each landmark is its vertex.
    vertices = head.v_template + np.random.default_rng(0).normal(scale=0.01, size=head.v_template.shape)
    points = np.einsum("lk,lkd->ld", embedding.bary, vertices[head.faces[embedding.face_idx]])
    np.testing.assert_allclose(points, vertices, atol=1e-15)


def test_irises_sit_in_the_eye_openings_in_mediapipe_order(head: HeadModel) -> None:
    for iris, contour in ((RIGHT_IRIS, RIGHT_EYE_CONTOUR), (LEFT_IRIS, LEFT_EYE_CONTOUR)):
        centre = head.v_template[iris[0]]
        np.testing.assert_allclose(centre, head.v_template[list(contour)].mean(axis=0))
        # Boundary points at +x, +y, -x, -y (as MediaPipe orders them, for both eyes).
        offsets = head.v_template[list(iris[1:])] - centre
        np.testing.assert_allclose(offsets, IRIS_RADIUS_M * np.array([[1, 0, 0], [0, 1, 0], [-1, 0, 0], [0, -1, 0]]), atol=1e-15)
    iris_faces = head.faces[898:]
    assert iris_faces.shape == (8, 3) and set(iris_faces.ravel()) == set(range(468, 478))
    v = head.v_template
    normals = np.cross(v[iris_faces[:, 1]] - v[iris_faces[:, 0]], v[iris_faces[:, 2]] - v[iris_faces[:, 0]])
    assert np.all(normals[:, 2] > 0)  # facing the viewer, like the face mesh


def test_full68_embedding_matches_the_mediapipe_to_68_table(head: HeadModel) -> None:
    assert head.full68 is not None and head.contour68 is None
    points = np.einsum("lk,lkd->ld", head.full68.bary, head.v_template[head.faces[head.full68.face_idx]])
    np.testing.assert_allclose(points, to_68(head.v_template), atol=1e-15)
    np.testing.assert_array_equal(head.static68.face_idx, head.full68.face_idx[17:])
    np.testing.assert_array_equal(head.static68.bary, head.full68.bary[17:])


def test_joints_sit_where_a_head_has_them(head: HeadModel) -> None:
    joints = head.j_regressor @ head.v_template
    root, neck, jaw, left_eye, right_eye = joints
    chin, nose_tip = head.v_template[[152, 4]]
    for joint in (root, neck):
        assert joint[0] == pytest.approx(0.0, abs=1e-12)
        assert chin[1] < joint[1] < 0.0 and joint[2] < 0.0  # below the ears, behind them
    assert root[1] < neck[1]
    assert abs(jaw[1]) < 0.02 and 0.0 < jaw[2] < nose_tip[2] - 0.06  # ear level, well behind the face
    np.testing.assert_allclose(left_eye, head.v_template[LEFT_IRIS[0]] - [0, 0, EYE_CENTRE_DEPTH_M], atol=1e-12)
    np.testing.assert_allclose(right_eye, head.v_template[RIGHT_IRIS[0]] - [0, 0, EYE_CENTRE_DEPTH_M], atol=1e-12)


def test_joints_follow_the_identity_but_not_the_expression(head: HeadModel) -> None:
    np.testing.assert_allclose(head.j_regressor.sum(axis=1), 1.0, atol=1e-12)
    # Affine weights: scaling and shifting the whole head moves the joints the same way.
    moved = 1.1 * head.v_template + [0.01, -0.02, 0.03]
    np.testing.assert_allclose(head.j_regressor @ moved, 1.1 * (head.j_regressor @ head.v_template) + [0.01, -0.02, 0.03], atol=1e-12)
    wider = head.v_template + head.shapedirs[:, :, DEMO_SHAPES.index("head_width")] * 3.0
    assert (head.j_regressor @ wider)[LEFT_EYE, 0] > (head.j_regressor @ head.v_template)[LEFT_EYE, 0] + 5e-4
    # Expressions leave the joints where they are, so an eye closing does not move the eyeball.
    np.testing.assert_allclose(np.einsum("jv,vce->jce", head.j_regressor, head.exprdirs), 0.0, atol=1e-12)


def test_skinning_weights_face_on_neck_smooth_jaw_irises_on_eyes(head: HeadModel) -> None:
    weights = head.lbs_weights
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-12)
    assert weights.min() >= 0.0 and not weights[:, 0].any()  # nothing on the root, as FLAME's head
    np.testing.assert_array_equal(np.flatnonzero(weights[:, LEFT_EYE]), LEFT_IRIS)
    np.testing.assert_array_equal(np.flatnonzero(weights[:, RIGHT_EYE]), RIGHT_IRIS)
    np.testing.assert_array_equal(weights[list(LEFT_IRIS) + list(RIGHT_IRIS)].max(axis=1), 1.0)
    jaw = weights[:468, JAW]
    assert jaw[14] == 1.0 and jaw[152] == 1.0 and jaw[13] == 0.0 and jaw[4] == 0.0  # lower lip, chin; upper lip, nose
    assert 0.2 < jaw[LEFT_CORNER] < 0.8 and 0.2 < jaw[RIGHT_CORNER] < 0.8
    assert np.count_nonzero((jaw > 0.05) & (jaw < 0.95)) > 30  # a falloff over the cheeks, not a cut
    np.testing.assert_allclose(jaw, jaw[_mirror(head)], atol=1e-9)


def _mirror(head: HeadModel) -> np.ndarray:
    """Index of each mesh vertex's mirror image across x = 0 (the canonical face is symmetric)."""
    mesh = head.v_template[:468]
    distance = np.linalg.norm(mesh[:, None] - mesh[None] * [-1, 1, 1], axis=2)
    assert distance.min(axis=1).max() < 1e-6
    return distance.argmin(axis=1)


def test_jaw_rotation_opens_the_mouth(head: HeadModel, layer: FlameLayer) -> None:
    rest = layer.vertices(**layer.zero_params())[0].numpy()
    np.testing.assert_allclose(rest, head.v_template, atol=1e-12)
    opened = _posed(layer, JAW, (0.2, 0.0, 0.0))
    assert _distance(opened, INNER_LIPS) > _distance(rest, INNER_LIPS) + 0.01
    assert opened[152, 1] < rest[152, 1] - 0.008  # the chin drops (and swings back)
    np.testing.assert_allclose(opened[[13, 4, 159, 10]], rest[[13, 4, 159, 10]], atol=1e-12)  # upper face stays


def test_eye_rotation_moves_the_iris_and_nothing_else(head: HeadModel, layer: FlameLayer) -> None:
    rest = layer.vertices(**layer.zero_params())[0].numpy()
    turned = _posed(layer, LEFT_EYE, (0.0, 0.3, 0.0))  # look toward the subject's left (+x)
    moved = np.flatnonzero(np.linalg.norm(turned - rest, axis=1) > 1e-12)
    np.testing.assert_array_equal(moved, LEFT_IRIS)
    assert turned[LEFT_IRIS[0], 0] - rest[LEFT_IRIS[0], 0] == pytest.approx(EYE_CENTRE_DEPTH_M * np.sin(0.3), rel=1e-6)
    # The FLAME layer finds the pupils from the skinning: they are MediaPipe's iris centres.
    np.testing.assert_array_equal(layer.eye_vertex_idx, [LEFT_IRIS[0], RIGHT_IRIS[0]])


def _brow_height(v: np.ndarray, brow: tuple[int, ...]) -> float:
    return float(v[list(brow), 1].mean())


#: expression -> (measurement, minimum change at coefficient 1; negative = must decrease by at least that).
EXPRESSION_EFFECTS = {
    "mouth_open": (lambda v: _distance(v, INNER_LIPS), 0.006),
    "eye_close_left": (lambda v: _distance(v, LEFT_LIDS), -0.006),
    "eye_close_right": (lambda v: _distance(v, RIGHT_LIDS), -0.006),
    "eye_wide_left": (lambda v: _distance(v, LEFT_LIDS), 0.002),
    "eye_wide_right": (lambda v: _distance(v, RIGHT_LIDS), 0.002),
    "smile_left": (lambda v: v[LEFT_CORNER, 1], 0.004),
    "smile_right": (lambda v: v[RIGHT_CORNER, 1], 0.004),
    "mouth_frown": (lambda v: v[[LEFT_CORNER, RIGHT_CORNER], 1].mean(), -0.003),
    "brow_raise_left": (lambda v: _brow_height(v, LEFT_BROW), 0.006),
    "brow_raise_right": (lambda v: _brow_height(v, RIGHT_BROW), 0.006),
    "brow_lower_left": (lambda v: _brow_height(v, LEFT_BROW), -0.004),
    "brow_lower_right": (lambda v: _brow_height(v, RIGHT_BROW), -0.004),
    "pucker": (lambda v: _distance(v, (LEFT_CORNER, RIGHT_CORNER)), -0.01),
    "mouth_stretch": (lambda v: _distance(v, (LEFT_CORNER, RIGHT_CORNER)), 0.008),
    "mouth_left": (lambda v: v[[13, 14, LEFT_CORNER, RIGHT_CORNER], 0].mean(), 0.004),
    "cheek_puff": (lambda v: v[LEFT_CHEEK, 0] - v[RIGHT_CHEEK, 0], 0.006),
}

#: Measurements an expression must leave alone (within 0.3 mm): the other side, the other feature.
UNTOUCHED = {
    "mouth_open": ["eye_close_left", "eye_close_right", "brow_raise_left"],
    "eye_close_left": ["eye_close_right", "brow_raise_left", "mouth_open"],
    "eye_close_right": ["eye_close_left", "brow_raise_right", "mouth_open"],
    "smile_left": ["smile_right", "eye_close_left"],
    "smile_right": ["smile_left", "eye_close_right"],
    "brow_raise_left": ["brow_raise_right", "eye_close_left"],
    "brow_raise_right": ["brow_raise_left", "eye_close_right"],
    "brow_lower_left": ["brow_raise_right", "eye_close_left"],
    "brow_lower_right": ["brow_raise_left", "eye_close_right"],
    "pucker": ["eye_close_left", "brow_raise_left"],
}


def test_expression_names_are_the_basis() -> None:
    assert set(EXPRESSION_EFFECTS) == set(DEMO_EXPRESSIONS)


@pytest.mark.parametrize("name", DEMO_EXPRESSIONS)
def test_each_expression_does_what_its_name_says(head: HeadModel, name: str) -> None:
    neutral, expressed = head.v_template, _expressed(head, **{name: 1.0})
    measure, minimum = EXPRESSION_EFFECTS[name]
    change = measure(expressed) - measure(neutral)
    assert change >= minimum if minimum > 0 else change <= minimum, f"{name} changed its measure by {change * 1000:.1f} mm"
    for other in UNTOUCHED.get(name, []):
        other_measure = EXPRESSION_EFFECTS[other][0]
        assert other_measure(expressed) == pytest.approx(other_measure(neutral), abs=3e-4), f"{name} moved {other}'s region"
    # A full expression is a few millimetres to a centimetre, never more; the outline and the eyeballs stay.
    displacement = np.linalg.norm(expressed - neutral, axis=1)
    assert 0.002 < displacement.max() < 0.015
    assert displacement[list(FACE_OVAL) + list(LEFT_IRIS) + list(RIGHT_IRIS)].max() == 0.0


def test_closed_eye_lids_meet(head: HeadModel) -> None:
    closed = _expressed(head, eye_close_left=1.0, eye_close_right=1.0)
    assert _distance(closed, LEFT_LIDS) < 0.0015 and _distance(closed, RIGHT_LIDS) < 0.0015
    assert _distance(head.v_template, LEFT_LIDS) > 0.005


def test_left_and_right_components_mirror_each_other(head: HeadModel) -> None:
    mirror = _mirror(head)
    for left, right in (("eye_close_left", "eye_close_right"), ("smile_left", "smile_right"), ("brow_raise_left", "brow_raise_right")):
        left_field = head.exprdirs[:468, :, DEMO_EXPRESSIONS.index(left)]
        right_field = head.exprdirs[:468, :, DEMO_EXPRESSIONS.index(right)]
        np.testing.assert_allclose(left_field[mirror] * [-1, 1, 1], right_field, atol=1e-9)


def test_identity_basis_changes_the_shape_smoothly(head: HeadModel) -> None:
    edges = np.concatenate([head.faces[:898, [0, 1]], head.faces[:898, [1, 2]], head.faces[:898, [2, 0]]])
    edge_length = np.linalg.norm(head.v_template[edges[:, 0]] - head.v_template[edges[:, 1]], axis=1)
    for k, name in enumerate(DEMO_SHAPES):
        field = head.shapedirs[:, :, k]
        assert 0.0015 < np.linalg.norm(field, axis=1).max() < 0.006, name  # about one standard deviation
        # Smooth: neighbouring vertices move alike (strain below 20 % per unit coefficient).
        stretch = np.linalg.norm(field[edges[:, 0]] - field[edges[:, 1]], axis=1) / edge_length
        assert stretch.max() < 0.2, name
    # Irises ride along with their eye openings for any identity.
    shaped = head.v_template + head.shapedirs @ np.random.default_rng(1).normal(size=head.n_shape)
    for iris, contour in ((RIGHT_IRIS, RIGHT_EYE_CONTOUR), (LEFT_IRIS, LEFT_EYE_CONTOUR)):
        np.testing.assert_allclose(shaped[iris[0]], shaped[list(contour)].mean(axis=0), atol=1e-12)


def test_uv_map_is_mediapipes_with_v_up(head: HeadModel, landmarker_task: Path) -> None:
    face = load_canonical_face(landmarker_task)
    assert head.uv_coords.shape == (478, 2) and np.all((head.uv_coords >= 0) & (head.uv_coords <= 1))
    np.testing.assert_allclose(head.uv_coords[:468], np.column_stack([face.uv[:, 0], 1 - face.uv[:, 1]]))
    np.testing.assert_array_equal(head.uv_faces, head.faces)
    assert head.uv_coords[10, 1] > head.uv_coords[152, 1]  # forehead above chin
    for iris, contour in ((RIGHT_IRIS, RIGHT_EYE_CONTOUR), (LEFT_IRIS, LEFT_EYE_CONTOUR)):
        low, high = head.uv_coords[list(contour)].min(axis=0), head.uv_coords[list(contour)].max(axis=0)
        assert np.all((head.uv_coords[iris[0]] > low) & (head.uv_coords[iris[0]] < high))


def test_built_once_per_file_and_each_caller_gets_its_own_copy(head: HeadModel, landmarker_task: Path) -> None:
    first = build_demo_head(landmarker_task)
    first.v_template[:] = 0.0
    second = build_demo_head(landmarker_task)
    np.testing.assert_array_equal(second.v_template, head.v_template)


def test_missing_task_file_is_a_one_line_model_file_error(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="does not exist") as excinfo:
        build_demo_head(tmp_path / "face_landmarker.task")
    assert "\n" not in str(excinfo.value)

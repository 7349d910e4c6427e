"""The synthetic FLAME fixture: FLAME's real layout, a sane head, and files other tools read like the real ones."""

from __future__ import annotations

import pickle
import pickletools
from pathlib import Path

import numpy as np
import pytest
from flame_fixtures import N_EYE_VERTICES, N_FACES, N_HEAD_VERTICES, N_VERTICES, flame_arrays, write_smplx_copy


def _landmarks(vertices: np.ndarray, faces: np.ndarray, face_idx: np.ndarray, bary: np.ndarray) -> np.ndarray:
    return np.einsum("...k,...kj->...j", bary, vertices[faces[face_idx]])


def test_real_flame_shapes_and_a_closed_head_with_a_neck_opening() -> None:
    truth = flame_arrays()
    assert truth.v_template.shape == (N_VERTICES, 3) and truth.faces.shape == (N_FACES, 3)
    assert truth.shapedirs.shape == (5023, 3, 400) and truth.posedirs.shape == (5023, 3, 36)
    assert truth.j_regressor.shape == (5, 5023) and truth.weights.shape == (5023, 5)
    np.testing.assert_array_equal(truth.kintree_table, [[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]])
    edges = np.sort(truth.faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    assert set(counts) == {1, 2} and np.sum(counts == 1) == 60  # manifold; the only border is the neck rim
    corners = truth.v_template[truth.faces]
    normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    part = np.searchsorted([N_HEAD_VERTICES, N_HEAD_VERTICES + N_EYE_VERTICES], truth.faces[:, 0], side="right")
    centres = np.array([[0.0, -0.01, 0.0], truth.joints[3], truth.joints[4]])[part]  # head centre, eyeballs
    assert np.all(np.einsum("ij,ij->i", normals, corners.mean(1) - centres) > 0)  # all triangles face outward
    extent = np.ptp(truth.v_template, axis=0)
    assert 0.14 < extent[0] < 0.18 and 0.18 < extent[1] < 0.24 and extent[2] > 0.18


def test_rig_is_consistent() -> None:
    truth = flame_arrays()
    np.testing.assert_allclose(truth.weights.sum(axis=1), 1.0)
    np.testing.assert_allclose(truth.j_regressor.sum(axis=1), 1.0)
    np.testing.assert_allclose(truth.j_regressor @ truth.v_template, truth.joints)
    left = slice(N_HEAD_VERTICES, N_HEAD_VERTICES + N_EYE_VERTICES)
    assert np.all(truth.weights[left, 3] == 1.0) and np.all(truth.weights[N_HEAD_VERTICES + N_EYE_VERTICES :, 4] == 1.0)
    assert truth.joints[3, 0] > 0 > truth.joints[4, 0]  # the subject's left eye is on +x
    root, neck, jaw = truth.joints[:3]
    assert root[1] < neck[1] < jaw[1] < truth.joints[3, 1]
    head = truth.v_template[:N_HEAD_VERTICES]
    chin = np.argmin(head[:, 1] - head[:, 2])  # lowest and most forward
    assert truth.weights[chin, 2] > 0.9 and truth.weights[0, 1] == 1.0  # chin on the jaw, crown on the neck


def test_bases_are_orthogonal_smooth_and_millimetre_sized() -> None:
    truth = flame_arrays()
    for basis in (truth.shapedirs[:, :, :300], truth.shapedirs[:, :, 300:]):
        flat = basis.reshape(-1, basis.shape[-1])
        gram = flat.T @ flat
        np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-8)
        rms_mm = 1000 * np.sqrt(np.mean(basis**2, axis=(0, 1)))
        assert 2 < rms_mm[0] < 6 and rms_mm[-1] < rms_mm[0]
    edge = truth.faces[:, :2]
    step = np.linalg.norm(truth.shapedirs[edge[:, 0], :, 0] - truth.shapedirs[edge[:, 1], :, 0], axis=1)
    assert np.median(step) < 0.1 * np.abs(truth.shapedirs[:, :, 0]).max()  # neighbours move together
    eyes = slice(N_HEAD_VERTICES, N_VERTICES)
    assert np.all(truth.shapedirs[eyes, :, 300:] == 0)  # expressions leave the eyeballs alone


def test_landmarks_sit_on_the_face_in_order() -> None:
    truth = flame_arrays()
    static = _landmarks(truth.v_template, truth.faces, truth.static_idx, truth.static_bary)
    assert np.all(truth.static_idx < 8820) and np.all(static[:, 2] > 0.04)  # head mesh, front half
    brows, nose_tip, eyes, mouth = static[:10], static[13], static[19:31], static[31:]
    assert brows[:, 1].min() > eyes[:, 1].max() > nose_tip[1] > mouth[:, 1].max()
    assert static[19, 0] < static[22, 0] < 0 < static[25, 0] < static[28, 0]  # right eye on -x, left on +x
    mediapipe = _landmarks(truth.v_template, truth.faces, truth.mediapipe_idx, truth.mediapipe_bary)
    assert np.all(truth.mediapipe_landmarks < 468) and len(set(truth.mediapipe_landmarks)) == 105
    assert np.all(mediapipe[:, 2] > 0.04)


def test_fixture_is_deterministic_per_seed() -> None:
    again = flame_arrays.__wrapped__(0)
    np.testing.assert_array_equal(again.shapedirs, flame_arrays(0).shapedirs)
    assert not np.allclose(flame_arrays(1).shapedirs, again.shapedirs)
    np.testing.assert_array_equal(flame_arrays(1).v_template, again.v_template)


def test_model_pickle_references_what_the_real_file_does(flame_dir: Path) -> None:
    data = (flame_dir / "generic_model.pkl").read_bytes()
    assert data[:2] == b"\x80\x02"
    names = {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    assert names == {
        "chumpy.ch Ch",
        "scipy.sparse.csc csc_matrix",
        "numpy.core.multiarray _reconstruct",
        "numpy ndarray",
        "numpy dtype",
        "__builtin__ set",
    }
    with pytest.raises(ModuleNotFoundError, match="chumpy"):
        pickle.loads(data, encoding="latin1")  # like the real file, plain pickle needs chumpy


def test_deca_embedding_holds_torch_tensors_like_the_real_file(flame_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    content = np.load(flame_dir / "landmark_embedding.npy", allow_pickle=True, encoding="latin1").item()
    assert isinstance(content["dynamic_lmk_faces_idx"], torch.Tensor)
    truth = flame_arrays()
    np.testing.assert_array_equal(content["dynamic_lmk_faces_idx"].numpy(), truth.contour_idx)
    np.testing.assert_array_equal(content["full_lmk_faces_idx"], truth.full_idx[None])


def test_smplx_reads_the_copy_and_agrees(flame_dir: Path, tmp_path: Path) -> None:
    smplx = pytest.importorskip("smplx")
    torch = pytest.importorskip("torch")
    layer = smplx.create(str(write_smplx_copy(flame_dir, tmp_path)), model_type="flame", use_face_contour=True)
    layer.requires_grad_(False)
    truth = flame_arrays()
    output = layer()
    np.testing.assert_allclose(output.vertices[0].numpy(), truth.v_template, atol=1e-6)
    static = _landmarks(truth.v_template, truth.faces, truth.static_idx, truth.static_bary)
    contour = _landmarks(truth.v_template, truth.faces, truth.contour_idx[0], truth.contour_bary[0])
    np.testing.assert_allclose(output.joints[0, 5:].numpy(), np.concatenate([static, contour]), atol=1e-6)
    # The jaw contour follows the silhouette: turning the head keeps its outer points where they were.
    for yaw_deg in (-30, 30):
        turned = layer(global_orient=torch.tensor([[0.0, np.radians(yaw_deg), 0.0]], dtype=torch.float32))
        outer_x = turned.joints[0, 5 + 51 + np.array([0, 16]), 0].numpy()
        np.testing.assert_allclose(outer_x, contour[[0, 16], 0], atol=0.01)

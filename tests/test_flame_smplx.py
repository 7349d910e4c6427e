"""Our FLAME layer against an independent implementation (smplx) on generated FLAME-format models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.assets import load_flame
from engine.flame import FlameLayer, rodrigues
from engine.landmark_model import LandmarkModel

smplx = pytest.importorskip("smplx", reason="smplx is a test dependency: pip install -e '.[test]'")

N_SHAPE, N_EXP = 20, 10
TOLERANCE_M = 1e-5


def _smplx_flame(flame_folder: Path, tmp_path: Path, batch: int):
    from flame_fixtures import write_smplx_copy

    root = write_smplx_copy(flame_folder, tmp_path / "smplx")
    return smplx.create(
        str(root), model_type="flame", use_face_contour=True, num_betas=N_SHAPE, num_expression_coeffs=N_EXP,
        batch_size=batch, ext="pkl",
    )


def _random_params(batch: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    global_orient = normal(batch, 3, std=0.3)
    global_orient[:, 1] = torch.linspace(-0.8, 0.8, batch)  # yaw across the whole contour table and beyond
    return {
        "betas": normal(batch, N_SHAPE, std=1.0),
        "expression": normal(batch, N_EXP, std=1.0),
        "global_orient": global_orient,
        "neck_pose": normal(batch, 3, std=0.2),
        "jaw_pose": normal(batch, 3, std=0.15).abs(),
        "leye_pose": normal(batch, 3, std=0.2),
        "reye_pose": normal(batch, 3, std=0.2),
        "transl": normal(batch, 3, std=0.05),
    }


@pytest.mark.parametrize("folder_fixture", ["flame_dir", "flame_npz_dir"])
def test_vertices_and_68_landmarks_match_smplx(folder_fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    folder = request.getfixturevalue(folder_fixture)
    batch = 9
    params = _random_params(batch, seed=len(folder_fixture))
    reference = _smplx_flame(folder, tmp_path, batch)(**params)

    layer = FlameLayer(load_flame(folder), n_shape=N_SHAPE, n_exp=N_EXP)
    pose = torch.stack([params[k] for k in ("global_orient", "neck_pose", "jaw_pose", "leye_pose", "reye_pose")], dim=1)
    ours = layer.vertices(params["betas"], params["expression"], pose, params["transl"])
    assert (ours - reference.vertices).abs().max().item() <= TOLERANCE_M

    # smplx appends 51 static then 17 contour landmarks; ours are iBUG order (contour first).
    theirs = reference.joints[:, -68:]
    landmarks = layer.landmarks(params["betas"], params["expression"], pose, params["transl"]).lmk68
    assert (landmarks[:, 17:] - theirs[:, :51]).abs().max().item() <= TOLERANCE_M
    assert (landmarks[:, :17] - theirs[:, 51:]).abs().max().item() <= TOLERANCE_M
    # The yaws span more than one contour row, so the test covers the row selection itself.
    assert len(set(layer.contour_rows(rodrigues(pose)).tolist())) > 5


def test_landmark_only_path_equals_dense_path(flame_dir: Path) -> None:
    layer = FlameLayer(load_flame(flame_dir), n_shape=N_SHAPE, n_exp=N_EXP, dtype=torch.float64)
    params = _random_params(4, seed=3)
    pose = torch.stack([params[k] for k in ("global_orient", "neck_pose", "jaw_pose", "leye_pose", "reye_pose")], dim=1).double()
    shape, exp, transl = params["betas"].double(), params["expression"].double(), params["transl"].double()
    vertices = layer.vertices(shape, exp, pose, transl)
    landmarks = layer.landmarks(shape, exp, pose, transl)
    model = layer.model
    embedding = model.mediapipe
    corners = vertices[:, layer.faces[torch.as_tensor(embedding.face_idx)]]
    dense_mediapipe = (corners * torch.as_tensor(embedding.bary)[None, ..., None]).sum(dim=2)
    assert torch.allclose(landmarks.mediapipe, dense_mediapipe, atol=1e-12)
    assert torch.allclose(landmarks.eyes, vertices[:, torch.as_tensor(layer.eye_vertex_idx)], atol=1e-12)


def test_pupils_are_found_from_skinning_weights(flame_dir: Path) -> None:
    model = load_flame(flame_dir)
    layer = FlameLayer(model)
    for joint, vertex in zip((3, 4), layer.eye_vertex_idx):
        assert model.lbs_weights[vertex, joint] > 0.5  # on the eyeball
        eyeball = np.flatnonzero(model.lbs_weights[:, joint] > 0.5)
        assert model.v_template[vertex, 2] == pytest.approx(model.v_template[eyeball, 2].max(), abs=1e-4)  # its front


def test_analytic_jacobians_match_finite_differences(flame_dir: Path) -> None:
    layer = FlameLayer(load_flame(flame_dir), n_shape=N_SHAPE, n_exp=N_EXP, dtype=torch.float64)
    model = LandmarkModel(layer)
    params = _random_params(2, seed=5)
    coeffs = torch.cat([params["betas"], params["expression"]], dim=1).double()
    pose = torch.stack([params[k] for k in ("global_orient", "neck_pose", "jaw_pose", "leye_pose", "reye_pose")], dim=1).double()
    rotations, transl = rodrigues(pose), params["transl"].double()
    evaluation = model.evaluate(coeffs, rotations, transl)
    reference = layer.landmarks(params["betas"].double(), params["expression"].double(), pose, transl)
    assert torch.allclose(evaluation.points, torch.cat([reference.lmk68, reference.mediapipe, reference.eyes], dim=1), atol=1e-12)
    eps = 1e-6
    for column in (0, N_SHAPE - 1, N_SHAPE, N_SHAPE + N_EXP - 1):
        step = torch.zeros_like(coeffs)
        step[:, column] = eps
        numeric = (model.evaluate(coeffs + step, rotations, transl, False).points - model.evaluate(coeffs - step, rotations, transl, False).points) / (2 * eps)
        assert torch.allclose(evaluation.d_coeffs[..., column], numeric, atol=1e-7)
    for joint in range(5):
        for axis in range(3):
            delta = torch.zeros(2, 3, dtype=torch.float64)
            delta[:, axis] = eps
            plus, minus = rotations.clone(), rotations.clone()
            plus[:, joint] = rotations[:, joint] @ rodrigues(delta)
            minus[:, joint] = rotations[:, joint] @ rodrigues(-delta)
            numeric = (model.evaluate(coeffs, plus, transl, False).points - model.evaluate(coeffs, minus, transl, False).points) / (2 * eps)
            assert torch.allclose(evaluation.d_rotations[:, :, :, joint, axis], numeric, atol=1e-7)


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("exp", lambda p: p["exp"].fill_(float("nan")), "'exp' contains NaN or infinite values"),
        ("transl", lambda p: p["transl"].fill_(float("inf")), "'transl' contains NaN or infinite values"),
        ("pose", lambda p: p.__setitem__("pose", p["pose"][:, :4]), "'pose' has shape (2, 4, 3), expected (B, 5, 3)"),
        ("shape", lambda p: p.__setitem__("shape", p["shape"][:, :3]), "'shape' has shape (2, 3), expected (B, 20)"),
    ],
)
def test_bad_parameters_at_the_api_boundary_are_one_clear_error(flame_dir: Path, name: str, make, message: str) -> None:
    from engine.errors import UserError

    layer = FlameLayer(load_flame(flame_dir), n_shape=N_SHAPE, n_exp=N_EXP)
    params = layer.zero_params(2)
    make(params)
    for evaluate in (layer.vertices, layer.landmarks):
        with pytest.raises(UserError) as error:
            evaluate(**params)
        assert message in str(error.value) and "\n" not in str(error.value)

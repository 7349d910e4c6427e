"""The landmark model's points without Jacobians (engine/landmark_model.py: LandmarkModel.points), for long batches:
the same points as the evaluation the solver uses, and as FLAME's dense landmarks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.assets import load_flame
from engine.flame import FlameLayer, rodrigues
from engine.landmark_model import LandmarkModel

N_SHAPE, N_EXP = 20, 10


def _batch(layer: FlameLayer, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """shape, expression (with eyelid weights, if any), joint rotations (axis-angle) and translations of ``count``
    frames whose yaw sweeps the whole contour table."""
    generator = torch.Generator().manual_seed(seed)
    options = {"dtype": layer.v_template.dtype}
    pose = torch.randn(count, layer.n_joints, 3, generator=generator).to(**options) * 0.25
    pose[:, 0, 1] = torch.linspace(-0.9, 0.9, count)
    shape = torch.randn(count, layer.n_shape, generator=generator).to(**options)
    exp = torch.randn(count, layer.n_expression, generator=generator).to(**options)
    transl = torch.randn(count, 3, generator=generator).to(**options) * 0.05
    return shape, exp, pose, transl


@pytest.mark.parametrize("eyelids", [False, True], ids=["FLAME format", "with eyelid blendshapes"])
def test_points_are_the_evaluated_landmarks(tmp_path_factory: pytest.TempPathFactory, eyelids: bool) -> None:
    """Every frame its own contour row (per-frame tables), the identity free or fixed, pose correctives on."""
    from flame_fixtures import write_flame_folder

    folder = write_flame_folder(tmp_path_factory.mktemp("flame"), embeddings=("deca", "mediapipe"), texture=None, eyelids=eyelids)
    layer = FlameLayer(load_flame(folder, n_shape=N_SHAPE, n_exp=N_EXP, n_tex=0), N_SHAPE, N_EXP, dtype=torch.float64)
    model = LandmarkModel(layer)
    assert model.contour is not None and model.static.has_pose_correctives
    shape, exp, pose, transl = _batch(layer, 9, seed=4)
    coeffs, rotations = torch.cat([shape, exp], dim=1), rodrigues(pose)
    points = model.points(coeffs, rotations, transl)
    torch.testing.assert_close(points, model.evaluate(coeffs, rotations, transl, jacobians=False).points, rtol=0, atol=1e-12)
    dense = layer.landmarks(shape, exp, pose, transl)  # summed in another order: equal to a tenth of a micrometre
    torch.testing.assert_close(points, torch.cat([dense.lmk68, dense.mediapipe, dense.eyes], dim=1), rtol=0, atol=1e-7)
    fixed = model.with_fixed_shape(shape[0])
    one_identity = fixed.points(exp, rotations, transl)
    torch.testing.assert_close(one_identity, fixed.evaluate(exp, rotations, transl, jacobians=False).points, rtol=0, atol=1e-12)
    single = fixed.points(exp[:1], rotations[:1], transl[:1])  # one frame: the joined contour + static table
    torch.testing.assert_close(single, one_identity[:1], rtol=0, atol=1e-12)


def test_points_of_the_demo_head_are_its_evaluated_landmarks(landmarker_task: Path) -> None:
    from engine.demo_head import build_demo_head

    head = build_demo_head(landmarker_task)
    layer = FlameLayer(head, head.n_shape, head.n_exp, dtype=torch.float64)
    model = LandmarkModel(layer).with_fixed_shape(torch.randn(head.n_shape, dtype=torch.float64))
    _, exp, pose, transl = _batch(layer, 7, seed=6)
    rotations = rodrigues(pose)
    torch.testing.assert_close(
        model.points(exp, rotations, transl), model.evaluate(exp, rotations, transl, jacobians=False).points, rtol=0, atol=1e-12
    )

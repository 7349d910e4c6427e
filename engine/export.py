"""Posed meshes from per-frame parameter arrays (the reference format), written as .obj or .ply.

``space="model"`` poses FLAME's joints (neck, jaw, eyes) with the head pose at zero, in FLAME's frame;
``space="camera"`` also applies ``cam`` (the reference's world-to-view transform) and returns OpenCV camera
coordinates, so the mesh overlays the input image through ``K``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from engine.atomic import write_bytes_atomic
from engine.camera import FLIP
from engine.errors import UserError
from engine.flame import FlameLayer
from engine.frames import EYELIDS_KEY, model_pose
from engine.head_model import HeadModel
from flame_client.rotations import euler_matrix

PARAMETER_KEYS = ("shape", "exp", "jaw_pose", "neck_pose", "eye_pose", "cam")


def posed_vertices(layer: FlameLayer, arrays: dict[str, np.ndarray], space: str = "model") -> np.ndarray:
    """(V, 3) float64 vertices for one frame's arrays (each with a leading dimension of 1).

    Evaluated in the layer's own dtype and device: per-frame callers pass one layer for every frame. The lids
    close by the frame's ``eyelids`` when both it and the layer have them.
    """
    options = {"dtype": layer.v_template.dtype, "device": layer.v_template.device}
    pose = torch.as_tensor(model_pose(arrays, layer.n_joints)[None], **options)
    eyelids = torch.as_tensor(arrays[EYELIDS_KEY], **options) if EYELIDS_KEY in arrays else None
    exp = layer.expression(torch.as_tensor(arrays["exp"], **options), eyelids)
    with torch.no_grad():
        vertices = layer.vertices(torch.as_tensor(arrays["shape"], **options), exp, pose, torch.zeros(1, 3, **options))[0].cpu().double().numpy()
    if space == "model":
        return vertices
    cam = arrays["cam"][0].astype(np.float64)
    view = vertices @ euler_matrix(*cam[:3]).T + cam[3:]
    return view * np.array(FLIP)


def frame_arrays(path: Path, frame: int | None, model: HeadModel) -> dict[str, np.ndarray]:
    """One frame's parameter arrays from a per-frame .npz or a stacked tracking.npz, checked against the model."""
    arrays = read_parameter_arrays(path)
    frames = arrays["exp"].shape[0]
    index = 0 if frame is None else frame
    if not 0 <= index < frames:
        raise UserError(f"--frame {index} is outside {path}, which holds frames 0..{frames - 1}")
    keys = PARAMETER_KEYS + ((EYELIDS_KEY,) if EYELIDS_KEY in arrays else ())
    picked = {key: np.asarray(arrays[key][index : index + 1], dtype=np.float64) for key in keys}
    check_tracked_with(path, tracked_model_checksum(path, arrays, index), picked["shape"].shape[1], picked["exp"].shape[1], model)
    if not all(np.all(np.isfinite(v)) for v in picked.values()):
        raise UserError(f"{path} frame {index} holds NaN or infinite parameters")
    return picked


def read_parameter_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a per-frame .npz or stacked tracking.npz from track or refine; UserError when unusable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is not a readable parameters .npz ({error})") from None
    missing = [key for key in PARAMETER_KEYS if key not in arrays]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: expected a frame written by 'run_stream.py track'")
    return arrays


def check_tracked_with(path: Path, checksum: str | None, n_shape: int, n_exp: int, model: HeadModel) -> None:
    """Refuse parameters that belong to another model: by the checksum of the model that tracked them, when
    known, and by their numbers of coefficients."""
    if checksum is not None and checksum != model.checksum:
        raise UserError(
            f"{path} was tracked with another model (checksum {checksum}), not the {model.name} "
            f"({model.checksum}): export with the --flame that tracked it"
        )
    for key, count, size in (("shape", n_shape, model.n_shape), ("exp", n_exp, model.n_exp)):
        if count > size:
            raise UserError(
                f"{path} has {count} {key} coefficients but the {model.name} has {size}: "
                "export with the model that tracked it (--flame)"
            )


def tracked_model_checksum(path: Path, arrays: dict[str, np.ndarray], index: int) -> str | None:
    """The checksum of the model a frame was tracked with: its own ``model_checksum``, else the ``meta.json``
    beside it (results written before frames carried it); None when neither says."""
    if "model_checksum" in arrays:
        return str(arrays["model_checksum"][index])
    try:
        return str(json.loads((path.parent / "meta.json").read_text())["model"]["checksum"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_mesh(path: Path, vertices: np.ndarray, faces: np.ndarray) -> None:
    """Write .obj or .ply (ASCII) by the file's extension."""
    suffix = path.suffix.lower()
    if suffix == ".obj":
        lines = [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in vertices]
        lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces]
    elif suffix == ".ply":
        header = [
            "ply", "format ascii 1.0", f"element vertex {len(vertices)}", "property float x", "property float y",
            "property float z", f"element face {len(faces)}", "property list uchar int vertex_indices", "end_header",
        ]  # fmt: skip
        lines = header + [f"{x:.6f} {y:.6f} {z:.6f}" for x, y, z in vertices] + [f"3 {a} {b} {c}" for a, b, c in faces]
    else:
        raise UserError(f"--out {path}: the mesh format is chosen by the extension, .obj or .ply")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, ("\n".join(lines) + "\n").encode("utf-8"))

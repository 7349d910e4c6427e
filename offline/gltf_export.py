"""``run_stream.py export --gltf OUT.glb``: the rig of a tracked identity and its animation, from what
``track``, ``refine`` or ``live --record`` wrote (the file layout is ``engine.gltf``'s).

``--params`` accepts
- a folder written by ``track`` or ``refine`` (``tracking.npz``, ``meta.json``; ``texture.png`` from
  ``refine`` becomes the base colour): frame ``i`` is keyed at ``i / fps``;
- a session folder written by ``live --record``: the identity is its last ``flame.shape``, frames are keyed at
  their capture times;
- one frame's ``.npz`` from ``track`` (or a stacked ``tracking.npz``);
and without ``--params`` the rig has the model's mean shape and no animation.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.atomic import write_bytes_atomic
from engine.errors import UserError
from engine.export import PARAMETER_KEYS, check_tracked_with, euler_matrix, read_parameter_arrays, tracked_model_checksum
from engine.frames import EYELIDS_KEY
from engine.gltf import CameraView, RigAnimation, build_glb, skeleton_of
from engine.head_model import HeadModel
from engine.tracker import TrackerConfig
from flame_client.messages import TOPIC_SHAPE
from flame_client.rig import gltf_head_pose
from flame_client.rotations import matrix_from_axis_angle
from realtime.session import SESSION_FILE, SessionReader

log = logging.getLogger(__name__)

TEXTURE_FILE = "texture.png"
_DEFAULT_FPS = 25.0


@dataclass(frozen=True)
class RigSource:
    """What a rig is made of: an identity, how many expressions it animates, and optionally a sequence."""

    shape: np.ndarray
    n_exp: int
    animation: RigAnimation | None = None
    camera: CameraView | None = None
    texture: Path | None = None


def export_gltf(out: Path, head: HeadModel, params: Path | None) -> str:
    """Write the rig (and animation) to ``out``; returns a one-line summary for the user."""
    if out.suffix.lower() != ".glb":
        raise UserError(f"--gltf {out}: the rig is written as binary glTF; give a file name ending in .glb")
    source = load_rig_source(params, head)
    texture = None
    if source.texture is not None:
        if head.uv_coords is None:
            log.warning("%s has no UV map: %s is not used", head.name, source.texture)
        else:
            texture = source.texture.read_bytes()
    data = build_glb(head, source.shape, source.n_exp, source.animation, texture, source.camera)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out, data)
    frames = 0 if source.animation is None else source.animation.times.size
    parts = [f"{head.n_vertices} vertices of the {head.name}", f"{source.n_exp} expression + 36 pose-corrective targets"]
    if frames:
        parts.append(f"{frames} frames over {source.animation.times[-1]:.2f} s")
    if texture is not None:
        parts.append(f"texture {source.texture.name}")
    return f"wrote {out}: " + ", ".join(parts)


def load_rig_source(params: Path | None, head: HeadModel) -> RigSource:
    """The identity and sequence that ``--params`` names (see the module docstring); UserError when unusable."""
    if params is None:
        return RigSource(shape=np.zeros(0), n_exp=min(TrackerConfig().n_exp, head.n_exp))
    if not params.exists():
        raise UserError(f"--params {params} does not exist: give a folder from track, refine or live --record, or a frame .npz")
    if params.is_dir() and (params / SESSION_FILE).is_file():
        return _from_session(params, head)
    if params.is_dir():
        stacked = params / "tracking.npz"
        if not stacked.is_file():
            raise UserError(f"--params {params} holds neither tracking.npz (track, refine) nor {SESSION_FILE} (live --record)")
        return _from_tracking(stacked, head)
    return _from_tracking(params, head)


# ---------------------------------------------------------------------------------------------------------------
# track / refine output


def _from_tracking(path: Path, head: HeadModel) -> RigSource:
    stored = read_parameter_arrays(path)
    wanted = (*PARAMETER_KEYS, EYELIDS_KEY, "head_pose", "valid", "fov", "K")
    arrays = {key: np.asarray(value, dtype=np.float64) for key, value in stored.items() if key in wanted}
    frames = arrays["exp"].shape[0]
    if frames == 0:
        raise UserError(f"{path} holds no frames: track a video or landmarks file with at least one face")
    checksum = tracked_model_checksum(path, stored, frames - 1)
    check_tracked_with(path, checksum, arrays["shape"].shape[1], arrays["exp"].shape[1], head)
    meta = _read_meta(path.parent / "meta.json")
    # A frame without a face, or with non-finite values, holds the last tracked pose.
    valid = arrays["valid"].astype(bool).reshape(frames) if "valid" in arrays else np.ones(frames, bool)
    valid &= np.all([np.isfinite(arrays[key].reshape(frames, -1)).all(axis=1) for key in PARAMETER_KEYS], axis=0)
    if not valid.any():
        raise UserError(f"{path}: no frame has a tracked face, so there is no identity or pose to export")
    exp = np.where(valid[:, None], arrays["exp"], 0.0)
    shape = arrays["shape"][np.flatnonzero(valid)[-1]]
    skeleton = skeleton_of(head, shape, exp.shape[1])
    rotations = np.repeat(np.eye(3)[None], frames, axis=0)
    translations = np.zeros((frames, 3))
    for frame in range(frames):
        if not valid[frame]:
            continue
        # track keeps FLAME's root at zero and moves the camera (an OpenGL view: already glTF world).
        view, shift = euler_matrix(*arrays["cam"][frame, :3]), arrays["cam"][frame, 3:]
        root = matrix_from_axis_angle(arrays["head_pose"][frame]) if "head_pose" in arrays else np.eye(3)
        pivot = skeleton.joints(exp[frame])[0]
        rotations[frame] = view @ root
        translations[frame] = view @ (pivot - root @ pivot) + shift
    fps = float(meta.get("fps") or _DEFAULT_FPS)
    animation = RigAnimation(
        times=np.arange(frames) / fps, exp=exp,
        joint_poses=np.stack([arrays["neck_pose"], arrays["jaw_pose"], *np.split(arrays["eye_pose"], 2, axis=1)], axis=1),
        head_rotation=rotations, head_translation=translations, valid=valid,
        eyelids=np.where(valid[:, None], arrays[EYELIDS_KEY], 0.0) if EYELIDS_KEY in arrays else None,
    )  # fmt: skip
    camera = None
    if "fov" in arrays:
        size = meta.get("image_size") or {}
        aspect = size["width"] / size["height"] if size.get("height") else None
        if aspect is None and "K" in arrays:
            aspect = float(arrays["K"][-1, 0, 2] / arrays["K"][-1, 1, 2])
        camera = CameraView(float(arrays["fov"].reshape(-1)[-1]), aspect)
    texture = path.parent / TEXTURE_FILE
    return RigSource(shape, exp.shape[1], animation, camera, texture if texture.is_file() else None)


def _read_meta(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is damaged ({error}); track again or remove it") from None
    return meta if isinstance(meta, dict) else {}


# ---------------------------------------------------------------------------------------------------------------
# live --record sessions


def _from_session(folder: Path, head: HeadModel) -> RigSource:
    reader = SessionReader(folder)
    frames: list[dict] = []
    times: list[float] = []
    shape_message: dict | None = None
    for record in reader.tracking_messages():
        message = record.message
        if record.topic == TOPIC_SHAPE:
            shape_message = message
        # Keyed at capture times, which must increase: a repeated time (never expected) keeps the first frame.
        elif not times or message["t_capture"] > times[-1]:
            frames.append(message)
            times.append(message["t_capture"])
    if not frames:
        raise UserError(f"{folder} holds no tracked frames: record with 'live --record DIR' while a face is in view")
    if shape_message is None:
        raise UserError(f"{folder} has no identity yet (no flame.shape message): record until calibration has finished")
    shape = np.asarray(shape_message["shape"])
    n_exp = max(len(frame["exp"]) for frame in frames)
    check_tracked_with(folder, shape_message["model_checksum"], shape.size, n_exp, head)
    exp = np.stack([np.pad(frame["exp"], (0, n_exp - len(frame["exp"]))) for frame in frames])
    poses = [gltf_head_pose(frame["head_rot"], frame["head_trans"]) for frame in frames]
    animation = RigAnimation(
        times=np.asarray(times) - times[0], exp=exp,
        joint_poses=np.stack([[frame["neck_pose"], frame["jaw_pose"], frame["eye_pose"][:3], frame["eye_pose"][3:]] for frame in frames]),
        head_rotation=np.stack([rotation for rotation, _ in poses]), head_translation=np.stack([shift for _, shift in poses]),
        valid=np.array([frame["valid"] for frame in frames]),
        eyelids=_session_eyelids(frames),
    )  # fmt: skip
    size = frames[-1].get("image_size") or reader.frame_size
    camera = CameraView(frames[-1]["fov_deg"], size[0] / size[1] if size else None)
    texture = folder / TEXTURE_FILE
    return RigSource(shape, n_exp, animation, camera, texture if texture.is_file() else None)


def _session_eyelids(frames: list[dict]) -> np.ndarray | None:
    """(T, 2) the frames' eyelid weights (open where a frame has none); None when no frame has them."""
    if not any(EYELIDS_KEY in frame for frame in frames):
        return None
    return np.stack([frame.get(EYELIDS_KEY) or (0.0, 0.0) for frame in frames])

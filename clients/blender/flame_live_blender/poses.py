"""One frame of head motion in the form the rig needs, from the live stream or from tracking files (numpy only).

A :class:`FramePose` places FLAME model space in glTF world (``x_gltf = R_h x_model + t_h``, the mapping of
``flame_client.rig``: glTF world is OpenCV camera space turned by ``diag(1, -1, -1)``) and holds FLAME's four
non-root joint rotations (neck, jaw, left eye, right eye; axis-angle), the expression coefficients and, from a
model with eyelid blendshapes, the two eyelid weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .rig_maths import rig, rotations
from .stream import StreamFrame


@dataclass(frozen=True)
class FramePose:
    head_rotation: np.ndarray  # (3, 3) model space to glTF world
    head_translation: np.ndarray  # (3,) metres, glTF world
    joint_poses: np.ndarray  # (4, 3) axis-angle of neck, jaw, left eye, right eye, each relative to its parent
    exp: np.ndarray  # (N,)
    eyelids: np.ndarray | None = None  # (2,) left, right (0 open, 1 closed); None: tracked without eyelids


def _joint_poses(neck: np.ndarray, jaw: np.ndarray, eyes: np.ndarray) -> np.ndarray:
    eyes = np.asarray(eyes, dtype=np.float64).reshape(2, 3)
    return np.stack([np.reshape(neck, 3), np.reshape(jaw, 3), eyes[0], eyes[1]]).astype(np.float64)


def _eyelids(eyelids: np.ndarray | None) -> np.ndarray | None:
    return None if eyelids is None else np.asarray(eyelids, np.float64).reshape(2)


def pose_from_axis_angles(
    head_rot: np.ndarray, head_trans: np.ndarray, neck: np.ndarray, jaw: np.ndarray, eyes: np.ndarray, exp: np.ndarray,
    eyelids: np.ndarray | None = None,
) -> FramePose:
    """The wire schema's form: head pose in OpenCV camera space, joint axis-angles, eyes left then right."""
    rotation, translation = rig.gltf_head_pose(head_rot, head_trans)
    exp = np.asarray(exp, np.float64).reshape(-1)
    return FramePose(rotation, translation, _joint_poses(neck, jaw, eyes), exp, _eyelids(eyelids))


def pose_from_stream(frame: StreamFrame) -> FramePose:
    return pose_from_axis_angles(
        frame.head_rot, frame.head_trans, frame.neck_pose, frame.jaw_pose, frame.eye_pose, frame.exp, frame.eyelids
    )


def pose_from_tracking(
    cam: np.ndarray, neck: np.ndarray, jaw: np.ndarray, eyes: np.ndarray, exp: np.ndarray,
    eyelids: np.ndarray | None = None,
) -> FramePose:
    """One frame of ``track`` output, whose ``cam`` (an OpenGL view of the model) is already glTF world."""
    cam = np.asarray(cam, dtype=np.float64).reshape(6)
    return FramePose(
        rotations.euler_matrix(*cam[:3]),
        cam[3:].copy(),
        _joint_poses(neck, jaw, eyes),
        np.asarray(exp, np.float64).reshape(-1),
        _eyelids(eyelids),
    )

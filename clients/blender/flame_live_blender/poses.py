"""One frame of head motion in the form the rig needs, from the live stream or from tracking files (numpy only).

A :class:`FramePose` holds the head's placement in OpenCV camera space (``x_cam = R x_model + t``), FLAME's
four non-root joint rotations (neck, jaw, left eye, right eye) as matrices, and the expression coefficients.
The tracking files keep the reference tool's convention (``cam`` = yaw, pitch, roll, x, y, z: the world-to-view
transform of an OpenGL-style view, head pose zero) and are converted here, as the README describes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .stream import StreamFrame

#: OpenGL view (y up, looking down -z) to OpenCV camera (y down, z forward).
GL_TO_CV = np.diag([1.0, -1.0, -1.0])
#: FLAME's non-root joints, in the order of its pose feature (and of the rig's pose_000... shape keys).
POSED_JOINTS = ("neck", "jaw", "left_eye", "right_eye")


@dataclass(frozen=True)
class FramePose:
    head_rotation: np.ndarray  # (3, 3) model to OpenCV camera
    head_translation: np.ndarray  # (3,) metres
    joint_rotations: np.ndarray  # (4, 3, 3) neck, jaw, left eye, right eye, each relative to its parent
    exp: np.ndarray  # (N,)


def rotation_matrix(axis_angle: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) of axis-angle vectors (..., 3), Rodrigues' formula."""
    vectors = np.asarray(axis_angle, dtype=np.float64)
    angle = np.linalg.norm(vectors, axis=-1, keepdims=True)
    axis = vectors / np.maximum(angle, 1e-12)
    x, y, z = axis[..., 0], axis[..., 1], axis[..., 2]
    zero = np.zeros_like(x)
    cross = np.stack([zero, -z, y, z, zero, -x, -y, x, zero], axis=-1).reshape(vectors.shape[:-1] + (3, 3))
    sin, cos = np.sin(angle)[..., None], np.cos(angle)[..., None]
    return np.eye(3) + sin * cross + (1.0 - cos) * (cross @ cross)


def euler_matrix(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """The tracking files' rotation ``R = Rz(roll) Ry(yaw) Rx(pitch)``, radians."""
    cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    rz = np.array([[cr, -sr, 0.0], [sr, cr, 0.0], [0.0, 0.0, 1.0]])
    ry = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cp, -sp], [0.0, sp, cp]])
    return rz @ ry @ rx


def pose_corrective_weights(joint_rotations: np.ndarray) -> np.ndarray:
    """FLAME's pose feature: the 36 weights of the pose_000... shape keys, (R_j - I) of neck, jaw and eyes."""
    return (np.asarray(joint_rotations, dtype=np.float64) - np.eye(3)).reshape(-1)


def pose_from_axis_angles(
    head_rot: np.ndarray, head_trans: np.ndarray, neck: np.ndarray, jaw: np.ndarray, eyes: np.ndarray, exp: np.ndarray
) -> FramePose:
    """The wire schema's form: axis-angle head rotation (camera space) and joint rotations, eyes left then right."""
    eyes = np.asarray(eyes, dtype=np.float64).reshape(6)
    joints = np.stack([np.reshape(neck, 3), np.reshape(jaw, 3), eyes[:3], eyes[3:]]).astype(np.float64)
    return FramePose(
        rotation_matrix(head_rot), np.asarray(head_trans, np.float64).reshape(3), rotation_matrix(joints),
        np.asarray(exp, np.float64).reshape(-1),
    )  # fmt: skip


def pose_from_stream(frame: StreamFrame) -> FramePose:
    return pose_from_axis_angles(frame.head_rot, frame.head_trans, frame.neck_pose, frame.jaw_pose, frame.eye_pose, frame.exp)


def pose_from_tracking(cam: np.ndarray, neck: np.ndarray, jaw: np.ndarray, eyes: np.ndarray, exp: np.ndarray) -> FramePose:
    """One frame of ``track`` output: x_cam = diag(1,-1,-1) (R(cam) x_model + t(cam))."""
    cam = np.asarray(cam, dtype=np.float64).reshape(6)
    eyes = np.asarray(eyes, dtype=np.float64).reshape(6)
    joints = np.stack([np.reshape(neck, 3), np.reshape(jaw, 3), eyes[:3], eyes[3:]]).astype(np.float64)
    return FramePose(
        GL_TO_CV @ euler_matrix(*cam[:3]), GL_TO_CV @ cam[3:], rotation_matrix(joints), np.asarray(exp, np.float64).reshape(-1)
    )

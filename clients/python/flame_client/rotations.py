"""Small rotation helpers (numpy only, so clients can use them): axis-angle, matrices, quaternions, frontal head pose.

Quaternions are arrays ``(x, y, z, w)``, the component order of Unity, VMC and scipy. Rotations act on column
vectors: ``v' = R v``.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

#: The rotation that makes a FLAME head (y up, z toward the viewer) face an OpenCV camera (y down, z forward)
#: upright: 180 degrees about x. A head that looks straight into the camera has ``head_rot`` equal to it.
FRONTAL_QUATERNION = np.array([1.0, 0.0, 0.0, 0.0])


def quaternion_from_axis_angle(rotation_vector: np.ndarray) -> np.ndarray:
    """Unit quaternion (x, y, z, w) of the rotation ``angle * axis`` given as a 3-vector in radians."""
    vector = np.asarray(rotation_vector, dtype=np.float64).reshape(3)
    angle = math.sqrt(float(vector @ vector))
    if angle < 1e-12:
        return np.array([0.0, 0.0, 0.0, 1.0])
    half = 0.5 * angle
    return np.append(vector * (math.sin(half) / angle), math.cos(half))


def axis_angle_from_quaternion(quaternion: np.ndarray) -> np.ndarray:
    """Rotation vector (axis times angle in [0, pi]) of a unit quaternion (x, y, z, w)."""
    q = canonical_quaternion(quaternion)
    sin_half = math.sqrt(float(q[:3] @ q[:3]))
    if sin_half < 1e-12:
        return np.zeros(3)
    # atan2 stays accurate near 0 and near pi, where acos(w) or asin(|v|) lose precision.
    angle = 2.0 * math.atan2(sin_half, q[3])
    return q[:3] * (angle / sin_half)


def matrix_from_axis_angle(rotation_vector: np.ndarray) -> np.ndarray:
    """3x3 rotation matrix of the rotation ``angle * axis`` (Rodrigues' formula); exact identity at zero."""
    vector = np.asarray(rotation_vector, dtype=np.float64).reshape(3)
    angle = math.sqrt(float(vector @ vector))
    if angle < 1e-12:
        return np.eye(3)
    x, y, z = vector / angle
    skew = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    return np.eye(3) + math.sin(angle) * skew + (1.0 - math.cos(angle)) * (skew @ skew)


def euler_matrix(yaw: ArrayLike, pitch: ArrayLike, roll: ArrayLike) -> np.ndarray:
    """The tracking files' rotation ``R = Rz(roll) @ Ry(yaw) @ Rx(pitch)`` (``cam[:3]``), radians: (3, 3) for
    three angles, (T, 3, 3) for three arrays of T angles (a whole track's ``cam[:, :3].T``); float64, from the
    sines and cosines in the angles' dtype."""
    yaw, pitch, roll = np.broadcast_arrays(yaw, pitch, roll)
    cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    zero, one = np.zeros(np.shape(cy)), np.ones(np.shape(cy))

    def matrices(*entries: np.ndarray) -> np.ndarray:
        return np.stack(entries, axis=-1).reshape(*np.shape(cy), 3, 3)

    rz = matrices(cr, -sr, zero, sr, cr, zero, zero, zero, one)
    ry = matrices(cy, zero, sy, zero, one, zero, -sy, zero, cy)
    rx = matrices(one, zero, zero, zero, cp, -sp, zero, sp, cp)
    return rz @ ry @ rx


def quaternion_from_matrix(rotation: np.ndarray) -> np.ndarray:
    """Unit quaternion (x, y, z, w), with ``w >= 0``, of a 3x3 rotation matrix."""
    m = np.asarray(rotation, dtype=np.float64).reshape(3, 3)
    trace = float(np.trace(m))
    # Shepperd's method: divide by the largest of the four candidate terms, never by a small one.
    if trace > max(m[0, 0], m[1, 1], m[2, 2]):
        s = 2.0 * math.sqrt(1.0 + trace)
        q = [(m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, 0.25 * s]
    elif m[0, 0] >= m[1, 1] and m[0, 0] >= m[2, 2]:
        s = 2.0 * math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s, (m[2, 1] - m[1, 2]) / s]
    elif m[1, 1] >= m[2, 2]:
        s = 2.0 * math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s, (m[0, 2] - m[2, 0]) / s]
    else:
        s = 2.0 * math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s, (m[1, 0] - m[0, 1]) / s]
    return canonical_quaternion(np.array(q))


def quaternion_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product ``a * b``: the rotation ``b`` followed by ``a``."""
    ax, ay, az, aw = a
    bx, by, bz, bw = b
    return np.array(
        [
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
            aw * bw - ax * bx - ay * by - az * bz,
        ]
    )


def quaternion_conjugate(q: np.ndarray) -> np.ndarray:
    """The inverse rotation of a unit quaternion."""
    return np.array([-q[0], -q[1], -q[2], q[3]])


def quaternion_power(q: np.ndarray, fraction: float) -> np.ndarray:
    """The same axis turned by ``fraction`` of the angle (``q ** fraction``), along the shorter way round."""
    return quaternion_from_axis_angle(axis_angle_from_quaternion(q) * fraction)


def canonical_quaternion(q: np.ndarray) -> np.ndarray:
    """``q`` or ``-q`` (the same rotation), whichever has ``w >= 0``, normalised: stable output for receivers."""
    q = np.asarray(q, dtype=np.float64).reshape(4)
    q = q / math.sqrt(float(q @ q))
    return -q if q[3] < 0 else q


def rotate_vector(q: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """Apply the rotation ``q`` to a 3-vector."""
    v_quaternion = np.append(np.asarray(vector, dtype=np.float64), 0.0)
    return quaternion_multiply(quaternion_multiply(q, v_quaternion), quaternion_conjugate(q))[:3]


def head_quaternion_from_frontal(head_rot: np.ndarray) -> np.ndarray:
    """The head's rotation away from looking straight into the camera, in FLAME axes, as a quaternion.

    ``head_rot`` maps FLAME model coordinates to camera coordinates (``x_cam = R x_model + t``). Writing
    ``R = R_frontal R_head`` gives ``R_head = R_frontal^T R``: identity when facing the camera, and in the
    head's own axes x (its left), y (up), z (forward, out of the face): +y turns the face to its left, +x
    tilts it down (chin toward the chest), +z rolls the top of the head toward its right shoulder.
    """
    return canonical_quaternion(
        quaternion_multiply(quaternion_conjugate(FRONTAL_QUATERNION), quaternion_from_axis_angle(head_rot))
    )


def head_rotation_from_frontal(head_rot: np.ndarray) -> np.ndarray:
    """:func:`head_quaternion_from_frontal` as a rotation vector (radians), small and continuous near frontal."""
    return axis_angle_from_quaternion(head_quaternion_from_frontal(head_rot))

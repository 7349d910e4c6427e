"""Small rotation helpers (numpy only, so clients can use them): axis-angle, quaternions, frontal head pose.

Quaternions are arrays ``(x, y, z, w)``, the component order of Unity, VMC and scipy. Rotations act on column
vectors: ``v' = R v``.
"""

from __future__ import annotations

import math

import numpy as np

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

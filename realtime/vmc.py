"""What our fit means to a VMC avatar: Perfect Sync blendshape names and the head rotation in Unity's axes.

VMC (protocol.vmc.info) carries a Unity humanoid's pose: ``/VMC/Ext/Bone/Pos`` gives a bone's local position
and rotation, as Unity values (left-handed: x right, y up, z forward; quaternion x, y, z, w). A VRM avatar in
Unity faces +z, so its own left is -x.

Rotation mapping, reasoned once here and checked by tests with known rotations:

1. ``head_rot`` places the FLAME head in OpenCV camera space. Its rotation away from facing the camera,
   ``R_head = R_frontal^T R(head_rot)`` (``rotations.head_quaternion_from_frontal``), is expressed in the head's
   own FLAME axes: x = the person's left, y = up, z = forward (out of the face); right-handed.
2. A puppet avatar (not mirrored) copies the person: the person's left is the avatar's left (-x in Unity), up is
   up (+y), forward is forward (+z). That change of basis is S = diag(-1, 1, 1), a reflection (it also turns
   right-handed into left-handed), and the rotation in Unity's coordinates is S R_head S. For a quaternion
   this negates y and z: (x, y, z, w) -> (x, -y, -z, w).
3. A mirrored avatar behaves like the person's reflection, the usual VTuber convention (VMagicMirror, for one,
   flips tracking horizontally unless told not to): it faces the user, and when the user turns to their left
   it turns to its own right, which on screen is the user's left side. Mirroring is a second reflection
   M = diag(-1, 1, 1) in FLAME axes, so the Unity rotation is S M R_head M S = R_head: the quaternion components
   pass through unchanged.
   Mirroring also swaps every Left/Right blendshape (the person's left eye blinks the avatar's right eye).

Example: a 30 degree yaw to the person's left is +30 degrees about FLAME's y. Mirrored, Unity gets +30 degrees
about y, which turns the avatar's face (+z) toward +x, its own right; not mirrored, -30 degrees about y turns
it toward -x, its own left.

FLAME's chain is root (the head's rotation above) then neck; the avatar's is Neck then Head. The head's
rotation is shared between the two bones (``neck_share`` of it at the Neck, the rest plus FLAME's neck joint at
the Head), so the Head bone ends with exactly the fitted orientation while the neck bends naturally.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flame_client.messages import BLENDSHAPE_NAMES
from flame_client.rotations import (
    canonical_quaternion,
    head_quaternion_from_frontal,
    quaternion_from_axis_angle,
    quaternion_multiply,
    quaternion_power,
)

#: ARKit's 52 blendshape locations (lowerCamelCase): MediaPipe's 51 plus tongueOut, which MediaPipe lacks.
ARKIT_BLENDSHAPE_NAMES: tuple[str, ...] = tuple(name for name in BLENDSHAPE_NAMES if name != "_neutral") + (
    "tongueOut",
)
#: Perfect Sync BlendShapeClip names: the ARKit names in UpperCamelCase ("EyeBlinkLeft", "JawOpen").
PERFECT_SYNC_NAMES: tuple[str, ...] = tuple(name[0].upper() + name[1:] for name in ARKIT_BLENDSHAPE_NAMES)

_NO_SOURCE = -1


def _swap_sides(name: str) -> str:
    if name.endswith("Left"):
        return name[: -len("Left")] + "Right"
    if name.endswith("Right"):
        return name[: -len("Right")] + "Left"
    return name


class PerfectSyncMapping:
    """Turns MediaPipe's 52 scores (our ``blendshapes``) into values for the 52 Perfect Sync clips."""

    def __init__(self, mirror: bool) -> None:
        source_index = {name: index for index, name in enumerate(BLENDSHAPE_NAMES)}
        self.names = PERFECT_SYNC_NAMES
        self._sources = [
            source_index.get(_swap_sides(name) if mirror else name, _NO_SOURCE) for name in ARKIT_BLENDSHAPE_NAMES
        ]

    def values(self, blendshapes: Sequence[float]) -> list[float]:
        """One value in [0, 1] per name in :attr:`names`; 0 for clips MediaPipe does not estimate."""
        return [0.0 if index == _NO_SOURCE else min(1.0, max(0.0, blendshapes[index])) for index in self._sources]


def unity_quaternion(flame_quaternion: np.ndarray, mirror: bool) -> np.ndarray:
    """A rotation in FLAME head axes as a Unity avatar's local rotation (x, y, z, w); see the module notes."""
    x, y, z, w = flame_quaternion
    return canonical_quaternion(np.array([x, y, z, w] if mirror else [x, -y, -z, w]))


def unity_neck_and_head(
    head_rot: Sequence[float], neck_pose: Sequence[float], mirror: bool, neck_share: float
) -> tuple[np.ndarray, np.ndarray]:
    """Local rotations (Unity quaternions) for the avatar's Neck and Head bones from one frame's fit."""
    head = head_quaternion_from_frontal(np.asarray(head_rot, dtype=np.float64))
    at_neck = quaternion_power(head, neck_share)
    at_head = quaternion_multiply(
        quaternion_power(head, 1.0 - neck_share), quaternion_from_axis_angle(np.asarray(neck_pose, dtype=np.float64))
    )
    return unity_quaternion(at_neck, mirror), unity_quaternion(at_head, mirror)

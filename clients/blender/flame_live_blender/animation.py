"""Keying motion onto the rig: timed frame poses become two actions (shape keys; bone locations and rotations).

Used by both Record (the live stream) and Import tracking (files); which pose lands on which scene frame is
``recordings.poses_on_frames``. The F-curves are filled in bulk (``keyframe_points.add`` and
``foreach_set``) rather than key by key: a minute of 25 fps motion is ~200,000 keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import bpy
import numpy as np
from mathutils import Matrix

from .poses import FramePose
from .recordings import poses_on_frames
from .rig import FlameRig
from .rig_maths import rig


@dataclass(frozen=True)
class KeyedMotion:
    keyed_frames: int
    held_frames: int  # frames without a face that hold the previous pose
    first_frame: int
    last_frame: int


def key_motion(
    flame_rig: FlameRig,
    times: Sequence[float],
    poses: Sequence[FramePose | None],
    start_frame: int,
    fps: float,
    name: str,
) -> KeyedMotion:
    """Key the samples ``(times[i] seconds, poses[i])`` into new actions named after `name`; returns what was keyed."""
    by_frame, held = poses_on_frames(times, poses, start_frame, fps)
    if not by_frame:
        return KeyedMotion(0, 0, start_frame, start_frame)
    frames = sorted(by_frame)
    flame_rig.prepare()
    weights = np.empty((len(frames), len(flame_rig.key_names)))
    bones = {name: np.empty((len(frames), 7)) for name in rig.JOINT_NAMES}
    for row, frame in enumerate(frames):
        rig_frame = flame_rig.frame(by_frame[frame])
        weights[row] = rig_frame.weights
        for bone, basis in rig_frame.bone_bases.items():
            location, rotation, _ = Matrix(basis.tolist()).decompose()
            bones[bone][row] = (*location, *rotation)  # rotation as w, x, y, z: Blender's order
    for values in bones.values():
        _make_quaternions_continuous(values[:, 3:])
    shape_keys = flame_rig.mesh.data.shape_keys
    shape_curves = _new_action_curves(shape_keys, f"{name} shape keys")
    for column, key in enumerate(flame_rig.key_names):
        _fill(shape_curves.new(f'key_blocks["{key}"].value'), frames, weights[:, column])
    bone_curves = _new_action_curves(flame_rig.armature, f"{name} bones")
    for bone, values in bones.items():
        for index in range(3):
            _fill(bone_curves.new(f'pose.bones["{bone}"].location', index=index), frames, values[:, index])
        for index in range(4):
            _fill(
                bone_curves.new(f'pose.bones["{bone}"].rotation_quaternion', index=index), frames, values[:, 3 + index]
            )
    return KeyedMotion(len(frames), held, frames[0], frames[-1])


def _make_quaternions_continuous(quaternions: np.ndarray) -> None:
    """q and -q are one rotation; pick signs so that consecutive keys interpolate the short way."""
    for row in range(1, len(quaternions)):
        if quaternions[row] @ quaternions[row - 1] < 0:
            quaternions[row] *= -1


def _new_action_curves(animated: bpy.types.ID, name: str) -> bpy.types.ActionFCurves:
    """The F-curve collection of a new action assigned to `animated` (Blender 4.2 to 4.5, and 5.x's slots)."""
    action = bpy.data.actions.new(name)
    animation = animated.animation_data_create()
    animation.action = action
    if hasattr(action, "fcurves"):  # Blender before 5.0: an action owns its F-curves
        return action.fcurves
    from bpy_extras import anim_utils

    slot = animation.action_slot or action.slots.new(id_type=animated.id_type, name=animated.name)
    animation.action_slot = slot
    return anim_utils.action_ensure_channelbag_for_slot(action, slot).fcurves


def _fill(curve: bpy.types.FCurve, frames: list[int], values: np.ndarray) -> None:
    curve.keyframe_points.add(len(frames))
    points = np.empty((len(frames), 2), dtype=np.float32)
    points[:, 0] = frames
    points[:, 1] = values
    curve.keyframe_points.foreach_set("co", points.reshape(-1))
    curve.update()  # sorts the keys and computes their Bezier handles

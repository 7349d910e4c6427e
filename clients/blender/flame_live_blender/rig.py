"""The FLAME head rig as Blender's glTF importer builds it, and how one frame poses it.

``run_stream.py export --gltf`` writes a skinned mesh ``flame_head`` with shape keys ``exp_000``...,
``pose_000``...``pose_035`` (and ``eyelid_left``, ``eyelid_right`` from a model with eyelids) and joints ``root``, ``neck``, ``jaw``, ``left_eye``, ``right_eye``
(``flame_client.rig`` documents it). Blender's importer turns glTF's Y-up world into its Z-up world, makes the
joints bones of an armature (turning each bone to point at its child) and keeps ``mesh.extras`` as custom
properties of the mesh data, where the skeleton's rest joints and expression basis live.

Posing: ``flame_client.rig.joint_transforms`` gives each joint's local glTF transform for a frame, so glTF's
skinning matrix of joint k is ``F_k = W_k W_k_rest^-1`` (world transforms now and at rest, ``W_k_rest`` the
translation to the rest joint). In armature space that is ``D_k = G F_k G^-1`` with ``G`` = (armature's world
matrix)^-1 times the importer's axis change, and Blender deforms with ``pose_matrix_k bone_rest_k^-1``.
Blender builds the pose matrix as ``pose_parent (rest_parent^-1 rest_k) basis_k``, hence
``basis_k = rest_k^-1 D_parent^-1 D_k rest_k``: exact whatever orientation the importer gave the bones.
"""

from __future__ import annotations

from dataclasses import dataclass

import bpy
import numpy as np
from mathutils import Matrix, Quaternion

from .poses import FramePose
from .rig_maths import rig

#: glTF (Y up) to Blender (Z up), as Blender's glTF importer converts: (x, y, z) -> (x, -z, y).
BLENDER_FROM_GLTF = np.array([[1.0, 0, 0, 0], [0, 0, -1.0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1.0]])
#: Blender clamps shape key values to the slider range, at most [-10, 10]; FLAME's weights are signed.
SLIDER_LIMIT = 10.0
FIRST_EXPRESSION_KEY = rig.expression_target_names(1)[0]


class RigError(Exception):
    """No usable FLAME rig; the message is one line for a Blender report."""


def _matrix(array: np.ndarray) -> Matrix:
    return Matrix(np.asarray(array, dtype=np.float64).tolist())


def _translation(vector: np.ndarray) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = vector
    return matrix


@dataclass
class RigFrame:
    """What one frame sets on the rig: shape key values in key order and each bone's basis matrix."""

    weights: np.ndarray  # (n_exp + 36,) in the order of FlameRig.key_names
    bone_bases: dict[str, np.ndarray]  # bone name -> 4x4 basis matrix


class FlameRig:
    """An imported FLAME head: its armature object, its mesh object and the skeleton stored in the mesh."""

    def __init__(self, armature: bpy.types.Object, mesh: bpy.types.Object) -> None:
        self.armature = armature
        self.mesh = mesh
        try:
            self.skeleton = rig.Skeleton.from_extras(mesh.data)
        except ValueError as error:
            raise RigError(f"{mesh.name}: {error}") from None
        keys = mesh.data.shape_keys.key_blocks
        self.n_exp = sum(1 for name in rig.expression_target_names(len(keys)) if name in keys)
        #: The rig has the eyelid targets (exported from a model with eyelid blendshapes).
        self.has_eyelids = all(name in keys for name in rig.EYELID_TARGET_NAMES)
        self.key_names = rig.target_names(self.n_exp, self.has_eyelids)
        missing = [name for name in self.key_names if name not in keys]
        missing += [name for name in rig.JOINT_NAMES if name not in armature.data.bones]
        if missing:
            raise RigError(
                f"{mesh.name} lacks {', '.join(missing[:3])}: import the .glb from 'run_stream.py export --gltf' again"
            )

    @classmethod
    def from_objects(cls, objects: list[bpy.types.Object]) -> FlameRig:
        """The rig one of `objects` belongs to (its mesh, its armature, or a parent of both)."""
        for obj in objects:
            for candidate in (obj, *obj.children_recursive):
                mesh = _flame_mesh(candidate)
                if mesh is not None:
                    return cls(_armature_of(mesh), mesh)
            parent = obj.parent
            while parent is not None:
                if parent.type == "ARMATURE":
                    return cls.from_objects([parent])
                parent = parent.parent
        raise RigError(
            "select the FLAME head rig (import the .glb written by 'run_stream.py export --gltf' "
            "with File > Import > glTF 2.0)"
        )

    def prepare(self) -> None:
        """Shape keys may go negative and beyond 1; bones take quaternions and locations."""
        keys = self.mesh.data.shape_keys.key_blocks
        for name in self.key_names:
            keys[name].slider_min, keys[name].slider_max = -SLIDER_LIMIT, SLIDER_LIMIT
        for name in rig.JOINT_NAMES:
            self.armature.pose.bones[name].rotation_mode = "QUATERNION"

    def detach_actions(self) -> list[str]:
        """Unassign the rig's actions (the imported animation, an earlier recording) so that they stop
        overriding the live pose on every frame change; each keeps a fake user so that saving keeps it."""
        detached = []
        for animated in (self.armature, self.mesh.data.shape_keys):
            animation = animated.animation_data
            if animation is not None and animation.action is not None:
                animation.action.use_fake_user = True
                detached.append(animation.action.name)
                animation.action = None
        return detached

    def frame(self, pose: FramePose) -> RigFrame:
        """Shape key values and bone basis matrices that reproduce FLAME for this frame."""
        exp = np.zeros(self.n_exp)
        count = min(self.n_exp, pose.exp.size)
        exp[:count] = pose.exp[:count]
        translations, quaternions = rig.joint_transforms(
            self.skeleton, exp, pose.head_rotation, pose.head_translation, pose.joint_poses
        )
        weights = [exp, rig.pose_corrective_weights(*pose.joint_poses)]
        if self.has_eyelids:  # open when the frame has no eyelid weights
            weights.append(pose.eyelids if pose.eyelids is not None else np.zeros(len(rig.EYELID_TARGET_NAMES)))
        weights = np.concatenate(weights)
        to_armature = np.linalg.inv(np.array(self.armature.matrix_world)) @ BLENDER_FROM_GLTF
        from_armature = np.linalg.inv(to_armature)
        world: list[np.ndarray] = []
        deform: list[np.ndarray] = []
        bases: dict[str, np.ndarray] = {}
        for joint, name in enumerate(rig.JOINT_NAMES):
            local = _translation(translations[joint])
            x, y, z, w = quaternions[joint]
            local[:3, :3] = np.array(Quaternion((w, x, y, z)).to_matrix())
            parent = rig.JOINT_PARENTS[joint]
            world.append(local if parent < 0 else world[parent] @ local)
            deform.append(to_armature @ world[joint] @ _translation(-self.skeleton.rest[joint]) @ from_armature)
            rest = np.array(self.armature.data.bones[name].matrix_local)
            relative = deform[joint] if parent < 0 else np.linalg.inv(deform[parent]) @ deform[joint]
            bases[name] = np.linalg.inv(rest) @ relative @ rest
        return RigFrame(weights, bases)

    def apply(self, frame: RigFrame) -> None:
        keys = self.mesh.data.shape_keys.key_blocks
        for name, value in zip(self.key_names, frame.weights.tolist(), strict=True):
            keys[name].value = value
        for name, basis in frame.bone_bases.items():
            self.armature.pose.bones[name].matrix_basis = _matrix(basis)


def _flame_mesh(obj: bpy.types.Object) -> bpy.types.Object | None:
    keys = obj.data.shape_keys if obj.type == "MESH" else None
    if keys is None or FIRST_EXPRESSION_KEY not in keys.key_blocks:
        return None
    return obj


def _armature_of(mesh: bpy.types.Object) -> bpy.types.Object:
    for modifier in mesh.modifiers:
        if modifier.type == "ARMATURE" and modifier.object is not None:
            return modifier.object
    raise RigError(f"{mesh.name} has FLAME shape keys but no armature: import the .glb with its skin again")

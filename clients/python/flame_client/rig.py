"""FLAME rig maths every client shares (numpy only): pose-corrective weights, the glTF coordinate mapping and
the joint transforms with which a glTF skin reproduces FLAME exactly.

The rig written by ``run_stream.py export --gltf`` has fixed names that clients rely on:

- one skinned mesh node ``flame_head``; its vertices are FLAME model space (y up, z toward the viewer, x toward
  the subject's left, metres) with the identity (``shape``) baked in;
- joints ``root``, ``neck``, ``jaw``, ``left_eye``, ``right_eye`` (FLAME's joint order 0..4; the neck's parent
  is the root, the jaw's and the eyes' parent is the neck), nodes with rest translations ``B_k - B_parent``;
- morph targets ``exp_000`` ... ``exp_{n-1}`` (the expression components, weight = the coefficient), then
  ``pose_000`` ... ``pose_035`` (FLAME's pose correctives, weights = :func:`pose_corrective_weights`), then, for
  a model with metrical-tracker's eyelid blendshapes, ``eyelid_left`` and ``eyelid_right`` (weight = a frame's
  ``eyelids``: 0 open, 1 closed; they move no joint), their names in ``mesh.extras.targetNames``;
- ``mesh.extras.flameJointRest`` (5 x 3, row-major) the rest joints ``B`` and ``mesh.extras.flameJointExpBasis``
  (5 x 3 x n, row-major) how the joints move with the expression (FLAME regresses its joints from the
  expressed mesh); :meth:`Skeleton.from_extras` reads both.

Coordinates: glTF world = ``diag(1, -1, -1)`` x OpenCV camera space, i.e. the camera is an OpenGL camera at the
origin looking down -Z with +Y up, and metres stay metres. A stream frame's ``x_cam = R(head_rot) x_model +
head_trans`` becomes ``x_gltf = R_h x_model + t_h`` with ``R_h = diag(1,-1,-1) R(head_rot)`` and ``t_h =
diag(1,-1,-1) head_trans`` (:func:`gltf_head_pose`). The root joint carries that head transform; there is no
other animated node. A tracked folder's ``cam`` (an OpenGL view) is already this: ``R_h = Rz(roll) Ry(yaw)
Rx(pitch)``, ``t_h = cam[3:]``.

A frame drives the rig as :func:`joint_transforms` computes: joint ``k``'s local rotation is FLAME's ``R_k``
(root: ``R_h``), its local translation ``(B_k - B_parent) + (I - R_k) E_k exp`` (root: ``t_h + R_h B_0``). The
second term is why: glTF's inverse bind matrices are fixed at ``B``, FLAME's joints move with the expression
by ``E_k exp``, and that shift makes every skinning matrix equal FLAME's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .rotations import matrix_from_axis_angle, quaternion_from_matrix

JOINT_NAMES: tuple[str, ...] = ("root", "neck", "jaw", "left_eye", "right_eye")
#: FLAME's kinematic tree: the neck hangs from the root, the jaw and both eyes from the neck.
JOINT_PARENTS: tuple[int, ...] = (-1, 0, 1, 1, 1)
MESH_NODE_NAME = "flame_head"
N_POSE_TARGETS = 9 * (len(JOINT_NAMES) - 1)
POSE_TARGET_NAMES: tuple[str, ...] = tuple(f"pose_{k:03d}" for k in range(N_POSE_TARGETS))
#: The eyelid morph targets (the person's left, then right), last in a rig made from a model with eyelids.
EYELID_TARGET_NAMES: tuple[str, ...] = ("eyelid_left", "eyelid_right")
#: glTF world from OpenCV camera space (and back: the matrix is its own inverse).
GLTF_FROM_CAMERA = np.diag([1.0, -1.0, -1.0])


def expression_target_names(n_exp: int) -> tuple[str, ...]:
    """Names of the expression morph targets: ``exp_000`` ... ``exp_{n-1}``."""
    return tuple(f"exp_{i:03d}" for i in range(n_exp))


def target_names(n_exp: int, eyelids: bool = False) -> tuple[str, ...]:
    """Every morph target of the rig, in order: the expressions, the 36 pose correctives, then (``eyelids``)
    the two eyelid targets."""
    return expression_target_names(n_exp) + POSE_TARGET_NAMES + (EYELID_TARGET_NAMES if eyelids else ())


def pose_corrective_weights(neck: Any, jaw: Any, left_eye: Any, right_eye: Any) -> np.ndarray:
    """(36,) FLAME's pose feature: ``R - I`` of the neck, jaw, left eye and right eye (axis-angle inputs).

    Index ``k = (joint - 1) * 9 + 3 * row + col`` for joints 1..4 in that order, exactly the vector FLAME
    multiplies its pose-corrective blendshapes with; they are the weights of morph targets ``pose_000``...
    """
    joints = (neck, jaw, left_eye, right_eye)
    return np.concatenate([(matrix_from_axis_angle(axis_angle) - np.eye(3)).reshape(9) for axis_angle in joints])


def gltf_head_pose(head_rot: Any, head_trans: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(R_h, t_h)`` placing FLAME model space in glTF world: ``x_gltf = R_h x_model + t_h``.

    ``head_rot``/``head_trans`` are a stream frame's (OpenCV camera space); glTF world is that space turned by
    ``diag(1, -1, -1)``: an OpenGL camera at the origin looking down -Z.
    """
    rotation = GLTF_FROM_CAMERA @ matrix_from_axis_angle(head_rot)
    translation = GLTF_FROM_CAMERA @ np.asarray(head_trans, dtype=np.float64).reshape(3)
    return rotation, translation


@dataclass(frozen=True)
class Skeleton:
    """The identity's joints: rest positions ``B`` (exp = 0) and their expression basis ``E`` (model space)."""

    rest: np.ndarray  # (5, 3) metres
    exp_basis: np.ndarray  # (5, 3, n_exp) metres per unit coefficient

    @property
    def n_exp(self) -> int:
        return int(self.exp_basis.shape[2])

    def joints(self, exp: Any) -> np.ndarray:
        """(5, 3) FLAME's joints for an expression (``B + E exp``); missing trailing coefficients count as 0."""
        return self.rest + self.exp_basis @ _fit_length(exp, self.n_exp)

    def to_extras(self) -> dict[str, Any]:
        """The glTF ``mesh.extras`` entries that carry this skeleton (plain lists, row-major)."""
        return {
            "flameJointRest": self.rest.reshape(-1).tolist(),
            "flameJointExpBasis": self.exp_basis.reshape(-1).tolist(),
        }

    @classmethod
    def from_extras(cls, extras: Mapping[str, Any]) -> Skeleton:
        """The skeleton stored in a rig's ``mesh.extras`` (see :meth:`to_extras`); ValueError if malformed."""
        try:
            rest = np.asarray(extras["flameJointRest"], dtype=np.float64).reshape(len(JOINT_NAMES), 3)
            basis = np.asarray(extras["flameJointExpBasis"], dtype=np.float64).reshape(len(JOINT_NAMES), 3, -1)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"mesh.extras lacks a valid FLAME skeleton ({error}); export the rig again") from None
        return cls(rest=rest, exp_basis=basis)


@dataclass(frozen=True)
class RigPose:
    """Everything a client sets on the rig for one frame."""

    weights: np.ndarray  # (n_exp + 36 [+ 2 eyelids],) morph weights in target order
    translations: np.ndarray  # (5, 3) joints' local translations
    rotations: np.ndarray  # (5, 4) joints' local rotations, quaternions (x, y, z, w)


def joint_transforms(
    skeleton: Skeleton, exp: Any, head_rotation: np.ndarray, head_translation: Any, joint_poses: Sequence[Any]
) -> tuple[np.ndarray, np.ndarray]:
    """Local ``(translations (5, 3), quaternions (5, 4) xyzw)`` of the joints in :data:`JOINT_NAMES` order.

    ``head_rotation`` (3x3) and ``head_translation`` place model space in glTF world (:func:`gltf_head_pose`);
    ``joint_poses`` are the axis-angles of the neck, jaw, left eye and right eye.
    """
    rotations = [np.asarray(head_rotation, dtype=np.float64).reshape(3, 3)]
    rotations += [matrix_from_axis_angle(axis_angle) for axis_angle in joint_poses]
    shift = skeleton.exp_basis @ _fit_length(exp, skeleton.n_exp)
    translations = np.empty((len(JOINT_NAMES), 3))
    translations[0] = np.asarray(head_translation, dtype=np.float64).reshape(3) + rotations[0] @ skeleton.rest[0]
    for joint in range(1, len(JOINT_NAMES)):
        parent = JOINT_PARENTS[joint]
        translations[joint] = skeleton.rest[joint] - skeleton.rest[parent] + (np.eye(3) - rotations[joint]) @ shift[joint]
    return translations, np.stack([quaternion_from_matrix(rotation) for rotation in rotations])


def frame_rig_pose(skeleton: Skeleton, frame: Mapping[str, Any], eyelids: bool = False) -> RigPose:
    """The rig pose of a ``flame.frame`` message (or any mapping with its keys: ``exp``, ``neck_pose``,
    ``jaw_pose``, ``eye_pose``, ``head_rot``, ``head_trans``); ``eyelids``: the rig has the eyelid targets,
    whose weights come from the frame's ``eyelids`` (open when it has none)."""
    eyes = np.asarray(frame["eye_pose"], dtype=np.float64).reshape(2, 3)
    poses = (frame["neck_pose"], frame["jaw_pose"], eyes[0], eyes[1])
    exp = _fit_length(frame["exp"], skeleton.n_exp)
    head_rotation, head_translation = gltf_head_pose(frame["head_rot"], frame["head_trans"])
    translations, rotations = joint_transforms(skeleton, exp, head_rotation, head_translation, poses)
    weights = [exp, pose_corrective_weights(*poses)]
    if eyelids:
        weights.append(_fit_length(frame.get("eyelids") or (), len(EYELID_TARGET_NAMES)))
    return RigPose(np.concatenate(weights), translations, rotations)


def _fit_length(values: Any, count: int) -> np.ndarray:
    """The first ``count`` values, zero-padded: a stream may carry more or fewer components than the rig."""
    array = np.asarray(values, dtype=np.float64).reshape(-1)[:count]
    return np.pad(array, (0, count - array.size))

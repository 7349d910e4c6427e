"""One frame's parameters: its forms, named views, and every conversion to and from them, side by side.

Three forms, each for a reason:

- :class:`TrackedFrame`, one frame in NumPy (float64): what the engine hands out. Expression, FLAME's joint
  rotations (axis-angle; the root joint is the head rotation in the fitting world), the fitting world's
  translation, the same placement in OpenCV camera space (``head_rot``, ``head_trans``), the FOV and how
  the fit went. Named views (``jaw_pose``, ``neck_pose``, ``eye_pose``, ``head_rotation``) replace indexing.
- :class:`FrameParams`, a batch in PyTorch with joint rotations as matrices: the Levenberg-Marquardt
  solvers' state (rotations are updated multiplicatively, ``R <- R exp([delta])``).
- :class:`FrameState`, a batch in PyTorch with joint rotations axis-angle: the photometric fitter's
  differentiable state (corrections are added to it).
- :class:`FrameArrays`, one frame in NumPy with joint rotations as matrices: the per-frame CPU solver's
  state (``engine.frame_solver``) and what the tracker keeps between frames, so that a tracked frame makes no
  tensor. In the tracker's dtype (float32 or float64), holding a batch of one's FrameParams values exactly.

Conversions (each with its inverse; ``tests/test_frames.py`` round-trips every pair):

========================================  ====================================  ==========================
from -> to                                forward                               inverse
========================================  ====================================  ==========================
fitting world <-> OpenCV camera space     :func:`camera_from_world`             :func:`world_from_camera`
FrameParams <-> FrameState                :meth:`FrameParams.as_state`          :meth:`FrameState.as_params`
FrameParams (one row) <-> FrameArrays     :meth:`FrameParams.arrays`            :meth:`FrameArrays.as_params`
TrackedFrame <-> FrameArrays              :func:`arrays_from_frame`             :func:`frame_from_params`
TrackedFrame <-> FrameParams              :func:`params_from_frames`            :func:`frame_from_params`
TrackedFrame <-> reference ``.npz``       :func:`reference_arrays`              :func:`frame_from_reference`
stacked reference -> FrameParams          :func:`params_from_reference_stack`   (through TrackedFrame)
TrackedFrame <-> wire ``flame.frame``     :func:`frame_message_from`            :func:`frame_from_message`
wire ``flame.frame`` -> reference         :func:`reference_from_message`        (through TrackedFrame)
one frame's arrays <-> stacked arrays     :func:`stack_reference`               :func:`unstack_reference`
FrameState <-> (T, D) float64 columns     :meth:`FrameState.columns`            :meth:`FrameState.from_columns`
========================================  ====================================  ==========================

The fitting world is FLAME's frame with the camera at its origin looking down -z (``engine.camera``); OpenCV
camera space is that frame with y and z negated (``FLIP``). FLAME rotates the head about its root joint, so
placing the model in camera space needs the root joint of the shaped, expressed template
(``HeadRig.root_joint``): ``x_cam = FLIP (R (x - J0) + J0 + transl)``.

The reference format is the per-frame ``.npz`` of "FLAME Head Tracker" (keys ``shape exp head_pose jaw_pose
neck_pose eye_pose cam fov K``, leading dimension 1, plus our ``valid format_version model_checksum``): its
``head_pose`` stays zero and the camera moves, ``cam = (yaw, pitch, roll, x, y, z)`` being the world-to-view
transform ``x_view = R x + t`` of the mesh posed with a zero head pose, ``R = Rz(roll) Ry(yaw) Rx(pitch)``,
in an OpenGL-style view. ``R`` is our root joint rotation, and on the wire ``R(head_rot) = FLIP R``,
``head_trans = FLIP t``. The wire schema itself lives in ``flame_client.messages`` (the client package
installs alone): the engine converts to and from it here, never the other way round.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.camera import FLIP
from engine.flame import axis_angles, rodrigues, rotation_log, rotation_matrices
from engine.head_model import JAW, LEFT_EYE, NECK, RIGHT_EYE, ROOT, has_eyes
from engine.jit import compiled
from flame_client.messages import frame_message
from flame_client.rotations import euler_matrix

#: Version of the per-frame reference arrays (the reference tracker's keys plus ours), stored in every frame.
FRAME_FORMAT_VERSION = 1
#: Our per-frame key for the eyelid weights (1, 2), only from a model with eyelid blendshapes; the same name in
#: the wire schema's ``flame.frame``.
EYELIDS_KEY = "eyelids"
#: The root joint of the shaped template for an expression (E,) -> (3,) metres: ``HeadRig.root_joint``.
RootJoint = Callable[[np.ndarray], np.ndarray]
#: The same for T frames' expressions (T, E) -> (T, 3): ``HeadRig.root_joints``.
RootJoints = Callable[[np.ndarray], np.ndarray]

_FLIP = np.array(FLIP)


# ----------------------------------------------------------------------------------------------- the forms
@dataclass
class TrackedFrame:
    """One frame's result. Rotations axis-angle; ``pose`` is FLAME's joints with root = head rotation."""

    valid: bool
    exp: np.ndarray  # (E,)
    pose: np.ndarray  # (J, 3): root, neck, jaw, left eye, right eye
    transl: np.ndarray  # (3,) FLAME translation in the fitting world (camera at origin, looking down -z)
    head_rot: np.ndarray  # (3,) places the model in OpenCV camera space: x_cam = R(head_rot) x_model + head_trans
    head_trans: np.ndarray  # (3,) metres, camera space
    fov_deg: float
    rms_px: float = math.nan
    iterations: int = 0
    fit_ms: float = 0.0
    calibrated: bool = True
    shape_version: int = 0
    #: (2,) eyelid weights, the person's left then right (0 open, 1 closed); None without eyelid blendshapes.
    eyelids: np.ndarray | None = None

    def expression(self) -> np.ndarray:
        """The expression coefficients as the FLAME layer takes them: ``exp``, then the eyelid weights if any."""
        return self.exp if self.eyelids is None else np.concatenate([self.exp, self.eyelids])

    @property
    def head_rotation(self) -> np.ndarray:
        """(3,) the head's rotation in the fitting world (FLAME's root joint)."""
        return self.pose[ROOT]

    @property
    def neck_pose(self) -> np.ndarray:
        return self.pose[NECK]

    @property
    def jaw_pose(self) -> np.ndarray:
        return self.pose[JAW]

    @property
    def has_eyes(self) -> bool:
        return has_eyes(len(self.pose))

    @property
    def eye_pose(self) -> np.ndarray:
        """(6,) left eye then right eye; at rest for a model without eye joints."""
        return self.pose[LEFT_EYE : RIGHT_EYE + 1].reshape(-1) if self.has_eyes else np.zeros(6)

    def held(self, rms_px: float, iterations: int, fit_ms: float, calibrated: bool, shape_version: int) -> TrackedFrame:
        """This frame's parameters repeated for a frame without a usable fit: invalid, with that frame's statistics."""
        return TrackedFrame(
            False, self.exp, self.pose, self.transl, self.head_rot, self.head_trans, self.fov_deg, rms_px,
            iterations, fit_ms, calibrated, shape_version, self.eyelids,
        )


@dataclass
class FrameParams:
    """Per-frame parameters of a batch of frames, joint rotations as matrices (the solvers' state)."""

    exp: torch.Tensor  # (B, E)
    rotations: torch.Tensor  # (B, J, 3, 3) local joint rotations; root = head rotation in the world
    transl: torch.Tensor  # (B, 3)

    def clone(self) -> FrameParams:
        return FrameParams(self.exp.clone(), self.rotations.clone(), self.transl.clone())

    def pose(self) -> torch.Tensor:
        """(B, J, 3) axis-angle."""
        return rotation_log(self.rotations)

    def index(self, rows: torch.Tensor | slice) -> FrameParams:
        return FrameParams(self.exp[rows], self.rotations[rows], self.transl[rows])

    def as_state(self) -> FrameState:
        """The same frames with axis-angle rotations (the inverse of :meth:`FrameState.as_params`)."""
        return FrameState(self.exp, self.pose(), self.transl)

    def arrays(self, row: int = 0) -> FrameArrays:
        """One frame of the batch as NumPy arrays of the same dtype and values (the inverse of
        :meth:`FrameArrays.as_params`)."""
        # Indexing the arrays rather than the tensors: PyTorch's indexing costs more than NumPy's.
        return FrameArrays(*(np.ascontiguousarray(tensor.numpy(force=True)[row]) for tensor in (self.exp, self.rotations, self.transl)))

    def finite(self) -> bool:
        # In NumPy: called for every tracked frame, where PyTorch's per-operation overhead outweighs the work.
        return all(np.logical_and.reduce(np.isfinite(t.numpy(force=True)), axis=None) for t in (self.exp, self.rotations, self.transl))

    @staticmethod
    def cat(batches: list[FrameParams]) -> FrameParams:
        return FrameParams(*(torch.cat([getattr(b, key) for b in batches]) for key in ("exp", "rotations", "transl")))

    @staticmethod
    def neutral(batch: int, n_exp: int, n_joints: int, dtype: torch.dtype, device: str | torch.device = "cpu") -> FrameParams:
        """Expression zero, every joint at rest, no translation."""
        options = {"dtype": dtype, "device": device}
        return FrameParams(
            torch.zeros(batch, n_exp, **options), torch.eye(3, **options).expand(batch, n_joints, 3, 3), torch.zeros(batch, 3, **options)
        )


#: The NumPy dtype of each PyTorch dtype that FrameArrays holds.
NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


@dataclass
class FrameArrays:
    """One frame's parameters in NumPy, joint rotations as matrices (the per-frame CPU solver's state).

    Never changed in place once made: the tracker keeps the same arrays as its history and prediction.
    """

    exp: np.ndarray  # (E,)
    rotations: np.ndarray  # (J, 3, 3) local joint rotations; root = head rotation in the world
    transl: np.ndarray  # (3,)

    def as_params(self, device: str | torch.device = "cpu") -> FrameParams:
        """A batch of one with the same dtype and values (the inverse of :meth:`FrameParams.arrays`)."""
        return FrameParams(*(torch.from_numpy(np.array(array[None])).to(device) for array in (self.exp, self.rotations, self.transl)))

    def astype(self, dtype: type[np.floating]) -> FrameArrays:
        """The same frame in another dtype (new arrays)."""
        return FrameArrays(self.exp.astype(dtype), self.rotations.astype(dtype), self.transl.astype(dtype))

    def axis_angle(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """float64 exp (E,), pose (J, 3) axis-angle and transl (3,): what :func:`frame_from_params` takes."""
        return _axis_angle(self.exp, self.rotations, self.transl)

    def finite(self) -> bool:
        return _all_finite(self.exp, self.rotations, self.transl)

    @staticmethod
    def neutral(n_exp: int, n_joints: int, dtype: type[np.floating]) -> FrameArrays:
        """Expression zero, every joint at rest, no translation."""
        return FrameArrays(np.zeros(n_exp, dtype), np.tile(np.eye(3, dtype=dtype), (n_joints, 1, 1)), np.zeros(3, dtype))


@compiled
def _axis_angle(exp: np.ndarray, rotations: np.ndarray, transl: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:meth:`FrameArrays.axis_angle` compiled (numba): one call per tracked frame where NumPy would make four."""
    return exp.astype(np.float64), axis_angles(rotations.astype(np.float64)), transl.astype(np.float64)


@compiled
def _all_finite(exp: np.ndarray, rotations: np.ndarray, transl: np.ndarray) -> bool:
    """Whether every value of the three arrays is finite (compiled: one call where NumPy would make six)."""
    for array in (exp.ravel(), rotations.ravel(), transl.ravel()):
        for value in array:
            if not math.isfinite(value):
                return False
    return True


@dataclass
class FrameState:
    """Per-frame parameters of a batch of frames, joint rotations axis-angle (the photometric fitter's state)."""

    exp: torch.Tensor  # (B, E)
    pose: torch.Tensor  # (B, J, 3)
    transl: torch.Tensor  # (B, 3)

    def detach(self) -> FrameState:
        return FrameState(self.exp.detach().clone(), self.pose.detach().clone(), self.transl.detach().clone())

    def index(self, rows: slice | list[int]) -> FrameState:
        return FrameState(self.exp[rows], self.pose[rows], self.transl[rows])

    def plus(self, correction: FrameState) -> FrameState:
        return FrameState(self.exp + correction.exp, self.pose + correction.pose, self.transl + correction.transl)

    def minus(self, other: FrameState) -> FrameState:
        return FrameState(self.exp - other.exp, self.pose - other.pose, self.transl - other.transl)

    def as_params(self) -> FrameParams:
        """The same frames with rotation matrices (the inverse of :meth:`FrameParams.as_state`)."""
        return FrameParams(self.exp, rodrigues(self.pose), self.transl)

    @staticmethod
    def cat(states: list[FrameState]) -> FrameState:
        return FrameState(*(torch.cat([getattr(s, key) for s in states]) for key in ("exp", "pose", "transl")))

    def columns(self) -> np.ndarray:
        """(T, D) float64: expression, joint rotations (axis-angle), translation, one row per frame (for
        filters that treat every parameter as a time series)."""
        parts = (self.exp, self.pose.reshape(len(self.pose), -1), self.transl)
        return np.concatenate([part.detach().cpu().double().numpy() for part in parts], axis=1)

    def head_pose_columns(self) -> np.ndarray:
        """(D,) bool: which of :meth:`columns` are the head pose (root and neck rotation, translation)."""
        joints = np.zeros(self.pose.shape[1:], dtype=bool)
        joints[[ROOT, NECK]] = True
        return np.concatenate([np.zeros(self.exp.shape[1], dtype=bool), joints.reshape(-1), np.ones(3, dtype=bool)])

    @staticmethod
    def from_columns(columns: np.ndarray, like: FrameState) -> FrameState:
        """The inverse of :meth:`columns`, in ``like``'s layout, dtype and device."""
        n_exp, n_pose = like.exp.shape[1], like.pose[0].numel()
        options = {"dtype": like.exp.dtype, "device": like.exp.device}
        return FrameState(torch.as_tensor(columns[:, :n_exp], **options),
                          torch.as_tensor(columns[:, n_exp : n_exp + n_pose], **options).reshape(-1, *like.pose.shape[1:]),
                          torch.as_tensor(columns[:, n_exp + n_pose :], **options))


# ---------------------------------------------------------------------------- fitting world <-> camera space
def camera_from_world(rotation: np.ndarray, transl: np.ndarray, root: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(head_rot, head_trans) placing the model in OpenCV camera space, from the head rotation (3,) and
    translation (3,) in the fitting world and the root joint ``root`` (3,) it turns about."""
    as_float = np.float64
    return _camera_from_world(np.asarray(rotation, dtype=as_float), np.asarray(transl, dtype=as_float), np.asarray(root, dtype=as_float))


@compiled
def _camera_from_world(rotation: np.ndarray, transl: np.ndarray, root: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`camera_from_world` compiled (numba): every tracked frame calls it."""
    rot_world = matrix_from_rotation_vector(rotation)
    # x_cam = FLIP (R (x - J0) + J0 + transl): facing the camera, head_rot is a half turn about x.
    flipped = rot_world.copy()
    flipped[1:] = -flipped[1:]
    head_trans = np.empty(3)
    for x in range(3):
        turned = rot_world[x, 0] * root[0] + rot_world[x, 1] * root[1] + rot_world[x, 2] * root[2]
        head_trans[x] = (root[x] - turned + transl[x]) * (1.0 if x == 0 else -1.0)
    return rotation_vector_from_matrix(flipped), head_trans


def world_from_camera(head_rot: np.ndarray, head_trans: np.ndarray, root: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`camera_from_world`: (head rotation, translation) in the fitting world."""
    rot_world = _FLIP[:, None] * matrix_from_rotation_vector(np.asarray(head_rot, dtype=np.float64))
    return _world_from_view(rot_world, _FLIP * np.asarray(head_trans, dtype=np.float64), root)


def _world_from_view(rot_world: np.ndarray, view_trans: np.ndarray, root: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Head rotation (axis-angle) and world translation from the view transform ``x_view = R x + t``."""
    # t = J0 - R J0 + transl, with J0 the root joint of the shaped, expressed template.
    return rotation_vector_from_matrix(rot_world), view_trans - root + rot_world @ root


@compiled
def matrix_from_rotation_vector(vector: np.ndarray) -> np.ndarray:
    """OpenCV's ``cv2.Rodrigues`` of a rotation vector (3,) float64: its rotation matrix (3, 3), exact at zero
    (unlike :func:`engine.flame.rotation_matrices`, which is smoothed there for the solvers' derivatives).
    Compiled (numba): OpenCV's call costs more than the arithmetic, far more with the caches cold."""
    matrix = np.eye(3)
    theta = math.sqrt(vector[0] * vector[0] + vector[1] * vector[1] + vector[2] * vector[2])
    if theta < 2.220446049250313e-16:  # as OpenCV: below double precision's epsilon, no rotation
        return matrix
    cos, sin = math.cos(theta), math.sin(theta)
    rest = 1.0 - cos
    x, y, z = vector[0] / theta, vector[1] / theta, vector[2] / theta
    matrix[0, 0], matrix[0, 1], matrix[0, 2] = cos + rest * x * x, rest * x * y - sin * z, rest * x * z + sin * y
    matrix[1, 0], matrix[1, 1], matrix[1, 2] = rest * x * y + sin * z, cos + rest * y * y, rest * y * z - sin * x
    matrix[2, 0], matrix[2, 1], matrix[2, 2] = rest * x * z - sin * y, rest * y * z + sin * x, cos + rest * z * z
    return matrix


@compiled
def rotation_vector_from_matrix(matrix: np.ndarray) -> np.ndarray:
    """The inverse of :func:`matrix_from_rotation_vector` for a rotation matrix (3, 3) float64, as OpenCV's ``cv2.Rodrigues``
    computes it (half turns included, where :func:`engine.flame.axis_angles` does not hold), without OpenCV's
    re-orthonormalisation: our matrices are rotations to rounding."""
    x, y, z = matrix[2, 1] - matrix[1, 2], matrix[0, 2] - matrix[2, 0], matrix[1, 0] - matrix[0, 1]
    sin = math.sqrt((x * x + y * y + z * z) * 0.25)
    cos = min(max((matrix[0, 0] + matrix[1, 1] + matrix[2, 2] - 1.0) * 0.5, -1.0), 1.0)
    theta = math.acos(cos)
    vector = np.zeros(3)
    if sin < 1e-5:
        if cos > 0:  # no rotation
            return vector
        # A half turn: the axis from the diagonal, its signs from the off-diagonal entries.
        x = math.sqrt(max((matrix[0, 0] + 1.0) * 0.5, 0.0))
        y = math.sqrt(max((matrix[1, 1] + 1.0) * 0.5, 0.0)) * (-1.0 if matrix[0, 1] < 0 else 1.0)
        z = math.sqrt(max((matrix[2, 2] + 1.0) * 0.5, 0.0)) * (-1.0 if matrix[0, 2] < 0 else 1.0)
        if abs(x) < abs(y) and abs(x) < abs(z) and (matrix[1, 2] > 0) != (y * z > 0):
            z = -z
        scale = theta / math.sqrt(x * x + y * y + z * z)
    else:
        scale = theta / (2.0 * sin)
    vector[0], vector[1], vector[2] = x * scale, y * scale, z * scale
    return vector


# ------------------------------------------------------------------------------- TrackedFrame <-> FrameParams
def frame_from_params(
    exp: np.ndarray, pose: np.ndarray, transl: np.ndarray, root: np.ndarray, fov_deg: float, valid: bool = True,
    rms_px: float = math.nan, iterations: int = 0, fit_ms: float = 0.0, calibrated: bool = True, shape_version: int = 0,
    eyelids: np.ndarray | None = None,
) -> TrackedFrame:
    """A TrackedFrame from one frame's fitting-world parameters (``params_row``; FLAME's ``exp`` and, for a
    model with eyelid blendshapes, the ``eyelids`` that follow it in the solver's expression) and its root joint."""
    head_rot, head_trans = camera_from_world(pose[ROOT], transl, root)
    return TrackedFrame(
        valid, exp, pose, transl, head_rot, head_trans, fov_deg, rms_px, iterations, fit_ms, calibrated, shape_version, eyelids
    )


def params_row(params: FrameParams, row: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One frame of a batch as float64 NumPy (exp (E,), pose (J, 3) axis-angle, transl (3,))."""
    return params.arrays(row).axis_angle()


def arrays_from_frame(frame: TrackedFrame, dtype: type[np.floating] = np.float64) -> FrameArrays:
    """The inverse of ``frame_from_params(*arrays.axis_angle(), ...)``: a frame's fitting-world parameters (its
    expression with the eyelid weights, if any) with rotation matrices, in ``dtype``."""
    pose = np.ascontiguousarray(frame.pose, dtype=np.float64)
    return FrameArrays(frame.expression().astype(dtype), rotation_matrices(pose).astype(dtype), frame.transl.astype(dtype))


def params_from_frames(frames: list[TrackedFrame], dtype: torch.dtype, device: str | torch.device = "cpu") -> FrameParams:
    """The inverse of :func:`frame_from_params`: a batch of the frames' fitting-world parameters."""
    options = {"dtype": dtype, "device": device}
    exp = torch.as_tensor(np.stack([f.expression() for f in frames]), **options)
    pose = torch.as_tensor(np.stack([f.pose for f in frames]), **options)
    return FrameParams(exp, rodrigues(pose), torch.as_tensor(np.stack([f.transl for f in frames]), **options))


def state_from_frames(frames: list[TrackedFrame], dtype: torch.dtype, device: str | torch.device = "cpu") -> FrameState:
    """The frames' fitting-world parameters as an axis-angle batch (no detour through rotation matrices)."""
    options = {"dtype": dtype, "device": device}
    exp = torch.as_tensor(np.stack([f.expression() for f in frames]), **options)
    return FrameState(exp, *(torch.as_tensor(np.stack([getattr(f, key) for f in frames]), **options) for key in ("pose", "transl")))


# ---------------------------------------------------------------------------- TrackedFrame <-> reference .npz
def euler_from_matrix(rotation: np.ndarray) -> np.ndarray:
    """(yaw, pitch, roll) in radians with rotation = Rz(roll) @ Ry(yaw) @ Rx(pitch), the reference's order;
    the inverse of ``flame_client.rotations.euler_matrix``."""
    yaw = math.atan2(-rotation[2, 0], math.hypot(rotation[2, 1], rotation[2, 2]))
    pitch = math.atan2(rotation[2, 1], rotation[2, 2])
    roll = math.atan2(rotation[1, 0], rotation[0, 0])
    return np.array([yaw, pitch, roll])


def reference_arrays(frame: TrackedFrame, shape: np.ndarray, intrinsics: np.ndarray, model_checksum: str) -> dict[str, np.ndarray]:
    """One frame in the reference tracker's per-frame format (leading dimension 1), plus ``valid``,
    ``format_version``, ``model_checksum`` and, from a model with eyelid blendshapes, ``eyelids`` (1, 2) (a key
    of ours: the reference keys stay as they are); ``shape`` (S,) is the identity, ``intrinsics`` K (3, 3)."""
    rotation = matrix_from_rotation_vector(np.asarray(frame.head_rotation, dtype=np.float64))
    arrays = {
        "shape": np.asarray(shape, dtype=np.float64)[None].astype(np.float32),
        "exp": frame.exp[None].astype(np.float32),
        "head_pose": np.zeros((1, 3), np.float32),
        "jaw_pose": frame.jaw_pose[None].astype(np.float32),
        "neck_pose": frame.neck_pose[None].astype(np.float32),
        "eye_pose": frame.eye_pose[None].astype(np.float32),
        "cam": np.concatenate([euler_from_matrix(rotation), _FLIP * frame.head_trans])[None].astype(np.float32),
        "fov": np.array([frame.fov_deg], np.float32),
        "K": np.asarray(intrinsics)[None].astype(np.float32),
        "valid": np.array([frame.valid]),
        "format_version": np.array([FRAME_FORMAT_VERSION]),
        "model_checksum": np.array([model_checksum]),
    }
    if frame.eyelids is not None:
        arrays[EYELIDS_KEY] = frame.eyelids[None].astype(np.float32)
    return arrays


def frame_from_reference(arrays: Mapping[str, np.ndarray], n_joints: int, root_joint: RootJoint) -> TrackedFrame:
    """The inverse of :func:`reference_arrays`: one frame (leading dimension 1) for a model with ``n_joints``
    joints; ``root_joint`` gives the root joint for an expression (``HeadRig.root_joint``). Files of the
    reference tracker, which lack ``valid``, count as valid."""
    exp = arrays["exp"][0].astype(np.float64)
    rotation = euler_matrix(*(float(v) for v in arrays["cam"][0, :3]))
    view_trans = arrays["cam"][0, 3:].astype(np.float64)
    pose = model_pose(arrays, n_joints)
    pose[ROOT], transl = _world_from_view(rotation, view_trans, root_joint(exp))
    head_rot = rotation_vector_from_matrix(_FLIP[:, None] * rotation)
    valid = bool(arrays["valid"][0]) if "valid" in arrays else True
    eyelids = arrays[EYELIDS_KEY][0].astype(np.float64) if EYELIDS_KEY in arrays else None
    fov_deg = float(np.asarray(arrays["fov"]).reshape(-1)[0])
    return TrackedFrame(valid, exp, pose, transl, head_rot, _FLIP * view_trans, fov_deg, eyelids=eyelids)


def model_pose(arrays: Mapping[str, np.ndarray], n_joints: int) -> np.ndarray:
    """(J, 3) FLAME's joint rotations of one frame's reference arrays with the head pose at zero (model space:
    the reference moves the camera instead)."""
    pose = np.zeros((n_joints, 3))
    pose[NECK], pose[JAW] = arrays["neck_pose"][0], arrays["jaw_pose"][0]
    if has_eyes(n_joints):
        pose[LEFT_EYE : RIGHT_EYE + 1] = np.reshape(arrays["eye_pose"][0], (2, 3))
    return pose


def params_from_reference_stack(
    stacked: Mapping[str, np.ndarray], n_joints: int, root_joints: RootJoints, n_eyelids: int, dtype: torch.dtype,
    device: str | torch.device = "cpu",
) -> FrameParams:
    """Stacked reference arrays (each key (T, ...), as :func:`stack_reference` makes them) as the solvers' batch of
    all T frames: what :func:`params_from_frames` makes of every frame's :func:`frame_from_reference`, computed for
    all frames at once. ``root_joints`` gives the frames' root joints (``HeadRig.root_joints``); a model with
    ``n_eyelids`` eyelid weights gets open lids where the arrays hold none."""
    exp = np.asarray(stacked["exp"], dtype=np.float64)
    frames = len(exp)
    cam = np.asarray(stacked["cam"], dtype=np.float64)
    rotation = euler_matrix(*cam[:, :3].T)
    pose = np.zeros((frames, n_joints, 3))
    pose[:, NECK], pose[:, JAW] = stacked["neck_pose"], stacked["jaw_pose"]
    if has_eyes(n_joints):
        pose[:, LEFT_EYE : RIGHT_EYE + 1] = np.reshape(stacked["eye_pose"], (frames, 2, 3))
    # As _world_from_view, per frame: t = J0 - R J0 + transl.
    root = root_joints(exp)
    pose[:, ROOT] = axis_angles(rotation)
    transl = cam[:, 3:] - root + (rotation @ root[..., None])[..., 0]
    if EYELIDS_KEY in stacked:
        exp = np.concatenate([exp, np.asarray(stacked[EYELIDS_KEY], dtype=np.float64)], axis=1)
    elif n_eyelids:
        exp = np.concatenate([exp, np.zeros((frames, n_eyelids))], axis=1)
    options = {"dtype": dtype, "device": device}
    return FrameParams(torch.as_tensor(exp, **options), rodrigues(torch.as_tensor(pose, **options)), torch.as_tensor(transl, **options))


def stack_reference(frames: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-frame reference arrays (leading dimension 1) stacked over frames, as tracking.npz holds them."""
    return {key: np.concatenate([frame[key] for frame in frames]) for key in frames[0]}


def unstack_reference(stacked: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The inverse of :func:`stack_reference`: one dict per frame, leading dimension 1."""
    frames = len(next(iter(stacked.values())))
    return [{key: value[index : index + 1] for key, value in stacked.items()} for index in range(frames)]


# ------------------------------------------------------------------------ TrackedFrame <-> wire flame.frame
def frame_message_from(
    frame: TrackedFrame, seq: int, t_capture: float, blendshapes: np.ndarray, landmarks: np.ndarray | None = None,
    image_size: tuple[int, int] | None = None, t_publish: float | None = None,
) -> dict[str, Any]:
    """The ``flame.frame`` message of one frame (``flame_client.messages.frame_message`` checks it)."""
    return frame_message(
        seq=seq, t_capture=t_capture, valid=frame.valid, exp=frame.exp, jaw_pose=frame.jaw_pose, eye_pose=frame.eye_pose,
        neck_pose=frame.neck_pose, head_rot=frame.head_rot, head_trans=frame.head_trans, fov_deg=frame.fov_deg,
        blendshapes=blendshapes, landmarks=landmarks, image_size=image_size, t_publish=t_publish, eyelids=frame.eyelids,
    )


def frame_from_message(message: Mapping[str, Any], n_joints: int, root_joint: RootJoint) -> TrackedFrame:
    """The inverse of :func:`frame_message_from` (a validated message) for a model with ``n_joints`` joints."""
    exp = np.asarray(message["exp"], dtype=np.float64)
    head_rot = np.asarray(message["head_rot"], dtype=np.float64)
    head_trans = np.asarray(message["head_trans"], dtype=np.float64)
    pose = np.zeros((n_joints, 3))
    pose[ROOT], transl = world_from_camera(head_rot, head_trans, root_joint(exp))
    pose[NECK], pose[JAW] = message["neck_pose"], message["jaw_pose"]
    if has_eyes(n_joints):
        pose[LEFT_EYE : RIGHT_EYE + 1] = np.reshape(message["eye_pose"], (2, 3))
    eyelids = np.asarray(message[EYELIDS_KEY], dtype=np.float64) if message.get(EYELIDS_KEY) is not None else None
    return TrackedFrame(bool(message["valid"]), exp, pose, transl, head_rot, head_trans, float(message["fov_deg"]), eyelids=eyelids)


def reference_from_message(message: Mapping[str, Any], shape: np.ndarray, intrinsics: np.ndarray) -> dict[str, np.ndarray]:
    """A recorded ``flame.frame`` message as reference arrays: both are camera-space, so no root joint is needed
    (the same arrays as ``reference_arrays(frame_from_message(...))``, ``format_version`` and no checksum)."""
    rotation = _FLIP[:, None] * matrix_from_rotation_vector(np.asarray(message["head_rot"], dtype=np.float64))

    def row(values: Any) -> np.ndarray:
        return np.asarray(values, dtype=np.float32).reshape(1, -1)

    arrays = {
        "shape": np.asarray(shape, dtype=np.float32)[None],
        "exp": row(message["exp"]),
        "head_pose": np.zeros((1, 3), np.float32),
        "jaw_pose": row(message["jaw_pose"]),
        "neck_pose": row(message["neck_pose"]),
        "eye_pose": row(message["eye_pose"]),
        "cam": row(np.concatenate([euler_from_matrix(rotation), _FLIP * np.asarray(message["head_trans"], dtype=np.float64)])),
        "fov": np.array([message["fov_deg"]], np.float32),
        "K": np.asarray(intrinsics)[None].astype(np.float32),
        "valid": np.array([bool(message["valid"])]),
        "format_version": np.array([FRAME_FORMAT_VERSION]),
    }
    if message.get(EYELIDS_KEY) is not None:
        arrays[EYELIDS_KEY] = row(message[EYELIDS_KEY])
    return arrays

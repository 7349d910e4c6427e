"""The FLAME layer: blendshapes, pose correctives and linear blend skinning in PyTorch.

Semantics follow FLAME as implemented by smplx (``lbs.py``) exactly, so that results can be compared with an
independent implementation: the root joint's rotation turns the head about the root joint, and ``transl`` is
added last. Joints are regressed from the shaped *and* expressed template, as smplx does.

Two paths share the same code:
- :meth:`FlameLayer.vertices` evaluates the dense mesh;
- :meth:`FlameLayer.landmarks` evaluates only the vertices that the landmarks touch (a few hundred instead of
  5023): the plain reference that the solver's own landmark model (:mod:`engine.landmark_model`, with
  analytic Jacobians, and its NumPy twin :mod:`engine.frame_solver`, the tracker's per-frame path) is tested
  against. The blendshape rows those vertices need are gathered once, at construction, including every
  candidate row of the yaw-dependent jaw contour.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.errors import UserError
from engine.head_model import LEFT_EYE, RIGHT_EYE, ROOT, HeadModel, has_eyes
from engine.jit import compiled

#: Rows of the contour table span these yaw angles in whole degrees (DECA's layout, see _contour_rows).
MAX_CONTOUR_YAW_DEG = 39


@dataclass
class Landmarks:
    """Model landmarks in model space (or wherever the pose put them), all (B, N, 3)."""

    lmk68: torch.Tensor | None  # iBUG order: 17 contour points, then the 51 static points
    mediapipe: torch.Tensor | None  # in the order of HeadModel.mediapipe.landmark_indices
    eyes: torch.Tensor | None  # (B, 2, 3): subject's left and right pupil centres


def world_transforms(rotations: torch.Tensor, rest_joints: torch.Tensor, parents: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The kinematic chain, walked from the root: every joint's rotation (B, J, 3, 3) and position (B, J, 3) in
    the world, for local joint `rotations` (B, J, 3, 3) about `rest_joints` (B, J, 3) (the root stays at its
    rest location; translation is applied after). `parents[j]` < j is joint j's parent."""
    world_rot, world_pos = [rotations[:, 0]], [rest_joints[:, 0]]
    for joint in range(1, rotations.shape[1]):
        parent = parents[joint]
        world_rot.append(world_rot[parent] @ rotations[:, joint])
        offset = rest_joints[:, joint] - rest_joints[:, parent]
        world_pos.append((world_rot[parent] @ offset[..., None])[..., 0] + world_pos[parent])
    return torch.stack(world_rot, dim=1), torch.stack(world_pos, dim=1)


def pose_features(rotations: torch.Tensor) -> torch.Tensor:
    """(B, 9 (J-1)): what FLAME's pose correctives are linear in, R_j - I of every joint below the root."""
    eye = torch.eye(3, dtype=rotations.dtype, device=rotations.device)
    return (rotations[:, 1:] - eye).reshape(rotations.shape[0], -1)


def rodrigues(axis_angle: torch.Tensor) -> torch.Tensor:
    """Axis-angle (..., 3) to rotation matrices (..., 3, 3); smooth at zero like smplx's batch_rodrigues."""
    angle = torch.linalg.vector_norm(axis_angle + 1e-8, dim=-1, keepdim=True)
    axis = axis_angle / angle
    cos, sin = torch.cos(angle)[..., None], torch.sin(angle)[..., None]
    x, y, z = axis.unbind(-1)
    zero = torch.zeros_like(x)
    skew = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*axis.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device)
    return eye + sin * skew + (1 - cos) * (skew @ skew)


def rotation_log(rotation: torch.Tensor) -> torch.Tensor:
    """Axis-angle of rotations (..., 3, 3) below a half turn.

    Exact up to rounding for angles below ~170 degrees; heads and FLAME joints never come near a half
    turn, so the cheap formula (about a dozen operations) serves everywhere.
    """
    r = rotation
    vee = 0.5 * torch.stack([r[..., 2, 1] - r[..., 1, 2], r[..., 0, 2] - r[..., 2, 0], r[..., 1, 0] - r[..., 0, 1]], -1)
    sin = torch.linalg.vector_norm(vee, dim=-1, keepdim=True)
    cos = 0.5 * (r[..., 0, 0] + r[..., 1, 1] + r[..., 2, 2] - 1)[..., None]
    angle = torch.atan2(sin, cos)
    return vee * torch.where(sin > 1e-7, angle / sin.clamp_min(1e-12), 1 + sin**2 / 6)


@compiled
def axis_angles(rotations: np.ndarray) -> np.ndarray:
    """:func:`rotation_log` for NumPy arrays (N, 3, 3) -> (N, 3), where a frame's few rotations need no tensors.

    Compiled (numba): a frame calls it a few times on a handful of rotations, where NumPy's per-call overhead
    would cost more than the arithmetic.
    """
    result = np.empty((rotations.shape[0], 3))
    for index in range(rotations.shape[0]):
        r = rotations[index]
        # Twice the vee and the sine: atan2 is unchanged by the common factor, and halving is exact.
        x, y, z = r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]
        sin = math.sqrt(x * x + y * y + z * z)
        if sin <= 2e-7:
            factor = 0.5 * (1 + (0.5 * sin) ** 2 / 6)
        else:
            factor = math.atan2(sin, r[0, 0] + r[1, 1] + r[2, 2] - 1) / sin
        result[index, 0], result[index, 1], result[index, 2] = x * factor, y * factor, z * factor
    return result


#: [e_a]x for a = x, y, z: the generators of rotations.
GENERATORS = np.array([[[0, 0, 0], [0, 0, -1], [0, 1, 0]], [[0, 0, 1], [0, 0, 0], [-1, 0, 0]], [[0, -1, 0], [1, 0, 0], [0, 0, 0]]], dtype=np.float64)


@compiled
def rotation_matrices(axis_angle: np.ndarray) -> np.ndarray:
    """:func:`rodrigues` for NumPy arrays (N, 3) -> (N, 3, 3), with the same 1e-8 offset that keeps it smooth at zero.

    Compiled (numba), like :func:`axis_angles`.
    """
    result = np.empty((axis_angle.shape[0], 3, 3))
    for index in range(axis_angle.shape[0]):
        a = axis_angle[index]
        angle = math.sqrt((a[0] + 1e-8) ** 2 + (a[1] + 1e-8) ** 2 + (a[2] + 1e-8) ** 2)
        x, y, z = a[0] / angle, a[1] / angle, a[2] / angle
        sin, cos = math.sin(angle), 1 - math.cos(angle)
        # I + sin [k]x + (1 - cos) [k]x^2, with [k]x^2 = k k^T - |k|^2 I written out.
        result[index, 0, 0] = 1 + cos * (-z * z - y * y)
        result[index, 1, 1] = 1 + cos * (-z * z - x * x)
        result[index, 2, 2] = 1 + cos * (-y * y - x * x)
        result[index, 0, 1] = -sin * z + cos * x * y
        result[index, 1, 0] = sin * z + cos * x * y
        result[index, 0, 2] = sin * y + cos * x * z
        result[index, 2, 0] = -sin * y + cos * x * z
        result[index, 1, 2] = -sin * x + cos * y * z
        result[index, 2, 1] = sin * x + cos * y * z
    return result


def _contour_rows(yaw_deg: torch.Tensor) -> torch.Tensor:
    """Row of the dynamic contour table for a head yaw, exactly as DECA and smplx index it.

    Rows 0..39 hold yaw 0..39 degrees, rows 40..78 hold -1..-39; yaw beyond +-39 clamps to the last row.
    """
    yaw = torch.round(torch.clamp(yaw_deg, max=MAX_CONTOUR_YAW_DEG)).long()
    negative = 39 - yaw
    negative = torch.where(yaw < -MAX_CONTOUR_YAW_DEG, torch.full_like(yaw, 78), negative)
    return torch.where(yaw < 0, negative, yaw)


@compiled
def contour_row(root_rotation: np.ndarray) -> int:
    """The contour table row of one head rotation (3, 3): :meth:`FlameLayer.contour_rows` for a single frame."""
    yaw = -math.degrees(math.atan2(-root_rotation[2, 0], math.hypot(root_rotation[0, 0], root_rotation[1, 0])))
    yaw = round(min(yaw, MAX_CONTOUR_YAW_DEG))
    if yaw >= 0:
        return yaw
    return 78 if yaw < -MAX_CONTOUR_YAW_DEG else 39 - yaw


class _VertexSubset:
    """Model rows for a list of vertices, laid out for one fused matmul per evaluation.

    ``basis`` stacks the shape, expression and pose-corrective directions: (L, M*3, S+E+P), where L is 1 for
    a subset shared by the whole batch and B for per-item subsets (the yaw-dependent contour).
    """

    def __init__(self, template: torch.Tensor, basis: torch.Tensor, weights: torch.Tensor) -> None:
        self.template = template  # (L, M, 3)
        self.basis = basis  # (L, M*3, S+E+P)
        self.weights = weights  # (L, M, J)

    @classmethod
    def gather(cls, layer: FlameLayer, vertex_idx: torch.Tensor) -> _VertexSubset:
        """Rows for ``vertex_idx`` of shape (M,) (shared) or (B, M) (one row set per batch item)."""
        lead = vertex_idx.shape[:-1] or (1,)
        flat = vertex_idx.reshape(-1)
        basis = torch.cat([layer.shapedirs[flat], layer.exprdirs[flat], layer.posedirs[flat]], dim=-1)
        count = vertex_idx.shape[-1]
        return cls(
            layer.v_template[flat].reshape(*lead, count, 3),
            basis.reshape(*lead, count * 3, basis.shape[-1]),
            layer.lbs_weights[flat].reshape(*lead, count, -1),
        )

    def select(self, rows: torch.Tensor) -> _VertexSubset:
        """Per-item subset: item b gets row ``rows[b]`` of a (R, ...) table of candidate subsets."""
        return _VertexSubset(self.template[rows], self.basis[rows], self.weights[rows])


class FlameLayer(torch.nn.Module):
    """FLAME (or the demo head) as a differentiable function of shape, expression, pose and translation.

    Arguments of every evaluation: ``shape`` (B, n_shape), ``exp`` (B, n_exp) or (B, n_expression),
    ``pose`` (B, J, 3) axis-angle per joint in ``engine.head_model.JOINT_NAMES`` order (root, neck, jaw,
    left_eye, right_eye), ``transl`` (B, 3).

    With eyelid blendshapes (metrical-tracker's), the layer's expression coefficients are FLAME's ``n_exp``
    followed by ``n_eyelids`` = 2 eyelid weights (left, right; 0 open, 1 closed): ``n_expression`` in all.
    They act like expression blendshapes (rest-space offsets, then skinning) but move no joint, as in
    metrical-tracker, where they are added to the posed mesh. An ``exp`` of FLAME's width leaves the lids open.
    """

    def __init__(
        self,
        model: HeadModel,
        n_shape: int | None = None,
        n_exp: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.model = model
        self.n_shape = model.n_shape if n_shape is None else min(n_shape, model.n_shape)
        self.n_exp = model.n_exp if n_exp is None else min(n_exp, model.n_exp)
        self.n_eyelids = model.n_eyelids
        self.n_expression = self.n_exp + self.n_eyelids
        self.n_joints = model.n_joints
        self.parents = [int(p) for p in model.parents]

        def tensor(array: np.ndarray, kind: torch.dtype = dtype) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(array), dtype=kind, device=device)

        self.register_buffer("v_template", tensor(model.v_template))
        self.register_buffer("shapedirs", tensor(model.shapedirs[:, :, : self.n_shape]))
        exprdirs = model.exprdirs[:, :, : self.n_exp]
        if model.eyelids is not None:
            exprdirs = np.concatenate([exprdirs, model.eyelids], axis=2)
        self.register_buffer("exprdirs", tensor(exprdirs))
        self.register_buffer("posedirs", tensor(model.posedirs))
        self.register_buffer("lbs_weights", tensor(model.lbs_weights))
        self.register_buffer("faces", tensor(model.faces, torch.long))
        j_regressor = tensor(model.j_regressor)
        # Joints are linear in shape and expression: regress the bases once instead of every dense mesh.
        self.register_buffer("j_template", j_regressor @ self.v_template)
        self.register_buffer("j_shapedirs", torch.einsum("jv,vcs->jcs", j_regressor, self.shapedirs))
        j_exprdirs = torch.einsum("jv,vce->jce", j_regressor, self.exprdirs[:, :, : self.n_exp])
        if self.n_eyelids:
            j_exprdirs = torch.cat([j_exprdirs, j_exprdirs.new_zeros(*j_exprdirs.shape[:2], self.n_eyelids)], dim=-1)
        self.register_buffer("j_exprdirs", j_exprdirs)
        self._build_landmark_subsets(model, device)

    # ----------------------------------------------------------------------------------------------- setup
    def _build_landmark_subsets(self, model: HeadModel, device: torch.device | str) -> None:
        faces = self.faces
        static_parts: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (name, vertex idx (N,3), bary (N,3))

        def corners(face_idx: np.ndarray) -> torch.Tensor:
            return faces[torch.as_tensor(face_idx, dtype=torch.long, device=device)]

        def bary(values: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(values, dtype=self.v_template.dtype, device=device)

        self.has_contour = model.contour68 is not None and model.static68 is not None
        if self.has_contour:
            static_parts.append(("static68", corners(model.static68.face_idx), bary(model.static68.bary)))
        elif model.full68 is not None:
            static_parts.append(("full68", corners(model.full68.face_idx), bary(model.full68.bary)))
        if model.mediapipe is not None:
            static_parts.append(("mediapipe", corners(model.mediapipe.face_idx), bary(model.mediapipe.bary)))
        self.eye_vertex_idx = self._pupil_vertices(model)
        if self.eye_vertex_idx is not None:
            eye_idx = torch.as_tensor(self.eye_vertex_idx, device=device)
            one_hot = torch.zeros(2, 3, dtype=self.v_template.dtype, device=device)
            one_hot[:, 0] = 1
            static_parts.append(("eyes", eye_idx[:, None].expand(2, 3), one_hot))

        # Static landmarks: one flat list of vertices; each part remembers its slice.
        self.static_slices: dict[str, slice] = {}  # part name ("static68", "mediapipe", "eyes"...) -> its rows of static_vertex_idx
        offset = 0
        for name, idx, _ in static_parts:
            self.static_slices[name] = slice(offset, offset + idx.shape[0])
            offset += idx.shape[0]
        self.static_vertex_idx = (
            torch.cat([idx for _, idx, _ in static_parts]) if static_parts else torch.zeros(0, 3, dtype=torch.long, device=device)
        )
        self.static_bary = (
            torch.cat([b for _, _, b in static_parts]) if static_parts else torch.zeros(0, 3, dtype=self.v_template.dtype, device=device)
        )
        self._static_subset = _VertexSubset.gather(self, self.static_vertex_idx.reshape(-1))

        if self.has_contour:
            contour_idx = corners(model.contour68.face_idx.reshape(-1)).reshape(79, 17, 3)
            self.contour_vertex_idx = contour_idx
            self.contour_bary = bary(model.contour68.bary)
            self._contour_subset = _VertexSubset.gather(self, contour_idx.reshape(79, 17 * 3))

    def _pupil_vertices(self, model: HeadModel) -> np.ndarray | None:
        """The most forward-facing vertex of each eyeball, found from the skinning weights.

        An eyeball is the set of vertices skinned (mostly) to an eye joint; its pupil is the vertex whose
        direction from the eye's rotation centre points most along +z (FLAME faces +z).
        """
        if not has_eyes(model.n_joints):
            return None
        joints = model.j_regressor @ model.v_template
        pupils = []
        for joint in (LEFT_EYE, RIGHT_EYE):
            members = np.flatnonzero(model.lbs_weights[:, joint] > 0.5)
            if members.size == 0:
                return None
            offsets = model.v_template[members] - joints[joint]
            forwardness = offsets[:, 2] / np.maximum(np.linalg.norm(offsets, axis=1), 1e-12)
            pupils.append(members[int(np.argmax(forwardness))])
        return np.asarray(pupils, dtype=np.int64)

    # -------------------------------------------------------------------------------------------- kinematics
    def rest_joints(self, shape: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
        """(B, J, 3) joint locations of the shaped and expressed template, before posing."""
        return (
            self.j_template
            + torch.einsum("jcs,bs->bjc", self.j_shapedirs, shape)
            + torch.einsum("jce,be->bjc", self.j_exprdirs, exp)
        )

    def skinning_transforms(self, rotations: torch.Tensor, rest_joints: torch.Tensor) -> torch.Tensor:
        """(B, J, 3, 4) transforms taking rest-pose points to posed points for each joint (smplx's A)."""
        rot, pos = world_transforms(rotations, rest_joints, self.parents)
        # Express each transform relative to the joint's rest location, so it applies to rest-pose vertices.
        trans = pos - (rot @ rest_joints[..., None])[..., 0]
        return torch.cat([rot, trans[..., None]], dim=-1)

    def _pose_vertices(
        self,
        subset: _VertexSubset,
        shape: torch.Tensor,
        exp: torch.Tensor,
        rotations: torch.Tensor,
        transforms: torch.Tensor,
        transl: torch.Tensor,
    ) -> torch.Tensor:
        """Blendshapes, pose correctives and skinning for the subset's vertices: (B, M, 3)."""
        batch = rotations.shape[0]
        coefficients = torch.cat([shape, exp, pose_features(rotations)], dim=1)[..., None]
        rest = subset.template + (subset.basis @ coefficients).reshape(batch, -1, 3)
        blended = (subset.weights @ transforms.reshape(batch, self.n_joints, 12)).reshape(batch, -1, 3, 4)
        return (blended[..., :3] @ rest[..., None])[..., 0] + blended[..., 3] + transl[:, None]

    # ------------------------------------------------------------------------------------------- evaluation
    def check_params(self, shape: torch.Tensor, exp: torch.Tensor, pose: torch.Tensor, transl: torch.Tensor) -> None:
        """Raise UserError (one line) for parameters of the wrong shape or with NaN / infinite values."""
        batch = pose.shape[0] if pose.dim() == 3 else None
        exp_size = self.n_expression if exp.dim() == 2 and exp.shape[1] == self.n_expression else self.n_exp
        expected = {
            "shape": (shape, (batch, self.n_shape)), "exp": (exp, (batch, exp_size)),
            "pose": (pose, (batch, self.n_joints, 3)), "transl": (transl, (batch, 3)),
        }  # fmt: skip
        for name, (value, size) in expected.items():
            if tuple(value.shape) != size:
                pretty = "(B, " + ", ".join(str(s) for s in size[1:]) + ")"
                raise UserError(f"FLAME parameter '{name}' has shape {tuple(value.shape)}, expected {pretty} for the {self.model.name}")
            if not bool(torch.isfinite(value).all()):
                raise UserError(f"FLAME parameter '{name}' contains NaN or infinite values")

    def expression(self, exp: torch.Tensor, eyelids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n_expression): FLAME's expression (B, n_exp) with the eyelid weights (B, n_eyelids) after it
        (None: open); ``exp`` as it is when it already holds them or the layer has no eyelids."""
        if exp.shape[-1] == self.n_expression:
            return exp
        if eyelids is None:
            eyelids = exp.new_zeros(*exp.shape[:-1], self.n_eyelids)
        return torch.cat([exp, eyelids.to(exp)], dim=-1)

    def vertices(self, shape: torch.Tensor, exp: torch.Tensor, pose: torch.Tensor, transl: torch.Tensor) -> torch.Tensor:
        """The dense posed mesh (B, V, 3)."""
        self.check_params(shape, exp, pose, transl)
        exp = self.expression(exp)
        rotations = rodrigues(pose)
        transforms = self.skinning_transforms(rotations, self.rest_joints(shape, exp))
        return self._pose_vertices(self._dense_subset, shape, exp, rotations, transforms, transl)

    @property
    def _dense_subset(self) -> _VertexSubset:
        # The dense "subset" is the model itself; built lazily so the landmark-only path never pays for it.
        if not hasattr(self, "_dense"):
            self._dense = _VertexSubset.gather(self, torch.arange(self.v_template.shape[0], device=self.v_template.device))
        return self._dense

    def landmarks(self, shape: torch.Tensor, exp: torch.Tensor, pose: torch.Tensor, transl: torch.Tensor) -> Landmarks:
        """Only the landmark points: 68 (contour by head yaw), MediaPipe-embedded points and pupils."""
        self.check_params(shape, exp, pose, transl)
        exp = self.expression(exp)
        rotations = rodrigues(pose)
        transforms = self.skinning_transforms(rotations, self.rest_joints(shape, exp))
        batch = pose.shape[0]
        static = self._pose_vertices(self._static_subset, shape, exp, rotations, transforms, transl)
        static = (static.reshape(batch, -1, 3, 3) * self.static_bary[None, :, :, None]).sum(dim=2)
        parts = {name: static[:, part] for name, part in self.static_slices.items()}

        lmk68 = parts.get("full68")
        if self.has_contour:
            rows = self.contour_rows(rotations)
            contour = self._contour_landmarks(rows, shape, exp, rotations, transforms, transl)
            lmk68 = torch.cat([contour, parts["static68"]], dim=1)
        return Landmarks(lmk68=lmk68, mediapipe=parts.get("mediapipe"), eyes=parts.get("eyes"))

    def contour_rows(self, rotations: torch.Tensor) -> torch.Tensor:
        """(B,) row of the contour table for the head yaw, computed as smplx's FLAME does.

        smplx takes the yaw of the root rotation alone; DECA also chains in the neck's rotation. The two agree
        whenever the neck is not posed, which is the tracker's default.
        """
        root = rotations[:, ROOT]
        # smplx's rot_mat_to_euler: the rotation about y of a y-x-z decomposition.
        yaw = torch.atan2(-root[:, 2, 0], torch.sqrt(root[:, 0, 0] ** 2 + root[:, 1, 0] ** 2))
        return _contour_rows(-torch.rad2deg(yaw))

    def _contour_landmarks(
        self,
        rows: torch.Tensor,
        shape: torch.Tensor,
        exp: torch.Tensor,
        rotations: torch.Tensor,
        transforms: torch.Tensor,
        transl: torch.Tensor,
    ) -> torch.Tensor:
        """(B, 17, 3) contour points, each item posing only the vertices of its own yaw row."""
        subset = self._contour_subset.select(rows)
        points = self._pose_vertices(subset, shape, exp, rotations, transforms, transl)
        return (points.reshape(rows.shape[0], 17, 3, 3) * self.contour_bary[rows][..., None]).sum(dim=2)

    def zero_params(self, batch: int = 1) -> dict[str, torch.Tensor]:
        """Neutral parameters on the layer's device and dtype, one entry per evaluation argument."""
        options = {"dtype": self.v_template.dtype, "device": self.v_template.device}
        return {
            "shape": torch.zeros(batch, self.n_shape, **options),
            "exp": torch.zeros(batch, self.n_exp, **options),
            "pose": torch.zeros(batch, self.n_joints, 3, **options),
            "transl": torch.zeros(batch, 3, **options),
        }

"""Landmarks of a head model as functions of its parameters, with analytic Jacobians, for the solver.

A landmark is a barycentric point on a skinned triangle, so it is exactly a sum over joints:

    l = sum_j  Rw_j (S_lj - W_lj Jr_j) + W_lj Pw_j + transl

where W_lj = sum_k b_k w_{v_k j} is the landmark's skinning weight for joint j, S_lj = sum_k b_k w_{v_k j} q_k is
its weighted rest point (linear in the shape/expression coefficients and in the pose-corrective features),
Jr_j are the rest joints, and (Rw_j, Pw_j) the world rotation and location of joint j. Precomputing S_lj's
bases once turns every evaluation into a handful of batched products over (landmarks x joints), and the
Jacobians follow in closed form:

- coefficients c (shape, expression): dl/dc = sum_j Rw_j (dS_lj/dc - W_lj dJr_j/dc) + W_lj dPw_j/dc;
- a rotation increment delta_k applied on the right of joint k's local rotation turns everything below k
  about Pw_k by the world axis Rw_k delta_k: dl/ddelta_k = -sum_{j below k} [c_lj - W_lj Pw_k]x Rw_k, plus
  the pose correctives' change through d vec(R_k) = vec(R_k [delta]x);
- translation: the identity.

This matches FlameLayer.landmarks exactly (tests compare both and check the Jacobians by finite differences).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.flame import FlameLayer, pose_features, world_transforms

#: Joined contour+static tables kept per model (about 1 MB each for FLAME): the yaw rows a head visits.
_JOINED_TABLES_KEPT = 16

#: Landmark groups a fit can use, in the order they are stacked.
GROUPS = ("lmk68", "mediapipe", "eyes")


@dataclass
class LandmarkEvaluation:
    """Landmarks (B, L, 3) in model/world space; Jacobians are filled in by LandmarkModel.add_jacobians."""

    points: torch.Tensor
    d_coeffs: torch.Tensor | None = None  # (B, L, 3, C)
    d_rotations: torch.Tensor | None = None  # (B, L, 3, J, 3): right-multiplied increments per joint
    # What the Jacobians need from the evaluation, so that a candidate step that is refused costs no Jacobian.
    _coeffs: torch.Tensor | None = None
    _rotations: torch.Tensor | None = None
    _kinematics: _Kinematics | None = None
    _parts: list[tuple[LandmarkTable, torch.Tensor]] | None = None  # (table, contributions (B, L, Ja, 3))


def _skew(vectors: torch.Tensor) -> torch.Tensor:
    x, y, z = vectors.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*vectors.shape, 3)


class LandmarkTable:
    """Per-(landmark, active joint) rest points and their bases for a list of landmarks.

    Bases are stored joint-major, (..., Ja, 3, L, C), so that rotating them by each joint's world rotation is
    one batched product without copies. Joints with zero weight on every landmark are left out.
    """

    def __init__(self, weight: torch.Tensor, rest: torch.Tensor, coeff_basis: torch.Tensor, pose_basis: torch.Tensor, joints: torch.Tensor) -> None:
        self.weight = weight  # (..., L, Ja)
        self.rest = rest  # (..., L, Ja, 3)
        self.coeff_basis = coeff_basis  # (..., Ja, 3, L, C)
        self.pose_basis = pose_basis  # (..., Ja, 3, L, P)
        self.joints = joints  # (Ja,) indices of the active joints
        # The demo head has none; skipping them saves most of the rotation Jacobian's work.
        self.has_pose_correctives = bool(pose_basis.abs().amax() > 0)

    @classmethod
    def build(cls, layer: FlameLayer, vertex_idx: torch.Tensor, bary: torch.Tensor, joints: torch.Tensor) -> LandmarkTable:
        # vertex_idx, bary: (..., L, 3); leading dims (if any) index alternatives such as contour rows.
        skin = (layer.lbs_weights[vertex_idx] * bary[..., None])[..., joints]  # (..., L, 3 corners, Ja): b_k w_kj
        basis = torch.cat([layer.shapedirs, layer.exprdirs], dim=-1)[vertex_idx]  # (..., L, 3 corners, 3, C)
        return cls(
            skin.sum(dim=-2),
            torch.einsum("...lkj,...lkx->...ljx", skin, layer.v_template[vertex_idx]),
            torch.einsum("...lkj,...lkxc->...jxlc", skin, basis).contiguous(),
            torch.einsum("...lkj,...lkxp->...jxlp", skin, layer.posedirs[vertex_idx]).contiguous(),
            joints,
        )

    def select(self, rows: torch.Tensor) -> LandmarkTable:
        """One alternative per batch item: (B,) rows of a table with a leading alternatives dimension."""
        return LandmarkTable(self.weight[rows], self.rest[rows], self.coeff_basis[rows], self.pose_basis[rows], self.joints)

    def concat(self, other: LandmarkTable) -> LandmarkTable:
        """The landmarks of ``self`` followed by those of ``other`` (unbatched tables on the same joints)."""
        return LandmarkTable(
            torch.cat([self.weight, other.weight]), torch.cat([self.rest, other.rest]),
            torch.cat([self.coeff_basis, other.coeff_basis], dim=2), torch.cat([self.pose_basis, other.pose_basis], dim=2),
            self.joints,
        )

    def with_fixed_shape(self, shape: torch.Tensor, n_shape: int) -> LandmarkTable:
        """The same landmarks with the identity coefficients ``shape`` (n_shape,) folded into the rest points."""
        shaped = torch.einsum("...jxlc,c->...ljx", self.coeff_basis[..., :n_shape], shape)
        return LandmarkTable(self.weight, self.rest + shaped, self.coeff_basis[..., n_shape:].contiguous(), self.pose_basis, self.joints)


@dataclass
class _Kinematics:
    rest_joints: torch.Tensor  # (B, J, 3)
    world_rot: torch.Tensor  # (B, J, 3, 3)
    world_pos: torch.Tensor  # (B, J, 3)
    d_pos: torch.Tensor | None  # (B, J, 3, C): d world_pos / d coeffs
    pose_feature: torch.Tensor  # (B, 9 (J-1))


class LandmarkModel:
    """The landmark points of a FlameLayer for chosen groups, evaluated with analytic Jacobians.

    ``coeffs`` are shape then expression, (B, n_shape + n_expression) (the layer's expression includes its
    eyelid weights, if any), or expression alone for a model made by
    :meth:`with_fixed_shape`. ``rotations`` are local joint rotations (B, J, 3, 3). Landmarks are ordered by
    group (GROUPS); each group's slice is in ``slices``.
    """

    def __init__(self, layer: FlameLayer, groups: tuple[str, ...] = GROUPS) -> None:
        self.layer = layer
        self.n_joints = layer.n_joints
        self.parents = layer.parents
        self.n_coeffs = layer.n_shape + layer.n_expression
        self.slices: dict[str, slice] = {}
        static_idx, static_bary = [], []
        with_contour = layer.has_contour and "lmk68" in groups
        offset = 17 if with_contour else 0
        if with_contour:
            self.slices["lmk68"] = slice(0, 68)
        for name, part in layer.static_slices.items():
            group = "lmk68" if name in ("static68", "full68") else name
            if group not in groups:
                continue
            static_idx.append(layer.static_vertex_idx[part])
            static_bary.append(layer.static_bary[part])
            count = part.stop - part.start
            self.slices.setdefault(group, slice(offset, offset + count))
            offset += count
        self.n_landmarks = offset
        static_idx, static_bary = torch.cat(static_idx), torch.cat(static_bary)
        # Joints that move any landmark (the rest have zero weight everywhere and are left out of the tables).
        used = [layer.lbs_weights[static_idx].reshape(-1, self.n_joints)]
        if with_contour:
            used.append(layer.lbs_weights[layer.contour_vertex_idx].reshape(-1, self.n_joints))
        joints = torch.nonzero(torch.cat(used).abs().sum(0) > 0).flatten()
        self.contour = LandmarkTable.build(layer, layer.contour_vertex_idx, layer.contour_bary, joints) if with_contour else None
        self.static = LandmarkTable.build(layer, static_idx, static_bary, joints)
        self._joined: dict[int, LandmarkTable] = {}  # contour row -> contour + static table, for single frames
        self.joint_coeff_basis = torch.cat([layer.j_shapedirs, layer.j_exprdirs], dim=-1)  # (J, 3, C)
        self.joint_rest = layer.j_template
        self.subtree = self._subtree_masks()
        self._generators = _skew(torch.eye(3, dtype=self.joint_rest.dtype, device=self.joint_rest.device))  # [e_a]x

    def with_fixed_shape(self, shape: torch.Tensor) -> LandmarkModel:
        """A model for per-frame tracking: identity ``shape`` (n_shape,) frozen, coefficients = expression."""
        n_shape = self.layer.n_shape
        fixed = LandmarkModel.__new__(LandmarkModel)
        fixed.__dict__.update(self.__dict__)
        fixed.n_coeffs = self.n_coeffs - n_shape
        fixed.contour = self.contour.with_fixed_shape(shape, n_shape) if self.contour is not None else None
        fixed.static = self.static.with_fixed_shape(shape, n_shape)
        fixed._joined = {}
        fixed.joint_rest = self.joint_rest + torch.einsum("jxc,c->jx", self.joint_coeff_basis[..., :n_shape], shape)
        fixed.joint_coeff_basis = self.joint_coeff_basis[..., n_shape:].contiguous()
        return fixed

    def _subtree_masks(self) -> torch.Tensor:
        """(J, J) mask: [k, j] is 1 when joint j is k or below k in the tree."""
        mask = torch.zeros(self.n_joints, self.n_joints, dtype=self.joint_rest.dtype, device=self.joint_rest.device)
        for joint in range(self.n_joints):
            ancestor = joint
            while ancestor != -1:
                mask[ancestor, joint] = 1
                ancestor = self.parents[ancestor]
        return mask

    def _kinematics(self, coeffs: torch.Tensor, rotations: torch.Tensor) -> _Kinematics:
        rest_joints = self.joint_rest + (self.joint_coeff_basis @ coeffs.T).permute(2, 0, 1)
        world_rot, world_pos = world_transforms(rotations, rest_joints, self.parents)
        return _Kinematics(rest_joints, world_rot, world_pos, None, pose_features(rotations))

    def _joint_position_jacobian(self, kin: _Kinematics) -> torch.Tensor:
        """(B, J, 3, C) d world joint positions / d coefficients, down the kinematic chain."""
        batch = kin.world_rot.shape[0]
        d_pos = [self.joint_coeff_basis[0].expand(batch, -1, -1)]
        for joint in range(1, self.n_joints):
            parent = self.parents[joint]
            d_offset = self.joint_coeff_basis[joint] - self.joint_coeff_basis[parent]
            d_pos.append(kin.world_rot[:, parent] @ d_offset + d_pos[parent])
        return torch.stack(d_pos, dim=1)

    def _tables(self, rotations: torch.Tensor) -> list[LandmarkTable]:
        """The landmark tables for this pose: contour rows chosen by head yaw, then the static points."""
        if self.contour is None:
            return [self.static]
        rows = self.layer.contour_rows(rotations)
        if rows.shape[0] > 1:
            return [self.contour.select(rows), self.static]
        return [self.single_frame_table(int(rows[0]))]

    def single_frame_table(self, contour_row: int | None) -> LandmarkTable:
        """All landmarks of one frame whose head yaw selects ``contour_row`` (None for a model without contour).

        Joined tables are built once per row and kept: the row changes only when the yaw crosses a whole
        degree, and one table halves the work of two.
        """
        if self.contour is None:
            return self.static
        if contour_row not in self._joined:
            if len(self._joined) >= _JOINED_TABLES_KEPT:
                del self._joined[next(iter(self._joined))]  # the oldest row
            row = torch.tensor(contour_row, device=self.joint_rest.device)
            self._joined[contour_row] = self.contour.select(row).concat(self.static)
        return self._joined[contour_row]

    def evaluate(self, coeffs: torch.Tensor, rotations: torch.Tensor, transl: torch.Tensor, jacobians: bool = True) -> LandmarkEvaluation:
        kin = self._kinematics(coeffs, rotations)
        parts = [(table, self._contributions(table, coeffs, kin)) for table in self._tables(rotations)]
        points = torch.cat([c.sum(dim=2) for _, c in parts], dim=1) if len(parts) > 1 else parts[0][1].sum(dim=2)
        evaluation = LandmarkEvaluation(points + transl[:, None], None, None, coeffs, rotations, kin, parts)
        if jacobians:
            self.add_jacobians(evaluation)
        return evaluation

    def points(self, coeffs: torch.Tensor, rotations: torch.Tensor, transl: torch.Tensor) -> torch.Tensor:
        """(B, L, 3) the landmarks alone, as :meth:`evaluate` gives them, for long batches (a whole track).

        Without the per-joint contributions that the Jacobians need: each landmark is summed over the joints
        in two batched products, l = sum_j Rw_j S_lj + W_lj (Pw_j - Rw_j Jr_j), with no (B, L, Ja, 3) posed
        intermediates.
        """
        kin = self._kinematics(coeffs, rotations)
        parts = [self._posed_points(table, coeffs, kin) for table in self._tables(rotations)]
        return (torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]) + transl[:, None]

    def _posed_points(self, table: LandmarkTable, coeffs: torch.Tensor, kin: _Kinematics) -> torch.Tensor:
        """(B, L, 3) one table's landmarks, posed (without the translation)."""
        joints = table.joints
        batch, count, active = coeffs.shape[0], table.weight.shape[-2], len(joints)
        # Weighted rest points joint-major, (B, Ja * 3, L): rows are (joint, axis), as the world rotations' columns.
        rest = self._joint_major_times(table.coeff_basis, coeffs)
        if table.has_pose_correctives:
            rest = rest + self._joint_major_times(table.pose_basis, kin.pose_feature)
        rest = (rest.reshape(batch, active, 3, count) + table.rest.movedim(-3, -1)).reshape(batch, active * 3, count)
        rot_w = kin.world_rot[:, joints]  # (B, Ja, 3, 3)
        rotated = rot_w.permute(0, 2, 1, 3).reshape(batch, 3, active * 3) @ rest  # (B, 3, L): sum_j Rw_j S_lj
        offsets = kin.world_pos[:, joints] - (rot_w @ kin.rest_joints[:, joints, :, None])[..., 0]  # (B, Ja, 3)
        return rotated.transpose(1, 2) + self._table_weight(table) @ offsets

    @staticmethod
    def _joint_major_times(basis: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """A joint-major basis (.., Ja, 3, L, N) times per-item values (B, N): (B, Ja * 3 * L), contiguous."""
        if basis.dim() == 4:  # shared by the batch: one product
            return values @ basis.reshape(-1, basis.shape[-1]).T
        return (basis.reshape(basis.shape[0], -1, basis.shape[-1]) @ values[..., None])[..., 0]

    def add_jacobians(self, evaluation: LandmarkEvaluation) -> LandmarkEvaluation:
        """Fill in d_coeffs and d_rotations of an evaluation (once; later calls do nothing)."""
        if evaluation.d_coeffs is not None:
            return evaluation
        kin = evaluation._kinematics
        kin.d_pos = self._joint_position_jacobian(kin)
        jacobians = [self._part_jacobians(table, c, evaluation._coeffs, evaluation._rotations, kin) for table, c in evaluation._parts]
        if len(jacobians) == 1:
            evaluation.d_coeffs, evaluation.d_rotations = jacobians[0]
        else:
            evaluation.d_coeffs = torch.cat([j[0] for j in jacobians], dim=1)
            evaluation.d_rotations = torch.cat([j[1] for j in jacobians], dim=1)
        return evaluation

    @staticmethod
    def _table_weight(table: LandmarkTable) -> torch.Tensor:
        return table.weight if table.weight.dim() == 3 else table.weight[None]  # (B|1, L, Ja)

    @staticmethod
    def _basis_times(basis: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """A joint-major basis (.., Ja, 3, L, N) times per-item values (B, N): (B, L, Ja, 3).

        Explicit products rather than einsum: on these small tensors einsum's planning costs more than the work.
        """
        if basis.dim() == 4:  # shared by the batch: one product
            return (basis @ values.T).permute(3, 2, 0, 1)
        return (basis @ values[:, None, None, :, None])[..., 0].permute(0, 3, 1, 2)

    def _contributions(self, table: LandmarkTable, coeffs: torch.Tensor, kin: _Kinematics) -> torch.Tensor:
        """(B, L, Ja, 3): each active joint's share of each landmark, posed."""
        joints = table.joints
        weight = self._table_weight(table)
        rest = table.rest + self._basis_times(table.coeff_basis, coeffs)
        if table.has_pose_correctives:
            rest = rest + self._basis_times(table.pose_basis, kin.pose_feature)
        local = rest - weight[..., None] * kin.rest_joints[:, None, joints]
        rotated = (kin.world_rot[:, None, joints] @ local[..., None])[..., 0]
        return rotated + weight[..., None] * kin.world_pos[:, None, joints]

    def _part_jacobians(
        self, table: LandmarkTable, contributions: torch.Tensor, coeffs: torch.Tensor, rotations: torch.Tensor, kin: _Kinematics
    ) -> tuple[torch.Tensor, torch.Tensor]:
        joints = table.joints
        rot_w = kin.world_rot[:, joints]
        weight = self._table_weight(table)
        # Rotating the joint-major bases by each joint's world rotation and summing over joints is one
        # product: (B, 3, Ja*3) @ (Ja*3, L*C), with no copy of the (large) bases.
        batch, count = coeffs.shape[0], weight.shape[1]
        rotation_rows = rot_w.permute(0, 2, 1, 3).reshape(batch, 3, -1)

        def rotate_sum(basis: torch.Tensor) -> torch.Tensor:  # (.., Ja, 3, L, N) -> (B, L, 3, N)
            flat = basis.reshape(*basis.shape[:-4], basis.shape[-4] * 3, -1)
            return (rotation_rows @ flat).reshape(batch, 3, count, -1).transpose(1, 2)

        # Coefficients: sum_j Rw_j dS_lj/dc + W_lj (dPw_j/dc - Rw_j dJr_j/dc).
        joint_term = kin.d_pos[:, joints] - rot_w @ self.joint_coeff_basis[joints]  # (B, Ja, 3, C)
        joint_share = weight.expand(batch, -1, -1) @ joint_term.reshape(batch, len(joints), -1)  # (B, L, 3C)
        d_coeffs = rotate_sum(table.coeff_basis) + joint_share.reshape(batch, count, 3, -1)

        # Rotations: rigid turn of each subtree about its joint, plus the pose correctives' change.
        subtree = self.subtree[:, joints]  # (J, Ja)
        arm = subtree @ contributions - (weight @ subtree.T)[..., None] * kin.world_pos[:, None]  # (B, L, J, 3)
        d_rot = -_skew(arm) @ kin.world_rot[:, None]  # (B, L, J, 3, 3)
        if table.has_pose_correctives:
            # d vec(R_k)/d delta_a = vec(R_k [e_a]x); pose features exist for joints 1..J-1.
            d_feature = (rotations[:, 1:, None] @ self._generators).permute(0, 1, 3, 4, 2).reshape(batch, self.n_joints - 1, 9, 3)
            rotated_pose = rotate_sum(table.pose_basis).reshape(batch, count, 3, self.n_joints - 1, 9)
            d_rot[:, :, 1:] += rotated_pose.transpose(2, 3) @ d_feature[:, None]
        return d_coeffs, d_rot.permute(0, 1, 3, 2, 4)

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

from engine.flame import FlameLayer

#: Landmark groups a fit can use, in the order they are stacked.
GROUPS = ("lmk68", "mediapipe", "eyes")


@dataclass
class LandmarkEvaluation:
    """Landmarks (B, L, 3) in model/world space and, when asked for, their Jacobians."""

    points: torch.Tensor
    d_coeffs: torch.Tensor | None = None  # (B, L, 3, C)
    d_rotations: torch.Tensor | None = None  # (B, L, 3, J, 3): right-multiplied increments per joint
    world_rotations: torch.Tensor | None = None  # (B, J, 3, 3)


def _skew(vectors: torch.Tensor) -> torch.Tensor:
    x, y, z = vectors.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*vectors.shape, 3)


class _Table:
    """Per-(landmark, joint) rest points and their bases for a fixed list of landmarks."""

    def __init__(self, layer: FlameLayer, vertex_idx: torch.Tensor, bary: torch.Tensor) -> None:
        # vertex_idx, bary: (..., N, 3); the leading dims (if any) index alternatives such as contour rows.
        weights = layer.lbs_weights[vertex_idx] * bary[..., None]  # (..., N, 3, J): b_k w_kj
        self.weight = weights.sum(dim=-2)  # (..., N, J)
        basis = torch.cat([layer.shapedirs, layer.exprdirs], dim=-1)[vertex_idx]  # (..., N, 3, 3xyz, C)
        self.rest = torch.einsum("...kj,...kx->...jx", weights, layer.v_template[vertex_idx])  # (..., N, J, 3)
        self.coeff_basis = torch.einsum("...kj,...kxc->...jxc", weights, basis)  # (..., N, J, 3, C)
        self.pose_basis = torch.einsum("...kj,...kxp->...jxp", weights, layer.posedirs[vertex_idx])

    @classmethod
    def _of(cls, weight: torch.Tensor, rest: torch.Tensor, coeff_basis: torch.Tensor, pose_basis: torch.Tensor) -> _Table:
        table = cls.__new__(cls)
        table.weight, table.rest, table.coeff_basis, table.pose_basis = weight, rest, coeff_basis, pose_basis
        return table

    def select(self, rows: torch.Tensor) -> _Table:
        """One alternative per batch item: (B,) rows of a table with a leading alternatives dimension."""
        return _Table._of(self.weight[rows], self.rest[rows], self.coeff_basis[rows], self.pose_basis[rows])

    def expand(self, batch: int) -> _Table:
        """The same landmarks for every batch item (views, no copies)."""
        return _Table._of(*(a.expand(batch, *a.shape) for a in (self.weight, self.rest, self.coeff_basis, self.pose_basis)))

    def concat(self, other: _Table) -> _Table:
        """Landmarks of ``self`` followed by those of ``other``; both batched."""
        pairs = zip((self.weight, self.rest, self.coeff_basis, self.pose_basis), (other.weight, other.rest, other.coeff_basis, other.pose_basis))
        return _Table._of(*(torch.cat([a, b], dim=1) for a, b in pairs))


class LandmarkModel:
    """The landmark points of a FlameLayer for chosen groups, evaluated with analytic Jacobians.

    Coefficients ``coeffs`` are shape then expression, (B, n_shape + n_exp). ``rotations`` are local joint
    rotations (B, J, 3, 3). The landmarks are ordered by group (GROUPS), each group's slice in ``slices``.
    """

    def __init__(self, layer: FlameLayer, groups: tuple[str, ...] = GROUPS) -> None:
        self.layer = layer
        self.n_joints = layer.n_joints
        self.parents = layer.parents
        self.n_coeffs = layer.n_shape + layer.n_exp
        self.groups: list[str] = []
        self.slices: dict[str, slice] = {}
        static_idx, static_bary = [], []
        offset = 0
        contour_rows = 17 if layer.has_contour and "lmk68" in groups else 0
        offset += contour_rows
        if contour_rows:
            self.slices["lmk68"] = slice(0, 68)
            self.groups.append("lmk68")
        for name, part in layer._static_slices.items():
            group = "lmk68" if name in ("static68", "full68") else name
            if group not in groups:
                continue
            static_idx.append(layer.static_vertex_idx[part])
            static_bary.append(layer.static_bary[part])
            count = part.stop - part.start
            if group not in self.slices:
                self.slices[group] = slice(offset, offset + count)
                self.groups.append(group)
            offset += count
        self.n_landmarks = offset
        self.contour = _Table(layer, layer.contour_vertex_idx, layer.contour_bary) if contour_rows else None
        self.static = _Table(layer, torch.cat(static_idx), torch.cat(static_bary))
        self.joint_coeff_basis = torch.cat([layer.j_shapedirs, layer.j_exprdirs], dim=-1)  # (J, 3, C)
        self.joint_rest = layer.j_template
        self._subtree = self._subtree_masks()

    def _subtree_masks(self) -> torch.Tensor:
        """(J, J) mask: [k, j] is 1 when joint j is k or below k in the tree."""
        mask = torch.zeros(self.n_joints, self.n_joints, dtype=self.joint_rest.dtype, device=self.joint_rest.device)
        for joint in range(self.n_joints):
            ancestor = joint
            while ancestor != -1:
                mask[ancestor, joint] = 1
                ancestor = self.parents[ancestor]
        return mask

    def table(self, rotations: torch.Tensor) -> _Table:
        """The batched landmark table for this pose: the contour row the head yaw selects, then static points."""
        static = self.static.expand(rotations.shape[0])
        if self.contour is None:
            return static
        return self.contour.select(self.layer.contour_rows(rotations)).concat(static)

    def evaluate(
        self,
        coeffs: torch.Tensor,
        rotations: torch.Tensor,
        transl: torch.Tensor,
        jacobians: bool = True,
        table: _Table | None = None,
    ) -> LandmarkEvaluation:
        batch = coeffs.shape[0]
        table = self.table(rotations) if table is None else table
        eye = torch.eye(3, dtype=coeffs.dtype, device=coeffs.device)

        rest_joints = self.joint_rest + torch.einsum("jxc,bc->bjx", self.joint_coeff_basis, coeffs)
        world_rot, world_pos = [rotations[:, 0]], [rest_joints[:, 0]]
        d_pos_d_coeffs = [self.joint_coeff_basis[0].expand(batch, -1, -1)] if jacobians else []
        for joint in range(1, self.n_joints):
            parent = self.parents[joint]
            world_rot.append(world_rot[parent] @ rotations[:, joint])
            offset = rest_joints[:, joint] - rest_joints[:, parent]
            world_pos.append((world_rot[parent] @ offset[..., None])[..., 0] + world_pos[parent])
            if jacobians:
                d_offset = self.joint_coeff_basis[joint] - self.joint_coeff_basis[parent]
                d_pos_d_coeffs.append(world_rot[parent] @ d_offset + d_pos_d_coeffs[parent])
        rot_w = torch.stack(world_rot, dim=1)  # (B, J, 3, 3)
        pos_w = torch.stack(world_pos, dim=1)  # (B, J, 3)

        pose_feature = (rotations[:, 1:] - eye).reshape(batch, -1)
        rest = (
            table.rest
            + torch.einsum("bljxc,bc->bljx", table.coeff_basis, coeffs)
            + torch.einsum("bljxp,bp->bljx", table.pose_basis, pose_feature)
        )  # (B, L, J, 3)
        weight = table.weight  # (B, L, J)
        local = rest - weight[..., None] * rest_joints[:, None]
        contributions = torch.einsum("bjxy,bljy->bljx", rot_w, local) + weight[..., None] * pos_w[:, None]
        points = contributions.sum(dim=2) + transl[:, None]
        if not jacobians:
            return LandmarkEvaluation(points)

        # Coefficients: through the rest points, the rest joints and the joints' world positions.
        d_rest = table.coeff_basis - weight[..., None, None] * self.joint_coeff_basis  # (B, L, J, 3, C)
        d_pos = torch.stack(d_pos_d_coeffs, dim=1)  # (B, J, 3, C)
        d_coeffs = torch.einsum("bjxy,bljyc->blxc", rot_w, d_rest) + torch.einsum("blj,bjxc->blxc", weight, d_pos)

        # Rotations: rigid turn of each subtree about its joint, plus the pose correctives' change.
        arms = contributions[:, :, None] - weight[:, :, None, :, None] * pos_w[:, None, :, None]  # (B,L,K,J,3)
        arm = torch.einsum("kj,blkjx->blkx", self._subtree, arms)  # (B, L, K, 3)
        d_rot = -_skew(arm) @ rot_w[:, None]  # (B, L, K, 3, 3)
        # d vec(R_k)/d delta = vec(R_k [e_a]x) for a in x, y, z; pose features exist for joints 1..J-1.
        generators = _skew(eye)  # (3 axes, 3, 3)
        d_feature = torch.einsum("bkxy,ayz->bkxza", rotations[:, 1:], generators).reshape(batch, self.n_joints - 1, 9, 3)
        pose_basis = table.pose_basis.reshape(*table.pose_basis.shape[:-1], self.n_joints - 1, 9)
        d_rest_rot = torch.einsum("bljxkf,bkfa->bljxka", pose_basis, d_feature)  # (B, L, J, 3, K-1, 3)
        d_rot[:, :, 1:] += torch.einsum("bjxy,bljyka->blkxa", rot_w, d_rest_rot)
        return LandmarkEvaluation(points, d_coeffs, d_rot.permute(0, 1, 3, 2, 4), rot_w)


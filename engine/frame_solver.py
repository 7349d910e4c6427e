"""The per-frame tracking solve of one frame on the CPU, in float64 NumPy on preallocated buffers.

:class:`engine.fitting.FrameFitter` solves batches with PyTorch on any device; for the live case (one frame,
about 200 residuals x 60 unknowns) its cost is PyTorch's per-operation overhead, not arithmetic. This solver
runs the same Levenberg-Marquardt iterations (same residuals, priors, damping, chord steps and stopping
rules, see FrameFitter.fit), with the work laid out so that each step is a few products on buffers made
once per identity:

- points: every landmark is sum_j Rw_j S_lj + W_lj o_j + transl (see engine.landmark_model), i.e. one
  product M D of a (3, 4 Ja + 1) matrix of world rotations, joint offsets and translation with a stacked
  (4 Ja + 1, L) matrix of rest shares S, skinning weights W and ones. S is one matrix-vector product of a
  basis in [expression, pose features, 1], over only the (landmark, joint) pairs with a skinning weight;
- Jacobian: the bases rotated by the world rotations in one product (expression and pose-corrective columns
  together), the arms of every fitted joint in one product like the points, their cross products with the
  joint axes in one batched product, and the projection applied per row;
- normal equations: H = (sqrt(w) J)^T (sqrt(w) J) (a symmetric rank-k product) and one LAPACK positive
  definite solve.

Everything that depends only on the identity and the camera (tables per contour row, index arrays, prior
weights) is built in the constructor, which the tracker runs when it adopts an identity, off the hot path.
Results equal FrameFitter's in float64 to rounding (tests compare both on synthetic sequences).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from engine.camera import MIN_DEPTH
from engine.fitting import FitConfig, FitResult, FrameBlock, Targets, fitted_joints, landmark_weights
from engine.flame import GENERATORS, axis_angles, contour_row, rotation_matrices
from engine.frames import FrameParams
from engine.jit import compiled
from engine.landmark_model import LandmarkModel, LandmarkTable
from engine.timing import synchronizer

log = logging.getLogger(__name__)

_NEGATIVE_GENERATORS = -GENERATORS
_EYE = np.eye(3)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A float64 copy of a tensor on any device."""
    return tensor.numpy(force=True).astype(np.float64)


def _index(indices: list[int]) -> int | slice | np.ndarray:
    """The cheapest NumPy index that selects ``indices``: one integer, a slice, or else an array."""
    if len(set(indices)) == 1:
        return indices[0]
    if indices == list(range(indices[0], indices[-1] + 1)):
        return slice(indices[0], indices[-1] + 1)
    return np.array(indices)


class _Bases:
    """One LandmarkTable's landmarks (the static points, or every row of the contour) in the solver's layouts.

    A landmark's share of active joint a is T_a [S_la - W_la Jr_a; W_la], with T_a = [Rw_a | Pw_a] the joint's
    world transform: the rest joint Jr_a (linear in the expression) is folded into the rest share here.
    ``values`` gives these 4-vectors: rows (active joint, xyzw, landmark) that are not zero everywhere, columns
    [expression, pose features, 1]; ``positions`` says where each row goes in the stacked matrix D.
    ``rotated`` holds the Jacobian's bases joint-major, (3 Ja, L, width): per landmark the expression columns,
    then the pose-corrective columns of the fitted joints below the root.
    """

    def __init__(self, table: LandmarkTable, first: int, total: int, layout: _Layout, joint_rest: np.ndarray, joint_basis: np.ndarray) -> None:
        weight = np.swapaxes(_numpy(table.weight), -1, -2)  # (.., Ja, n)
        rest = np.moveaxis(_numpy(table.rest), -3, -1) - weight[..., None, :] * joint_rest[:, :, None]  # (.., Ja, 3, n)
        coeff = _numpy(table.coeff_basis) - weight[..., None, :, None] * joint_basis[:, :, None, :]  # (.., Ja, 3, n, E)
        lead = weight.shape[:-2]
        active, _, count, n_exp = coeff.shape[-4:]
        values = np.zeros((*lead, active, 4, count, layout.n_values))
        values[..., :3, :, :n_exp] = coeff
        if layout.corrected:
            pose = _numpy(table.pose_basis)  # (.., Ja, 3, n, 9 (J-1))
            values[..., :3, :, n_exp:-1] = pose
        values[..., :3, :, -1] = rest
        values[..., 3, :, -1] = weight
        values = values.reshape(*lead, active * 4 * count, -1)
        # Rows that are zero for every landmark (no skinning weight) are left out.
        keep = np.flatnonzero(np.abs(values).reshape(-1, *values.shape[-2:]).max(axis=(0, 2)) > 0)
        self.values = np.ascontiguousarray(values[..., keep, :])
        rows, landmarks = np.divmod(np.arange(active * 4 * count), count)
        self.positions = (rows * total + first + landmarks)[keep]
        self.count = count
        width = layout.width
        rotated = np.zeros((*lead, active * 3, count, width))
        rotated[..., :n_exp] = coeff.reshape(*lead, active * 3, count, n_exp)
        if layout.corrected:
            rotated[..., n_exp:] = pose[..., layout.pose_features].reshape(*lead, active * 3, count, -1)
        self.rotated = rotated.reshape(*lead, active * 3, count * width)


class _Layout:
    """Sizes and index arrays shared by the bases and buffers of one fitter."""

    def __init__(self, model: LandmarkModel, config: FitConfig) -> None:
        self.joints = fitted_joints(model.n_joints, config)
        self.n_exp = model.n_coeffs
        self.size = self.n_exp + 3 * len(self.joints) + 3
        self.active = model.static.joints.cpu().numpy()
        # Pose-corrective features are 9 per joint below the root: the fitted joints below the root move them.
        self.corrected = [joint for joint in self.joints if joint > 0] if model.static.has_pose_correctives else []
        if self.corrected and self.joints[1:] != self.corrected:
            raise ValueError("the root must be the first fitted joint")
        self.pose_features = np.concatenate([np.arange(9 * (j - 1), 9 * j) for j in self.corrected]) if self.corrected else None
        self.width = self.n_exp + 9 * len(self.corrected)
        self.n_values = self.n_exp + (9 * (model.n_joints - 1) if self.corrected else 0) + 1


class _Evaluation:
    """One state's landmarks, residuals and prior, in buffers reused from frame to frame (two per fitter:
    the current state's and a candidate's)."""

    def __init__(self, layout: _Layout, n_landmarks: int, n_joints: int) -> None:
        active = len(layout.active)
        self.values = np.zeros(layout.n_values)
        self.values[-1] = 1.0
        self.features = self.values[layout.n_exp : -1].reshape(-1, 9)
        # Joint transforms [R | t; 0 0 0 1]: local (rotation and offset from the parent), and in the world.
        self.local = np.zeros((n_joints, 4, 4))
        self.local[:, 3, 3] = 1.0
        self.world = self.local.copy()
        self.world_rot = self.world[:, :3, :3]
        self.world_pos = self.world[:, :3, 3]
        # D: the 4-vector shares of each active joint (4 Ja rows: xyz, then the skinning weight), and ones.
        # M: each active joint's world transform [Rw | Pw], and the translation.
        self.stacked = np.zeros((4 * active + 1, n_landmarks))
        self.stacked[-1] = 1.0
        self.weight_rows = self.stacked[: 4 * active].reshape(active, 4, n_landmarks)[:, 3]
        self.matrix = np.zeros((3, 4 * active + 1))
        self.transform_block = self.matrix[:, : 4 * active].reshape(3, active, 4)
        self.translation = self.matrix[:, -1]
        self.points = np.empty((3, n_landmarks))
        self.errors = np.empty((2, n_landmarks))
        self.row: int | None = None
        self.weights = np.empty(n_landmarks)
        self.squared = np.empty(n_landmarks)  # squared residual over the Cauchy scale squared
        self.cost = 0.0
        self.prior_gradient = np.empty(layout.size)
        self.prior_diagonal = self.prior_gradient


class _Frame:
    """One frame's observations in the solver's layout."""

    def __init__(self, targets: Targets, group_weights: np.ndarray, config: FitConfig, focal: float, center: tuple[float, float]) -> None:
        pixels = _numpy(targets.pixels[0]).T  # (2, L), NaN where not observed
        observed = targets.observed[0].numpy(force=True)
        self.face_size = float(targets.face_size[0])
        scale = config.noise * self.face_size  # pixels per unit of normalised residual
        # The residual (pixel - target) / scale as (points * focal_signs / depth + offsets) * unit_mask.
        self.focal_signs = np.array([[focal], [-focal]])
        self.offsets = np.where(observed, np.array(center)[:, None] - pixels, 0.0)
        self.unit_mask = observed / scale
        self.focal_over_scale = focal / scale
        self.group_weights = np.where(observed, group_weights, 0.0)
        self.cost_weights = self.group_weights * config.robust_scale**2


class CpuFrameFitter:
    """FrameFitter.fit for one frame at a time, in NumPy on the CPU, whatever device the model lives on.

    Built once per identity (``model`` from LandmarkModel.with_fixed_shape), like FrameFitter; every table and
    buffer the solve needs is made here.
    """

    def __init__(self, model: LandmarkModel, config: FitConfig) -> None:
        compile_kernels()
        self.model = model
        self.config = config
        layout = self.layout = _Layout(model, config)
        self.joints = layout.joints
        self.n_exp = n_exp = layout.n_exp
        self.size = size = layout.size
        parents = list(model.parents)
        # The kinematic tree level by level (children of the root, their children, ...): one product per level.
        depth = [0] * len(parents)
        for joint in range(1, len(parents)):
            depth[joint] = depth[parents[joint]] + 1
        self.levels = [
            (_index(level), _index([parents[j] for j in level]))
            for level in ([j for j in range(1, len(depth)) if depth[j] == d] for d in range(1, max(depth, default=0) + 1))
        ]
        self.joint_rest = _numpy(model.joint_rest)  # (J, 3)
        self.joint_coeff_basis = _numpy(model.joint_coeff_basis)  # (J, 3, E)
        self.joint_coeff_rows = self.joint_coeff_basis.reshape(-1, n_exp)
        self.joint_offset_basis = self.joint_coeff_basis - self.joint_coeff_basis[[max(p, 0) for p in parents]]
        # Each joint's offset from its parent (the root's from the origin), linear in the expression.
        self.local_rest = self.joint_rest - self.joint_rest[[max(p, 0) for p in parents]] * (np.array(parents) >= 0)[:, None]
        self.local_rest[0] = self.joint_rest[0]
        self.local_basis = self.joint_offset_basis.copy()
        self.local_basis[0] = self.joint_coeff_basis[0]
        self.local_basis = self.local_basis.reshape(-1, n_exp)
        active = self.active = _index(layout.active.tolist())
        self.fitted = _index(self.joints)
        # Which active joints move with each fitted joint (itself and those below it).
        self.subtree = _numpy(model.subtree)[np.ix_(self.joints, layout.active)]  # (F, Ja)
        n_contour = model.contour.weight.shape[-2] if model.contour is not None else 0
        self.n_landmarks = total = n_contour + model.static.weight.shape[-2]
        joint_rest, joint_basis = self.joint_rest[layout.active], self.joint_coeff_basis[layout.active]
        self.static = _Bases(model.static, n_contour, total, layout, joint_rest, joint_basis)
        self.contour = _Bases(model.contour, 0, total, layout, joint_rest, joint_basis) if model.contour is not None else None
        self.slots = [_Evaluation(layout, total, model.n_joints) for _ in range(2)]
        # Jacobian buffers: the bases rotated to the world (3, L, width), expression then pose-corrective columns.
        fitted = len(self.joints)
        self.rotated = np.zeros((3, total, layout.width))
        self.rotated_rows = self.rotated.reshape(3, total * layout.width)
        self.d_exp = self.rotated[:, :, :n_exp].transpose(1, 0, 2)  # (L, 3, E)
        self.d_pose = self.rotated[:, :, n_exp:].reshape(3 * total, -1)
        n_active = len(layout.active)
        self.arm_matrix = np.zeros((fitted * 3, 4 * n_active + 1))
        self.arm_block = self.arm_matrix[:, : 4 * n_active].reshape(fitted, 3, n_active, 4)
        self.subtree_block = self.subtree[:, None, :, None]
        # Block-diagonal (3 F, 9 F): row (k, c), column (x, k, a) holds (-[e_c]x Rw_k)[x, a].
        self.turns = np.zeros((3 * fitted, 9 * fitted))
        self.turn_blocks = self.turns.reshape(fitted, 3, 3, fitted, 3)
        self.fitted_index = np.arange(fitted)
        n_corrected = len(layout.corrected)
        self.pose_derivative = np.zeros((9 * n_corrected, 3 * n_corrected))
        self.pose_blocks = self.pose_derivative.reshape(n_corrected, 9, n_corrected, 3)
        self.corrected_index = np.arange(n_corrected)
        self.projection = np.zeros((total, 2, 3))
        self.jacobian = np.empty((total, 2, size))  # rows: landmark, then u and v
        self.scaled = np.empty((2 * total, size))  # sqrt(w) J, sqrt(w) e and the step: reused by every iteration
        self.scaled_residuals = np.empty(2 * total)
        self.step = np.empty(size)
        self.group_weights_source: torch.Tensor | None = None
        self.group_weights = np.empty(0)
        self._priors(config)

    def _priors(self, config: FitConfig) -> None:
        """The prior and motion weights of [exp, fitted joint angles, translation]: FrameFitter's, in NumPy."""
        block = FrameBlock(self.n_exp, self.joints, config, {"dtype": torch.float64, "device": "cpu"}, self.model.layer.n_eyelids)
        self.prior_weight, self.motion_weight = block.prior_weight.numpy(), block.motion_weight.numpy()
        self.coupling = block.coupling.numpy()
        self.jaw_opening = block.jaw_opening
        overclosed_weight = self.prior_weight.copy()
        overclosed_weight[self.jaw_opening] = config.priors.jaw_overclose
        # Per use (without, with a prediction), and per jaw (not, over-closed): the weights of the parameter
        # vector and of its change since the prediction, and the Hessian diagonal they give.
        self.prior_terms = []
        for motion in (np.zeros(self.size), self.motion_weight):
            weights = [np.stack([weight, motion]) for weight in (self.prior_weight, overclosed_weight)]
            self.prior_terms.append((weights, [weight + motion for weight in (self.prior_weight, overclosed_weight)]))

    # ------------------------------------------------------------------------------------------ evaluation
    def _evaluate(self, state: _State, frame: _Frame, anchor: _Anchor, slot: _Evaluation) -> _Evaluation:
        """Fill ``slot`` with the landmarks, residuals, cost and prior of ``state``."""
        exp, rotations = state.exp, state.rotations
        local, world = slot.local, slot.world
        local[:, :3, :3] = rotations
        local[:, :3, 3] = self.local_rest + (self.local_basis @ exp).reshape(-1, 3)
        world[0] = local[0]
        for joints, parents in self.levels:
            world[joints] = world[parents] @ local[joints]
        values = slot.values
        values[: self.n_exp] = exp
        if self.layout.corrected:
            np.subtract(rotations[1:].reshape(-1, 9), _EYE.ravel(), out=slot.features)
        stacked = slot.stacked
        stacked.put(self.static.positions, self.static.values @ values)
        if self.contour is not None:
            slot.row = row = contour_row(rotations[0])
            stacked.put(self.contour.positions, self.contour.values[row] @ values)
        # Every landmark is sum_j [Rw_j | Pw_j] [S_lj - W_lj Jr_j; W_lj] + transl: one product.
        slot.transform_block[...] = world[self.active, :3].transpose(1, 0, 2)
        slot.translation[:] = state.transl
        points = np.matmul(slot.matrix, stacked, out=slot.points)
        # u = f x / (-z) + cx, v = f (-y) / (-z) + cy; errors normalised, zero where not observed.
        errors = np.multiply(points[:2], frame.focal_signs / np.maximum(-points[2], MIN_DEPTH), out=slot.errors)
        errors += frame.offsets
        errors *= frame.unit_mask
        squared = errors * errors
        relative = np.add(squared[0], squared[1], out=slot.squared)
        relative *= 1.0 / self.config.robust_scale**2
        np.divide(frame.group_weights, 1.0 + relative, out=slot.weights)
        slot.cost = float(frame.cost_weights @ np.log1p(relative)) + self._prior(state, anchor, slot)
        return slot

    def _prior(self, state: _State, anchor: _Anchor, slot: _Evaluation) -> float:
        """The prior's cost; its gradient and Hessian diagonal go into ``slot`` (FrameBlock.prior in NumPy).

        The parameter vector [exp, joint angles, translation] and its change since the prediction are the two
        rows of one array, so that both terms are a few products.
        """
        rotations = state.rotations[self.fitted]
        rows = anchor.rows
        rows[:, : self.n_exp] = state.exp
        rows[:, self.n_exp : -3] = axis_angles(np.concatenate([rotations, anchor.inverse @ rotations])).reshape(2, -1)
        rows[:, -3:] = state.transl
        rows -= anchor.offset
        overclosed = bool(rows[0, self.jaw_opening] < 0)
        weighted = anchor.weights[overclosed] * rows
        coupled = rows[0] @ self.coupling
        np.add(weighted[0], weighted[1], out=slot.prior_gradient)
        slot.prior_gradient += coupled
        slot.prior_diagonal = anchor.diagonals[overclosed]
        return 0.5 * (float(np.vdot(weighted, rows)) + float(coupled @ rows[0]))

    def _jacobian(self, state: _State, slot: _Evaluation, frame: _Frame) -> np.ndarray:
        """(2L, size) d residual / d [exp, rotation increments of the fitted joints, translation], rows (landmark, u|v)."""
        world_rot, world_pos, active, n_exp = slot.world_rot, slot.world_pos, self.active, self.n_exp
        # The bases rotated to the world: expression and pose-corrective columns in one product per table.
        rotation_rows = slot.transform_block[:, :, :3].reshape(3, -1)
        if self.contour is not None:
            split = self.contour.count * self.layout.width
            np.matmul(rotation_rows, self.contour.rotated[slot.row], out=self.rotated_rows[:, :split])
            np.matmul(rotation_rows, self.static.rotated, out=self.rotated_rows[:, split:])
        else:
            np.matmul(rotation_rows, self.static.rotated, out=self.rotated_rows)
        # Projection u = f x / (-z), v = f (-y) / (-z), divided by the residual scale: a 2x3 matrix per landmark,
        # applied to each block of d points / d parameters in one batched product.
        points, projection, jacobian, fitted = slot.points, self.projection, self.jacobian, len(self.joints)
        inverse_depth = 1.0 / np.maximum(-points[2], MIN_DEPTH)
        scale = frame.focal_over_scale * inverse_depth
        projection[:, 0, 0] = scale
        np.negative(scale, out=projection[:, 1, 1])
        projection[:, 0, 2] = scale * points[0] * inverse_depth
        projection[:, 1, 2] = -scale * points[1] * inverse_depth
        # d points / d exp also moves the joints: + sum_j W_lj dPw_j/dc (the bases hold - Rw_j W_lj dJr_j/dc).
        d_pos = np.empty_like(self.joint_coeff_basis)
        d_pos[0] = self.joint_coeff_basis[0]
        for joints, parents in self.levels:
            d_pos[joints] = world_rot[parents] @ self.joint_offset_basis[joints] + d_pos[parents]
        joint_term = slot.weight_rows.T @ d_pos[active].reshape(slot.weight_rows.shape[0], -1)  # (L, 3 E)
        np.matmul(projection, self.d_exp + joint_term.reshape(-1, 3, n_exp), out=jacobian[:, :, :n_exp])
        # d points / d rotation increment a of joint k: -[arm_lk]x Rw_k e_a = sum_c arm_lkc (-[e_c]x Rw_k) e_a,
        # with arm_lk = sum over the joints below k of their shares - W_below Pw_k: one product with D, like
        # the points, then one with the block-diagonal matrix of the fitted joints' turns.
        np.multiply(slot.transform_block, self.subtree_block, out=self.arm_block)
        self.arm_block[..., 3] -= world_pos[self.fitted][:, :, None] * self.subtree[:, None, :]
        arms = self.arm_matrix @ slot.stacked  # (3 F, L)
        self.turn_blocks[self.fitted_index, :, :, self.fitted_index] = _NEGATIVE_GENERATORS @ world_rot[self.fitted][:, None]
        d_rot = (arms.T @ self.turns).reshape(-1, 3, 3 * fitted)  # (L, xyz, (k, a))
        if self.layout.corrected:
            # d vec(R_k)/d delta_a = vec(R_k [e_a]x), through the pose-corrective bases rotated to the world.
            self.pose_blocks[self.corrected_index, :, self.corrected_index, :] = (
                (state.rotations[self.layout.corrected][:, None] @ GENERATORS).transpose(0, 2, 3, 1).reshape(-1, 9, 3)
            )
            d_rot[:, :, 3:] += (self.d_pose @ self.pose_derivative).reshape(3, -1, d_rot.shape[2] - 3).transpose(1, 0, 2)
        np.matmul(projection, d_rot, out=jacobian[:, :, n_exp : n_exp + 3 * fitted])
        jacobian[:, :, -3:] = projection  # d points / d translation is the identity
        return jacobian.reshape(-1, self.size)

    # ----------------------------------------------------------------------------------------------- solve
    def _apply(self, state: _State, step: np.ndarray) -> _State:
        rotations = state.rotations.copy()
        rotations[self.fitted] = state.rotations[self.fitted] @ rotation_matrices(step[self.n_exp : -3].reshape(-1, 3))
        return _State(state.exp + step[: self.n_exp], rotations, state.transl + step[-3:])

    def fit(
        self,
        params: FrameParams,
        targets: Targets,
        focal: torch.Tensor,
        center: tuple[float, float],
        prediction: FrameParams | None = None,
        iterations: int | None = None,
    ) -> FitResult:
        """FrameFitter.fit for a batch of one frame: same arguments, same result."""
        if params.exp.shape[0] != 1:
            raise ValueError(f"CpuFrameFitter fits one frame at a time, not {params.exp.shape[0]}")
        config = self.config
        iterations = config.track_iterations if iterations is None else iterations
        if targets.weights is not self.group_weights_source:  # the same tensor for every frame of a tracker
            self.group_weights_source, self.group_weights = targets.weights, _numpy(targets.weights)
        frame = _Frame(targets, self.group_weights, config, float(focal), center)
        anchor = _Anchor(self, None if prediction is None else _state(prediction))
        state = _state(params)
        current, spare = self.slots
        self._evaluate(state, frame, anchor, current)
        damping = config.initial_damping
        scaled, residuals, step = self.scaled, self.scaled_residuals, self.step
        # Chord steps exactly as FrameFitter.fit: the Jacobian is kept while steps are accepted.
        jacobian, fresh = None, False
        used = 0
        for used in range(1, iterations + 1):
            if jacobian is None:
                jacobian, fresh = self._jacobian(state, current, frame), True
            _weigh_rows(jacobian, current.weights, current.errors, scaled, residuals)
            # NumPy computes a product of an array with its own transpose as a symmetric rank-k update, half the
            # work of the general product a compiled kernel would make of it.
            hessian = scaled.T @ scaled
            predicted, largest = _damped_step(
                hessian, scaled, residuals, self.coupling, current.prior_diagonal, current.prior_gradient, damping, step
            )
            candidate = self._apply(state, step)
            if predicted < config.cost_tolerance * current.cost:
                state = candidate
                break
            evaluated = self._evaluate(candidate, frame, anchor, spare)
            accept = math.isfinite(evaluated.cost) and evaluated.cost <= current.cost
            gain = (current.cost - evaluated.cost) / max(current.cost, 1e-12)
            damping = min(max(damping / 3 if accept else damping * 10, 1e-7), 1e7)
            if accept:
                state, current, spare, fresh = candidate, evaluated, current, False
            elif not fresh:
                jacobian = None
            if largest < config.step_tolerance or (accept and gain < config.cost_tolerance):
                break
        return self._result(state, current, frame, params, used)

    def _result(self, state: _State, slot: _Evaluation, frame: _Frame, like: FrameParams, used: int) -> FitResult:
        weights = slot.weights
        mean_square = float(weights @ slot.squared) * self.config.robust_scale**2 / max(float(np.add.reduce(weights)), 1e-12)
        rms_px = math.sqrt(mean_square) * self.config.noise * frame.face_size
        # One conversion to a tensor; parameters, cost and error are views of it.
        packed = np.concatenate([state.exp, state.rotations.ravel(), state.transl, (slot.cost, rms_px)])
        values = torch.from_numpy(packed).to(device=like.exp.device, dtype=like.exp.dtype)
        n_exp, n_joints = len(state.exp), len(state.rotations)
        rotations_end = n_exp + 9 * n_joints
        params = FrameParams(values[None, :n_exp], values[n_exp:rotations_end].reshape(1, n_joints, 3, 3), values[None, rotations_end:-2])
        return FitResult(params, values[-2:-1], values[-1:], used)



@compiled
def _weigh_rows(jacobian: np.ndarray, weights: np.ndarray, errors: np.ndarray, scaled: np.ndarray, residuals: np.ndarray) -> None:
    """sqrt(w) J into ``scaled`` and sqrt(w) e into ``residuals`` (rows: landmark, then u and v), compiled (numba)."""
    for landmark in range(weights.shape[0]):
        root = math.sqrt(weights[landmark])
        for axis in range(2):
            row = 2 * landmark + axis
            residuals[row] = errors[axis, landmark] * root
            for column in range(jacobian.shape[1]):
                scaled[row, column] = jacobian[row, column] * root


@compiled
def _damped_step(
    hessian: np.ndarray, scaled: np.ndarray, residuals: np.ndarray, coupling: np.ndarray, prior_diagonal: np.ndarray,
    prior_gradient: np.ndarray, damping: float, step: np.ndarray,
) -> tuple[float, float]:
    """The rest of one LM iteration's linear algebra, compiled (numba): it replaces a few dozen NumPy calls whose
    overhead exceeded their arithmetic.

    ``hessian`` holds (sqrt(w) J)^T (sqrt(w) J) and receives the coupling and the prior's diagonal; the gradient
    is (sqrt(w) J)^T sqrt(w) e + the prior's. Then the Marquardt step as engine.fitting's: (H + damping diag(H)
    + tiny I) step = -gradient, zero if that is not positive definite. ``step`` receives the step; returns the
    cost decrease the quadratic model predicts and the largest step component.
    """
    size = hessian.shape[0]
    hessian += coupling
    gradient = scaled.T @ residuals + prior_gradient
    largest_diagonal = 1e-9
    for index in range(size):
        hessian[index, index] += prior_diagonal[index]
        largest_diagonal = max(largest_diagonal, hessian[index, index])
    damped = hessian.copy()
    for index in range(size):
        damped[index, index] += hessian[index, index] * damping + 1e-9 * largest_diagonal
    step[:] = 0.0
    try:
        lower = np.linalg.cholesky(damped)
    except Exception:  # not positive definite: no step
        return 0.0, 0.0
    # L L^T x = gradient by substitution; the step is -x.
    solution = gradient.copy()
    for row in range(size):
        for column in range(row):
            solution[row] -= lower[row, column] * solution[column]
        solution[row] /= lower[row, row]
    for row in range(size - 1, -1, -1):
        for column in range(row + 1, size):
            solution[row] -= lower[column, row] * solution[column]
        solution[row] /= lower[row, row]
    if not np.isfinite(np.sum(solution)):
        return 0.0, 0.0
    largest = 0.0
    for row in range(size):
        step[row] = -solution[row]
        largest = max(largest, abs(solution[row]))
    predicted = -(gradient @ step) - 0.5 * (step @ (hessian @ step))
    return predicted, largest

_kernels_ready = False


def compile_kernels() -> None:
    """Compile the solver's numba kernels (or load them from numba's cache) once per process, so that no
    frame pays for it: CpuFrameFitter calls this when it is made, i.e. at start-up and identity adoption."""
    global _kernels_ready
    if _kernels_ready:
        return
    started = time.perf_counter()
    size, count = 3, 2
    jacobian = np.ones((2 * count, size))
    scaled, residuals = np.empty_like(jacobian), np.empty(2 * count)
    _weigh_rows(jacobian, np.ones(count), np.ones((2, count)), scaled, residuals)
    _damped_step(scaled.T @ scaled, scaled, residuals, np.eye(size), np.ones(size), np.ones(size), 1e-3, np.empty(size))
    rotation_matrices(axis_angles(np.eye(3)[None]))
    _kernels_ready = True
    log.info("per-frame solver kernels ready in %.2f s (numba: compiled on first use, loaded from its cache after)", time.perf_counter() - started)


class _Anchor:
    """What the prior compares a state with: the prediction (temporal terms) or, without one, nothing (the
    motion weights are zero, so the second row of the prior's array adds nothing)."""

    def __init__(self, fitter: CpuFrameFitter, prediction: _State | None) -> None:
        n_exp, fitted = fitter.n_exp, fitter.fitted
        self.rows = np.empty((2, fitter.size))
        self.offset = np.zeros((2, fitter.size))
        if prediction is None:
            self.inverse = np.broadcast_to(_EYE, (len(fitter.joints), 3, 3))
        else:
            self.inverse = prediction.rotations[fitted].transpose(0, 2, 1)
            self.offset[1, :n_exp], self.offset[1, -3:] = prediction.exp, prediction.transl
        self.weights, self.diagonals = fitter.prior_terms[prediction is not None]


@dataclass
class _State:
    exp: np.ndarray  # (E,)
    rotations: np.ndarray  # (J, 3, 3)
    transl: np.ndarray  # (3,)


def _state(params: FrameParams) -> _State:
    return _State(_numpy(params.exp[0]), _numpy(params.rotations[0]), _numpy(params.transl[0]))


def faster_frame_solver(model: LandmarkModel, config: FitConfig, image_size: tuple[int, int], focal: float, repeats: int = 10) -> str:
    """"numpy" or "torch": whichever fits one frame faster here, measured on the model's own landmarks.

    On a GPU, one frame's PyTorch solve is a few thousand kernel launches; this measures rather than guesses.
    """
    from engine.camera import project
    from engine.fitting import FrameFitter

    height, width = image_size
    options = {"dtype": model.joint_rest.dtype, "device": model.joint_rest.device}
    exp = torch.zeros(1, model.n_coeffs, **options)
    rotations = torch.eye(3, **options).expand(1, model.n_joints, 3, 3).clone()
    transl = torch.tensor([[0.0, 0.0, -0.6]], **options)
    focal_tensor = torch.tensor(focal, **options)
    points = model.evaluate(exp, rotations, transl, jacobians=False).points
    targets = Targets(project(points, focal_tensor, (width / 2, height / 2)), landmark_weights(model, config))
    start = FrameParams(exp, rotations, transl + torch.tensor([[0.005, -0.003, 0.01]], **options))
    timings = {}
    synchronize = synchronizer(options["device"])
    for name, solver in (("numpy", CpuFrameFitter), ("torch", FrameFitter)):
        fitter = solver(model, config)
        samples = []
        for index in range(repeats + 3):
            started = time.perf_counter()
            fitter.fit(start, targets, focal_tensor, (width / 2, height / 2), prediction=start)
            synchronize()
            if index >= 3:  # the first calls build tables and warm caches
                samples.append(time.perf_counter() - started)
        timings[name] = float(np.median(samples))
    choice = min(timings, key=timings.get)
    log.info(
        "per-frame solve: %s (one frame: NumPy on the CPU %.2f ms, PyTorch on %s %.2f ms)",
        "NumPy on the CPU" if choice == "numpy" else f"PyTorch on {options['device']}", timings["numpy"] * 1e3,
        options["device"], timings["torch"] * 1e3,
    )
    return choice

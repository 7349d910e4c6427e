"""The per-frame tracking solve of one frame on the CPU: float64 tables and compiled (numba) kernels.

:class:`engine.fitting.FrameFitter` solves batches with PyTorch on any device; for the live case (one frame,
about 200 residuals x 60 unknowns) its cost is PyTorch's per-operation overhead, not arithmetic. This solver
runs the same Levenberg-Marquardt iterations (same residuals, priors, damping, chord steps and stopping
rules, see FrameFitter.fit) as one compiled call per frame, :func:`_solve_frame`, on tables made once per
identity. Between live frames the caches are cold (the fitting thread sleeps while MediaPipe's process and the
decoding run), and then every Python-level call, NumPy call and kernel argument costs far more than its arithmetic:

- tables: a landmark is sum_j Rw_j (S_lj - W_lj Jr_j) + W_lj Pw_j + transl (see engine.landmark_model), a
  sum over its (landmark, joint) *pairs* with a skinning weight (about 1.3 per landmark). Per pair, the table
  holds S_lj - W_lj Jr_j as a basis in [expression, pose features, 1] (the rest joint Jr_j folded in), whose
  columns are also the pair's expression and pose-feature derivatives; the contour has its own pairs per yaw
  row;
- :func:`_evaluate`: joint transforms down the tree, the pairs' shares (one matrix-vector product), points,
  robust residuals and the prior;
- :func:`_jacobian`: per pair, its landmark's projection times the joint's world rotation times the pair's
  basis, and the closed-form rotation columns from each fitted joint's arm, straight into the rows of J;
- the normal equations: H = (sqrt(w) J)^T (sqrt(w) J) by :func:`_gram` (the upper triangle, skipping the
  columns a landmark does not depend on), then :func:`_damped_step`'s damped Cholesky solve, both in loops
  that numba vectorises: warm, up to 1.5 times NumPy's symmetric rank-k product and LAPACK's factorisation
  (FLAME-sized), but without the calls into them, which cost more than that with the caches cold.

Everything that depends only on the identity and the camera (tables for every contour row, index arrays,
prior weights) is built in the constructor, which the tracker runs when it adopts an identity, off the hot
path; the kernels are compiled (or loaded from numba's cache) there too. Results equal FrameFitter's in
float64 to rounding (tests compare both on synthetic sequences).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from engine.camera import MIN_DEPTH
from engine.fitting import FitConfig, FitResult, FrameBlock, FrameFit, FrameTargets, Targets, fitted_joints, landmark_weights
from engine.flame import GENERATORS, axis_angles, contour_row, rotation_matrices
from engine.frames import NUMPY_DTYPES, FrameArrays, FrameParams
from engine.jit import compiled
from engine.landmark_model import LandmarkModel, LandmarkTable
from engine.timing import synchronizer

log = logging.getLogger(__name__)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A float64 copy of a tensor on any device."""
    return tensor.numpy(force=True).astype(np.float64)


class _Layout:
    """Sizes and joint lists shared by the tables and buffers of one fitter."""

    def __init__(self, model: LandmarkModel, config: FitConfig) -> None:
        self.joints = fitted_joints(model.n_joints, config)
        self.n_exp = model.n_coeffs
        self.size = self.n_exp + 3 * len(self.joints) + 3
        self.active = model.static.joints.cpu().numpy()
        self.parents = np.array(model.parents, dtype=np.int64)
        if any(self.parents[joint] >= joint for joint in range(1, len(self.parents))):
            raise ValueError("every joint must come after its parent")
        # Pose-corrective features are 9 per joint below the root: the fitted joints below the root move them.
        self.corrected = [joint for joint in self.joints if joint > 0] if model.static.has_pose_correctives else []
        if self.corrected and self.joints[1:] != self.corrected:
            raise ValueError("the root must be the first fitted joint")
        self.n_values = self.n_exp + (9 * (model.n_joints - 1) if self.corrected else 0) + 1


def _table_pairs(
    table: LandmarkTable, first: int, layout: _Layout, joint_rest: np.ndarray, joint_basis: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """The pairs of one LandmarkTable, per row of its leading dimension (the contour's yaw rows; one for the
    static landmarks): landmarks (P,) (numbered from ``first``), joints (P,), skinning weights (P,) and bases
    (3 P, V), in landmark order. ``joint_rest`` (Ja, 3) and ``joint_basis`` (Ja, 3, E) are the active joints'
    rest locations and their expression bases."""
    lead = table.weight.shape[:-2]
    weight = _numpy(table.weight).reshape(-1, *table.weight.shape[-2:])  # (R, n, Ja)
    rest = _numpy(table.rest).reshape(weight.shape + (3,)) - weight[..., None] * joint_rest  # (R, n, Ja, 3)
    coeff = np.moveaxis(_numpy(table.coeff_basis).reshape(-1, *table.coeff_basis.shape[len(lead) :]), 3, 1)  # (R, n, Ja, 3, E)
    n_exp = layout.n_exp
    bases = np.zeros(weight.shape + (3, layout.n_values))
    bases[..., :n_exp] = coeff - weight[..., None, None] * joint_basis
    bases[..., -1] = rest
    if layout.corrected:
        bases[..., n_exp:-1] = np.moveaxis(_numpy(table.pose_basis).reshape(-1, *table.pose_basis.shape[len(lead) :]), 3, 1)
    # Only the pairs with a skinning weight (their bases are zero otherwise).
    kept = (weight != 0) | (np.abs(bases).max(axis=(-2, -1)) > 0)
    pairs = []
    for row in range(weight.shape[0]):
        landmarks, active = np.nonzero(kept[row])
        selected = (row, landmarks, active)
        pairs.append((first + landmarks, layout.active[active], weight[selected], bases[selected].reshape(-1, layout.n_values)))
    return pairs


class _Pairs:
    """The (landmark, joint) pairs of every landmark: those of each contour row, then the static landmarks'.

    ``spans[row]`` (2, 2) holds [start, end) of contour row ``row``'s pairs and of the static ones (a model
    without contour has one row, whose contour span is empty). Per pair: ``landmarks`` (P,) (contour first,
    as the solver numbers landmarks), ``joints`` (P,), ``weights`` (P,) the skinning weight W_lj, and
    ``bases`` (3 P, V): rows x, y, z of S_lj - W_lj Jr_j as a basis in [expression, pose features, 1], whose
    expression and pose-feature columns are also the pair's derivatives.
    """

    def __init__(self, model: LandmarkModel, layout: _Layout, joint_rest: np.ndarray, joint_basis: np.ndarray) -> None:
        n_contour = model.contour.weight.shape[-2] if model.contour is not None else 0
        self.n_landmarks = n_contour + model.static.weight.shape[-2]
        parts = _table_pairs(model.contour, 0, layout, joint_rest, joint_basis) if model.contour is not None else []
        parts += _table_pairs(model.static, n_contour, layout, joint_rest, joint_basis)
        self.landmarks, self.joints, self.weights, self.bases = (np.ascontiguousarray(np.concatenate(arrays)) for arrays in zip(*parts))
        bounds = np.cumsum([0] + [len(part[0]) for part in parts])
        static = bounds[-2:]
        self.spans = np.array([[[bounds[row], bounds[row + 1]], static] for row in range(len(parts) - 1)] or [[[0, 0], static]])
        self.count = int(bounds[-1])


class CpuFrameFitter:
    """FrameFitter.fit for one frame at a time on the CPU, whatever device the model lives on.

    Built once per identity (``model`` from LandmarkModel.with_fixed_shape), like FrameFitter; every table the
    solve needs is made here, and the kernel is compiled or loaded here. A frame's whole solve is
    one call of :func:`_solve_frame`: between live frames the caches are cold, and each Python-level call and
    object then costs far more than its arithmetic.
    """

    def __init__(self, model: LandmarkModel, config: FitConfig) -> None:
        self.model = model
        self.config = config
        layout = self.layout = _Layout(model, config)
        self.joints = layout.joints
        self.n_exp = layout.n_exp
        self.size = layout.size
        self.fitted = np.array(self.joints, dtype=np.int64)
        self.parents = layout.parents
        joint_rest = _numpy(model.joint_rest)  # (J, 3)
        self.joint_coeff_basis = _numpy(model.joint_coeff_basis)  # (J, 3, E)
        parent_or_self = [max(parent, 0) for parent in model.parents]
        # Each joint's offset from its parent (the root's from the origin), linear in the expression.
        self.joint_offset_basis = self.joint_coeff_basis - self.joint_coeff_basis[parent_or_self]
        self.local_rest = joint_rest - joint_rest[parent_or_self]
        self.local_rest[0] = joint_rest[0]
        self.local_basis = self.joint_offset_basis.copy()
        self.local_basis[0] = self.joint_coeff_basis[0]
        # Which joints move with each fitted joint (itself and those below it).
        self.subtree = _numpy(model.subtree)[self.joints] > 0  # (F, J)
        self.pairs = _Pairs(model, layout, joint_rest[layout.active], self.joint_coeff_basis[layout.active])
        self.has_contour = model.contour is not None
        self.n_landmarks = self.pairs.n_landmarks
        self.group_weights_source: torch.Tensor | None = None
        self.group_weights = np.zeros(self.n_landmarks)
        self._priors(config)
        pairs = self.pairs
        # What every frame passes to _solve_frame after its own arguments, in the kernel's order.
        settings = np.array([config.noise, config.robust_scale, config.initial_damping, config.cost_tolerance, config.step_tolerance])
        self.tables = (
            settings, self.parents, self.local_rest, self.local_basis, bool(layout.corrected), self.has_contour, pairs.spans,
            pairs.landmarks, pairs.joints, pairs.weights, pairs.bases, self.joint_coeff_basis, self.joint_offset_basis, self.fitted,
            self.subtree, self.coupling, self.jaw_opening, self.prior_weights, self.prior_diagonals,
        )  # fmt: skip
        self._compile(NUMPY_DTYPES[model.joint_rest.dtype])

    def _priors(self, config: FitConfig) -> None:
        """The prior and motion weights of [exp, fitted joint angles, translation]: FrameFitter's, in NumPy."""
        block = FrameBlock(self.n_exp, self.joints, config, {"dtype": torch.float64, "device": "cpu"}, self.model.layer.n_eyelids)
        prior_weight, motion_weight = block.prior_weight.numpy(), block.motion_weight.numpy()
        self.coupling = np.ascontiguousarray(block.coupling.numpy())
        self.jaw_opening = block.jaw_opening
        overclosed_weight = prior_weight.copy()
        overclosed_weight[self.jaw_opening] = config.priors.jaw_overclose
        # Per use (without, with a prediction), per jaw (not, over-closed): the weights of the parameter vector
        # and of its change since the prediction, prior_weights (2, 2, 2, size), and the Hessian diagonals they
        # give, prior_diagonals (2, 2, size).
        motions = (np.zeros(self.size), motion_weight)
        self.prior_weights = np.array([[[weight, motion] for weight in (prior_weight, overclosed_weight)] for motion in motions])
        self.prior_diagonals = np.array([[weight + motion for weight in (prior_weight, overclosed_weight)] for motion in motions])

    def _compile(self, dtype: type[np.floating]) -> None:
        """Solve one made-up frame in ``dtype`` (the model's, which the tracker's parameters share), so that numba
        compiles (or loads from its cache) the kernel for exactly the argument types that frames pass, here
        rather than during a frame."""
        global _kernels_ready
        started = time.perf_counter()
        rest = np.ascontiguousarray(np.broadcast_to(np.eye(3, dtype=dtype), (len(self.parents), 3, 3)))
        state = FrameArrays(np.zeros(self.n_exp, dtype), rest, np.array([0.0, 0.0, -1.0], dtype))
        total = self.n_landmarks
        targets = FrameTargets(np.zeros((total, 2)), np.ones(total), np.ones(total, dtype=bool), 100.0)
        for prediction in (None, state):
            self.fit_frame(state, targets, 500.0, (0.0, 0.0), prediction)
        if not _kernels_ready:
            _kernels_ready = True
            log.info(
                "per-frame solver kernels ready in %.2f s (numba: compiled on first use, loaded from its cache after)",
                time.perf_counter() - started,
            )

    # ----------------------------------------------------------------------------------------------- solve
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
        if targets.weights is not self.group_weights_source:  # the same tensor for every frame of a tracker
            self.group_weights_source, self.group_weights = targets.weights, _numpy(targets.weights)
        # Arrays indexed, not tensors: PyTorch's indexing costs more than NumPy's.
        frame = FrameTargets(
            targets.pixels.numpy(force=True)[0].astype(np.float64), self.group_weights, targets.observed.numpy(force=True)[0],
            float(targets.face_size.numpy(force=True)[0]),
        )
        start = params.arrays()
        anchor = None if prediction is None else start if prediction is params else prediction.arrays()
        fitted = self.fit_frame(start, frame, float(focal), center, anchor, iterations)
        options = {"dtype": params.exp.dtype, "device": params.exp.device}
        cost, rms_px = (torch.tensor([value], **options) for value in (fitted.cost, fitted.rms_px))
        return FitResult(fitted.params.as_params(params.exp.device), cost, rms_px, fitted.iterations)

    def fit_frame(
        self,
        params: FrameArrays,
        targets: FrameTargets,
        focal: float,
        center: tuple[float, float],
        prediction: FrameArrays | None = None,
        iterations: int | None = None,
    ) -> FrameFit:
        """:meth:`fit` with one frame's parameters and targets as arrays (TargetBuilder.frame), as the tracker fits
        each frame: no tensor is made. The result is in the dtype of ``params`` (``prediction``'s must match)."""
        anchor = params if prediction is None else prediction
        exp, rotations, transl, cost, rms_px, used = _solve_frame(
            params.exp, params.rotations, params.transl, anchor.exp, anchor.rotations, anchor.transl, prediction is not None,
            targets.pixels, targets.observed, targets.weights, targets.face_size, focal, float(center[0]), float(center[1]),
            self.config.track_iterations if iterations is None else iterations, *self.tables,
        )  # fmt: skip
        return FrameFit(FrameArrays(exp, rotations, transl), cost, rms_px, used)


_kernels_ready = False


# ------------------------------------------------------------------------------------------------- kernels
# Compiled with numba (engine.jit): a frame's arithmetic is small, so NumPy's per-call overhead would cost more
# than the work. Shapes: J joints, F fitted joints, L landmarks, P pairs, E expression coefficients, V values
# [expression, pose features, 1], size = E + 3 F + 3 unknowns.


@compiled
def _observations(
    pixels: np.ndarray, observed: np.ndarray, group_weights: np.ndarray, center_x: float, center_y: float, scale: float,
    robust_scale_squared: float, offsets: np.ndarray, unit_mask: np.ndarray, weights: np.ndarray, cost_weights: np.ndarray,
) -> None:
    """One frame's terms of :func:`_residuals` from its pixels (L, 2) and ``observed`` (L,): offsets (L, 2) =
    center - pixel, unit_mask (L,) = 1 / scale, the landmarks' ``group_weights`` (L,) into ``weights`` and
    times the Cauchy scale squared into ``cost_weights``; all zero where not observed."""
    for landmark in range(observed.shape[0]):
        if observed[landmark]:
            offsets[landmark, 0], offsets[landmark, 1] = center_x - pixels[landmark, 0], center_y - pixels[landmark, 1]
            unit_mask[landmark], weights[landmark] = 1.0 / scale, group_weights[landmark]
        else:
            offsets[landmark, 0] = offsets[landmark, 1] = unit_mask[landmark] = weights[landmark] = 0.0
        cost_weights[landmark] = weights[landmark] * robust_scale_squared


@compiled
def _prediction_terms(
    exp: np.ndarray, rotations: np.ndarray, transl: np.ndarray, fitted: np.ndarray, inverse: np.ndarray, offset: np.ndarray
) -> None:
    """A prediction's terms of :func:`_prior`: the fitted joints' rotations transposed into ``inverse`` (F, 3, 3),
    its expression (E,) and translation (3,) into the second row of ``offset`` (2, size), whose other entries
    stay zero."""
    for index in range(fitted.shape[0]):
        inverse[index] = rotations[fitted[index]].T
    offset[1, : exp.shape[0]] = exp
    offset[1, offset.shape[1] - 3 :] = transl


@compiled
def _world_transforms(
    exp: np.ndarray, rotations: np.ndarray, parents: np.ndarray, local_rest: np.ndarray, local_basis: np.ndarray,
    world_rot: np.ndarray, world_pos: np.ndarray,
) -> None:
    """Each joint's world rotation Rw (J, 3, 3) and location Pw (J, 3) into ``world_rot`` and ``world_pos``.

    ``rotations`` (J, 3, 3) are the local rotations; a joint's offset from its parent is local_rest (J, 3) +
    local_basis (J, 3, E) @ exp (E,); ``parents`` (J,) lists each joint's parent, which comes before it.
    """
    offset = np.empty(3)
    for joint in range(rotations.shape[0]):
        for x in range(3):
            total = local_rest[joint, x]
            for c in range(exp.shape[0]):
                total += local_basis[joint, x, c] * exp[c]
            offset[x] = total
        if joint == 0:
            world_rot[0] = rotations[0]
            world_pos[0] = offset
            continue
        parent = parents[joint]
        for x in range(3):
            world_pos[joint, x] = world_pos[parent, x]
            for y in range(3):
                world_pos[joint, x] += world_rot[parent, x, y] * offset[y]
                world_rot[joint, x, y] = 0.0
                for z in range(3):
                    world_rot[joint, x, y] += world_rot[parent, x, z] * rotations[joint, z, y]


@compiled
def _landmark_points(
    values: np.ndarray, spans: np.ndarray, landmarks: np.ndarray, joints: np.ndarray, weights: np.ndarray, bases: np.ndarray,
    world_rot: np.ndarray, world_pos: np.ndarray, transl: np.ndarray, contributions: np.ndarray, points: np.ndarray,
) -> None:
    """The landmarks (L, 3) into ``points``: transl (3,) plus the contribution Rw_j s + W Pw_j of each pair in
    ``spans`` (2, 2) ([start, end) of the contour row's pairs and of the static ones), with s = bases[3 p : 3 p
    + 3] (3 P, V) @ values (V,) and W = weights[p]. Contributions (P, 3) are kept for the Jacobian's arms."""
    for landmark in range(points.shape[0]):
        points[landmark] = transl
    for span in range(2):
        start, end = spans[span, 0], spans[span, 1]
        if start == end:
            continue
        shares = bases[3 * start : 3 * end] @ values
        for pair in range(start, end):
            joint, landmark, first = joints[pair], landmarks[pair], 3 * (pair - start)
            for x in range(3):
                total = world_pos[joint, x] * weights[pair]
                for y in range(3):
                    total += world_rot[joint, x, y] * shares[first + y]
                contributions[pair, x] = total
                points[landmark, x] += total


@compiled
def _residuals(
    points: np.ndarray, focal: float, offsets: np.ndarray, unit_mask: np.ndarray, group_weights: np.ndarray, cost_weights: np.ndarray,
    inverse_scale_squared: float, errors: np.ndarray, squared: np.ndarray, weights: np.ndarray,
) -> float:
    """The Cauchy-robust data cost of ``points`` (L, 3); normalised residuals (L, 2) into ``errors``, their
    squared norm over the Cauchy scale squared (L,) into ``squared`` and the robust weights (L,) into ``weights``.

    Projection u = f x / (-z) + cx, v = f (-y) / (-z) + cy; the residual (pixel - target) / scale is
    (u - cx, v - cy) plus ``offsets`` (L, 2), times ``unit_mask`` (L,) (1 / scale, zero where not observed).
    """
    cost = 0.0
    for landmark in range(points.shape[0]):
        factor = focal / max(-points[landmark, 2], MIN_DEPTH)
        u = (points[landmark, 0] * factor + offsets[landmark, 0]) * unit_mask[landmark]
        v = (points[landmark, 1] * -factor + offsets[landmark, 1]) * unit_mask[landmark]
        errors[landmark, 0], errors[landmark, 1] = u, v
        relative = (u * u + v * v) * inverse_scale_squared
        squared[landmark] = relative
        weights[landmark] = group_weights[landmark] / (1.0 + relative)
        cost += cost_weights[landmark] * math.log1p(relative)
    return cost


@compiled
def _prior(
    exp: np.ndarray, rotations: np.ndarray, transl: np.ndarray, fitted: np.ndarray, inverse: np.ndarray, offset: np.ndarray,
    term_weights: np.ndarray, term_diagonals: np.ndarray, coupling: np.ndarray, jaw_opening: int, rows: np.ndarray,
    gradient: np.ndarray, diagonal: np.ndarray,
) -> float:
    """The prior's cost (FrameBlock.prior); its gradient (size,) and Hessian diagonal (size,) into ``gradient``
    and ``diagonal``.

    ``rows`` (2, size) receives the parameter vector [exp, fitted joints' angles, transl] and its change since
    the prediction: the latter's angles are those of inverse (F, 3, 3) @ rotations[fitted] (the prediction's
    rotations transposed), and offset (2, size) is subtracted (zero, then the prediction's exp and transl).
    term_weights (2, 2, size) weigh the rows and term_diagonals (2, size) are their Hessian diagonals, first
    with the jaw open, then over-closed; ``coupling`` (size, size) couples the eyes.
    """
    n_exp, count, size = exp.shape[0], fitted.shape[0], rows.shape[1]
    both = np.empty((2 * count, 3, 3))
    for index in range(count):
        both[index] = rotations[fitted[index]]
        for x in range(3):
            for y in range(3):
                both[count + index, x, y] = (
                    inverse[index, x, 0] * both[index, 0, y] + inverse[index, x, 1] * both[index, 1, y]
                    + inverse[index, x, 2] * both[index, 2, y]
                )  # fmt: skip
    angles = axis_angles(both)
    for row in range(2):
        rows[row, :n_exp] = exp
        for index in range(count):
            rows[row, n_exp + 3 * index : n_exp + 3 * index + 3] = angles[row * count + index]
        rows[row, size - 3 :] = transl
        for column in range(size):
            rows[row, column] -= offset[row, column]
    overclosed = 1 if rows[0, jaw_opening] < 0 else 0
    weights = term_weights[overclosed]
    cost = 0.0
    for column in range(size):
        coupled = 0.0
        for other in range(size):
            coupled += rows[0, other] * coupling[other, column]
        first, second = weights[0, column] * rows[0, column], weights[1, column] * rows[1, column]
        gradient[column] = first + second + coupled
        diagonal[column] = term_diagonals[overclosed, column]
        cost += first * rows[0, column] + second * rows[1, column] + coupled * rows[0, column]
    return 0.5 * cost


@compiled
def _evaluate(
    exp: np.ndarray, rotations: np.ndarray, transl: np.ndarray, parents: np.ndarray, local_rest: np.ndarray, local_basis: np.ndarray,
    corrected: bool, spans: np.ndarray, landmarks: np.ndarray, joints: np.ndarray, pair_weights: np.ndarray, bases: np.ndarray,
    focal: float,
    offsets: np.ndarray, unit_mask: np.ndarray, group_weights: np.ndarray, cost_weights: np.ndarray, inverse_scale_squared: float,
    fitted: np.ndarray, inverse: np.ndarray, offset: np.ndarray, term_weights: np.ndarray, term_diagonals: np.ndarray,
    coupling: np.ndarray, jaw_opening: int, values: np.ndarray, world_rot: np.ndarray, world_pos: np.ndarray,
    contributions: np.ndarray, points: np.ndarray, errors: np.ndarray, squared: np.ndarray, weights: np.ndarray, rows: np.ndarray,
    gradient: np.ndarray, diagonal: np.ndarray,
) -> float:
    """One state's cost (data and prior), through the four kernels above; the arguments are theirs.

    ``values`` (V,) receives [exp, pose features, 1]: the pose features (rotations[1:] - I, flattened) only
    where ``corrected`` (the model has pose correctives), else V = E + 1.
    """
    n_exp = exp.shape[0]
    values[:n_exp] = exp
    if corrected:
        for joint in range(1, rotations.shape[0]):
            for x in range(3):
                for y in range(3):
                    values[n_exp + 9 * (joint - 1) + 3 * x + y] = rotations[joint, x, y] - (1.0 if x == y else 0.0)
    values[-1] = 1.0
    _world_transforms(exp, rotations, parents, local_rest, local_basis, world_rot, world_pos)
    _landmark_points(values, spans, landmarks, joints, pair_weights, bases, world_rot, world_pos, transl, contributions, points)
    cost = _residuals(points, focal, offsets, unit_mask, group_weights, cost_weights, inverse_scale_squared, errors, squared, weights)
    return cost + _prior(
        exp, rotations, transl, fitted, inverse, offset, term_weights, term_diagonals, coupling, jaw_opening, rows, gradient, diagonal
    )


@compiled
def _projections(points: np.ndarray, focal_over_scale: float) -> np.ndarray:
    """(L, 2, 3) d residual / d point of each landmark: u = f x / (-z), v = f (-y) / (-z) over the residual scale."""
    projections = np.zeros((points.shape[0], 2, 3))
    for landmark in range(points.shape[0]):
        inverse_depth = 1.0 / max(-points[landmark, 2], MIN_DEPTH)
        scale = focal_over_scale * inverse_depth
        projections[landmark, 0, 0] = scale
        projections[landmark, 1, 1] = -scale
        projections[landmark, 0, 2] = scale * points[landmark, 0] * inverse_depth
        projections[landmark, 1, 2] = -scale * points[landmark, 1] * inverse_depth
    return projections


@compiled
def _joint_location_derivatives(
    world_rot: np.ndarray, joint_coeff_basis: np.ndarray, joint_offset_basis: np.ndarray, parents: np.ndarray
) -> np.ndarray:
    """(J, 3, E) d Pw_j / d exp: the root's rest basis, then down the tree Rw_parent @ offset basis + the parent's."""
    derivatives = np.empty_like(joint_coeff_basis)
    derivatives[0] = joint_coeff_basis[0]
    for joint in range(1, parents.shape[0]):
        parent = parents[joint]
        for x in range(3):
            for c in range(derivatives.shape[2]):
                derivatives[joint, x, c] = (
                    world_rot[parent, x, 0] * joint_offset_basis[joint, 0, c] + world_rot[parent, x, 1] * joint_offset_basis[joint, 1, c]
                    + world_rot[parent, x, 2] * joint_offset_basis[joint, 2, c] + derivatives[parent, x, c]
                )  # fmt: skip
    return derivatives


@compiled
def _pose_feature_derivatives(rotations: np.ndarray, corrected: np.ndarray) -> np.ndarray:
    """(C, 9, 3) d vec(R_k) / d delta_a = vec(R_k [e_a]x) of each corrected joint k (C,): its pose features' change."""
    derivatives = np.empty((corrected.shape[0], 9, 3))
    for index in range(corrected.shape[0]):
        rotation = rotations[corrected[index]]
        for axis in range(3):
            for x in range(3):
                for y in range(3):
                    derivatives[index, 3 * x + y, axis] = (
                        rotation[x, 0] * GENERATORS[axis, 0, y] + rotation[x, 1] * GENERATORS[axis, 1, y]
                        + rotation[x, 2] * GENERATORS[axis, 2, y]
                    )  # fmt: skip
    return derivatives


@compiled
def _pair_columns(
    projection: np.ndarray, rotation: np.ndarray, weight: float, basis: np.ndarray, location_derivative: np.ndarray,
    corrected: np.ndarray, pose_derivatives: np.ndarray, n_exp: int, rows: np.ndarray,
) -> None:
    """Add one pair's expression and pose-corrective columns to its landmark's two rows (2, size) of J.

    d point / d exp = Rw_j basis[:, :E] + W_lj d Pw_j / d exp (``basis`` (3, V) the pair's, ``location_derivative``
    (3, E)); the rotation columns of each corrected joint k (``corrected`` (C,): the fitted joints after the
    root) get Rw_j times the basis of k's 9 pose features, through ``pose_derivatives`` (C, 9, 3).
    ``projection`` (2, 3) maps d point to d residual.
    """
    for axis in range(2):
        row = rows[axis]
        p0, p1, p2 = projection[axis, 0], projection[axis, 1], projection[axis, 2]
        # This row of projection @ rotation.
        t0 = p0 * rotation[0, 0] + p1 * rotation[1, 0] + p2 * rotation[2, 0]
        t1 = p0 * rotation[0, 1] + p1 * rotation[1, 1] + p2 * rotation[2, 1]
        t2 = p0 * rotation[0, 2] + p1 * rotation[1, 2] + p2 * rotation[2, 2]
        w0, w1, w2 = weight * p0, weight * p1, weight * p2
        for column in range(n_exp):
            row[column] += (
                t0 * basis[0, column] + t1 * basis[1, column] + t2 * basis[2, column]
                + w0 * location_derivative[0, column] + w1 * location_derivative[1, column] + w2 * location_derivative[2, column]
            )  # fmt: skip
        for index in range(corrected.shape[0]):
            column = n_exp + 3 * (index + 1)
            for feature in range(9):
                source = n_exp + 9 * (corrected[index] - 1) + feature
                change = t0 * basis[0, source] + t1 * basis[1, source] + t2 * basis[2, source]
                for angle in range(3):
                    row[column + angle] += change * pose_derivatives[index, feature, angle]


@compiled
def _jacobian(
    points: np.ndarray, rotations: np.ndarray, world_rot: np.ndarray, world_pos: np.ndarray, spans: np.ndarray, landmarks: np.ndarray,
    joints: np.ndarray, weights: np.ndarray, bases: np.ndarray, contributions: np.ndarray, joint_coeff_basis: np.ndarray,
    joint_offset_basis: np.ndarray, parents: np.ndarray, fitted: np.ndarray, subtree: np.ndarray, corrected: bool,
    group_weights: np.ndarray, focal_over_scale: float, arms: np.ndarray, jacobian: np.ndarray,
) -> None:
    """(2 L, size) d residual / d [exp, fitted joints' rotation increments, transl] into ``jacobian``, rows
    (landmark, u | v), at a state that :func:`_evaluate` left in ``points``, ``world_rot``, ``world_pos`` and
    ``contributions``.

    Per pair in ``spans``: :func:`_pair_columns`, and its share of the arm of each fitted joint above it
    (``subtree`` (F, J)): arm_lk = sum over the pairs below k of (contribution - W_lj Pw_k), kept in ``arms``
    (L, F, 3). Then a rotation increment delta_a of fitted joint k moves the landmark by -[arm_lk]x Rw_k e_a
    = Rw_k e_a x arm_lk, and translation by the identity. Rows of landmarks whose ``group_weights`` (L,) is zero
    (unobserved in this frame) are left zero: no iteration of the frame weighs them.
    """
    n_exp, size = joint_coeff_basis.shape[2], jacobian.shape[1]
    projections = _projections(points, focal_over_scale)
    location_derivatives = _joint_location_derivatives(world_rot, joint_coeff_basis, joint_offset_basis, parents)
    corrected_joints = fitted[1:] if corrected else fitted[:0]
    pose_derivatives = _pose_feature_derivatives(rotations, corrected_joints)
    jacobian[:] = 0.0
    arms[:] = 0.0
    for span in range(2):
        for pair in range(spans[span, 0], spans[span, 1]):
            landmark, joint, weight = landmarks[pair], joints[pair], weights[pair]
            if group_weights[landmark] == 0.0:
                continue
            _pair_columns(
                projections[landmark], world_rot[joint], weight, bases[3 * pair : 3 * pair + 3], location_derivatives[joint],
                corrected_joints, pose_derivatives, n_exp,
                jacobian[2 * landmark : 2 * landmark + 2],
            )
            for index in range(fitted.shape[0]):
                if subtree[index, joint]:
                    for x in range(3):
                        arms[landmark, index, x] += contributions[pair, x] - weight * world_pos[fitted[index], x]
    for landmark in range(points.shape[0]):
        if group_weights[landmark] == 0.0:
            continue
        projection = projections[landmark]
        for index in range(fitted.shape[0]):
            rotation, arm = world_rot[fitted[index]], arms[landmark, index]
            for angle in range(3):
                r0, r1, r2 = rotation[0, angle], rotation[1, angle], rotation[2, angle]
                m0, m1, m2 = r1 * arm[2] - r2 * arm[1], r2 * arm[0] - r0 * arm[2], r0 * arm[1] - r1 * arm[0]
                for axis in range(2):
                    jacobian[2 * landmark + axis, n_exp + 3 * index + angle] += (
                        projection[axis, 0] * m0 + projection[axis, 1] * m1 + projection[axis, 2] * m2
                    )
        jacobian[2 * landmark : 2 * landmark + 2, size - 3 :] = projection


@compiled
def _weigh_rows(jacobian: np.ndarray, weights: np.ndarray, errors: np.ndarray, scaled: np.ndarray, residuals: np.ndarray) -> int:
    """sqrt(w) J (2 L, size) into the first rows of ``scaled`` and sqrt(w) e into ``residuals``, from the robust
    weights (L,) and the residuals (L, 2); returns how many rows that is. Landmarks of weight zero (unobserved)
    are left out: their rows would be zero, and the normal equations cost less without them."""
    count = 0
    for landmark in range(weights.shape[0]):
        if weights[landmark] == 0.0:
            continue
        root = math.sqrt(weights[landmark])
        for axis in range(2):
            row = 2 * landmark + axis
            residuals[count] = errors[landmark, axis] * root
            for column in range(jacobian.shape[1]):
                scaled[count, column] = jacobian[row, column] * root
            count += 1
    return count


@compiled
def _gram(scaled: np.ndarray, count: int, hessian: np.ndarray) -> None:
    """(sqrt(w) J)^T (sqrt(w) J) of the first ``count`` rows of ``scaled`` (2 L, size) into ``hessian``
    (size, size): the upper triangle four rows at a time (each entry read and written once per four rows),
    then mirrored. The inner loops run over slices from index 0, which numba's code vectorises; indexing from
    a variable start instead costs a negative-index check per entry and runs about twice as slow."""
    size = hessian.shape[0]
    hessian[:] = 0.0
    first = 0
    while first + 4 <= count:
        for row in range(size):
            a0, a1, a2, a3 = scaled[first, row], scaled[first + 1, row], scaled[first + 2, row], scaled[first + 3, row]
            if a0 == 0.0 and a1 == 0.0 and a2 == 0.0 and a3 == 0.0:
                continue  # adds nothing: a landmark's rows are zero in the expressions and joints that do not move it
            out = hessian[row, row:]
            r0, r1, r2, r3 = scaled[first, row:], scaled[first + 1, row:], scaled[first + 2, row:], scaled[first + 3, row:]
            for column in range(out.shape[0]):
                out[column] += a0 * r0[column] + a1 * r1[column] + a2 * r2[column] + a3 * r3[column]
        first += 4
    for index in range(first, count):
        for row in range(size):
            share, out, rest = scaled[index, row], hessian[row, row:], scaled[index, row:]
            for column in range(out.shape[0]):
                out[column] += share * rest[column]
    for row in range(size):
        for column in range(row):
            hessian[row, column] = hessian[column, row]


@compiled
def _damped_step(
    hessian: np.ndarray, augmented: bool, scaled: np.ndarray, residuals: np.ndarray, count: int, coupling: np.ndarray,
    prior_diagonal: np.ndarray, prior_gradient: np.ndarray, damping: float, factor: np.ndarray, step: np.ndarray,
) -> tuple[float, float]:
    """The rest of one LM iteration's linear algebra.

    ``hessian`` (size, size) holds (sqrt(w) J)^T (sqrt(w) J) and receives the coupling and the prior's diagonal
    (unless ``augmented``: it holds them already, from a previous call with the same state); the gradient is
    (sqrt(w) J)^T sqrt(w) e (the first ``count`` rows of ``scaled`` (2 L, size) and ``residuals`` (2 L,)) + the
    prior's. Then the Marquardt step as engine.fitting's: (H + damping diag(H) + tiny I) step = -gradient, zero
    if that is not positive definite, by a Cholesky factorisation U^T U in ``factor`` (size, size), row by row
    so that every inner loop runs over contiguous entries. ``step`` (size,) receives the step; returns the cost
    decrease the quadratic model predicts and the largest step component.
    """
    size = hessian.shape[0]
    if not augmented:
        hessian += coupling
    gradient = prior_gradient.copy()
    for row in range(count):
        residual = residuals[row]
        for column in range(size):
            gradient[column] += scaled[row, column] * residual
    largest_diagonal = 1e-9
    for index in range(size):
        if not augmented:
            hessian[index, index] += prior_diagonal[index]
        largest_diagonal = max(largest_diagonal, hessian[index, index])
    factor[:] = hessian
    for index in range(size):
        factor[index, index] += hessian[index, index] * damping + 1e-9 * largest_diagonal
    step[:] = 0.0
    for row in range(size):
        pivot = factor[row, row]
        if not pivot > 0.0:  # not positive definite (or not finite): no step
            return 0.0, 0.0
        pivot = math.sqrt(pivot)
        factor[row, row] = pivot
        pivot_row = factor[row, row + 1 :]
        for column in range(pivot_row.shape[0]):
            pivot_row[column] /= pivot
        for below in range(row + 1, size):
            # Slices from index 0 (see _gram).
            share, target, source = factor[row, below], factor[below, below:], factor[row, below:]
            for column in range(target.shape[0]):
                target[column] -= share * source[column]
    # U^T U x = gradient by substitution (U^T forward, U backward); the step is -x.
    solution = gradient.copy()
    for row in range(size):
        solution[row] /= factor[row, row]
        value, target, source = solution[row], solution[row + 1 :], factor[row, row + 1 :]
        for column in range(target.shape[0]):
            target[column] -= value * source[column]
    for row in range(size - 1, -1, -1):
        value = solution[row]
        for column in range(row + 1, size):
            value -= factor[row, column] * solution[column]
        solution[row] = value / factor[row, row]
    if not np.isfinite(np.sum(solution)):
        return 0.0, 0.0
    largest = 0.0
    for row in range(size):
        step[row] = -solution[row]
        largest = max(largest, abs(solution[row]))
    predicted = 0.0
    for row in range(size):
        curvature = 0.0
        for column in range(size):
            curvature += hessian[row, column] * step[column]
        predicted -= gradient[row] * step[row] + 0.5 * step[row] * curvature
    return predicted, largest


@compiled
def _apply_step(
    exp: np.ndarray, rotations: np.ndarray, transl: np.ndarray, step: np.ndarray, fitted: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The state after ``step`` (size,): exp (E,) and transl (3,) plus their parts, and each fitted joint's
    rotation (of ``rotations`` (J, 3, 3)) times the rotation of its increment, as new arrays."""
    n_exp, count = exp.shape[0], fitted.shape[0]
    increments = np.empty((count, 3))
    for index in range(count):
        increments[index] = step[n_exp + 3 * index : n_exp + 3 * index + 3]
    turns = rotation_matrices(increments)
    turned = rotations.copy()
    for index in range(count):
        rotation = rotations[fitted[index]]
        for x in range(3):
            for y in range(3):
                turned[fitted[index], x, y] = (
                    rotation[x, 0] * turns[index, 0, y] + rotation[x, 1] * turns[index, 1, y] + rotation[x, 2] * turns[index, 2, y]
                )
    return exp + step[:n_exp], turned, transl + step[n_exp + 3 * count :]


@compiled
def _solve_frame(
    exp: np.ndarray, rotations: np.ndarray, transl: np.ndarray, prediction_exp: np.ndarray, prediction_rotations: np.ndarray,
    prediction_transl: np.ndarray, predicted: bool, pixels: np.ndarray, observed: np.ndarray, group_weights: np.ndarray,
    face_size: float, focal: float, center_x: float, center_y: float, iterations: int, settings: np.ndarray, parents: np.ndarray,
    local_rest: np.ndarray, local_basis: np.ndarray, corrected: bool, has_contour: bool, spans: np.ndarray, landmarks: np.ndarray,
    joints: np.ndarray, pair_weights: np.ndarray, bases: np.ndarray, joint_coeff_basis: np.ndarray, joint_offset_basis: np.ndarray,
    fitted: np.ndarray, subtree: np.ndarray, coupling: np.ndarray, jaw_opening: int, prior_weights: np.ndarray,
    prior_diagonals: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float, int]:
    """One frame's whole solve: FrameFitter.fit's Levenberg-Marquardt iterations (residuals, priors, damping,
    chord steps and stopping rules), in one call.

    The frame: the start exp (E,), rotations (J, 3, 3) and transl (3,) in the tracker's dtype, the prediction
    in the same (used where ``predicted``), pixels (L, 2) float64, ``observed`` (L,), the landmarks'
    ``group_weights`` (L,), the face size (pixels), the camera's focal length and centre, and at most
    ``iterations`` iterations. Then the fitter's tables (CpuFrameFitter.tables): ``settings`` (5,) FitConfig's
    noise, robust_scale, initial_damping, cost_tolerance and step_tolerance, the arguments of :func:`_evaluate`
    and :func:`_jacobian`, ``spans`` (rows, 2, 2) per contour row, the prior's ``prior_weights`` (2, 2, 2,
    size) and ``prior_diagonals`` (2, 2, size) without and with a prediction.

    Its buffers are made here: each is an argument fewer, and numba's per-argument cost at every call, far
    larger with the caches cold, exceeds that of a small allocation (the allocator hands back the same memory
    frame after frame). Returns the fitted exp, rotations and transl in the start's dtype, and
    the cost and RMS error in pixels rounded to it (as FrameFitter's tensors would hold them), and the number
    of iterations run.
    """
    noise, robust_scale, initial_damping, cost_tolerance, step_tolerance = settings
    n_joints, n_landmarks, n_pairs, n_fitted = parents.shape[0], group_weights.shape[0], landmarks.shape[0], fitted.shape[0]
    size, n_values = coupling.shape[0], bases.shape[1]
    # Two evaluation slots (the current state's and a candidate's) stacked on a leading axis of 2: [expression,
    # pose features, 1], joints, each pair's share of its landmark in the world, points, normalised residuals,
    # their squared norm over the Cauchy scale squared, robust weights and the prior's terms.
    values, world_rot, world_pos = np.zeros((2, n_values)), np.zeros((2, n_joints, 3, 3)), np.zeros((2, n_joints, 3))
    contributions, points, errors = np.zeros((2, n_pairs, 3)), np.zeros((2, n_landmarks, 3)), np.zeros((2, n_landmarks, 2))
    squared, weights = np.zeros((2, n_landmarks)), np.zeros((2, n_landmarks))
    prior_rows, prior_gradient, prior_diagonal = np.zeros((2, 2, size)), np.zeros((2, size)), np.zeros((2, size))
    # The frame's observations (see _residuals) and its prediction's terms of the prior (see _prior).
    offsets, unit_mask = np.zeros((n_landmarks, 2)), np.zeros(n_landmarks)
    frame_weights, cost_weights = np.zeros(n_landmarks), np.zeros(n_landmarks)
    inverse, offset = np.zeros((n_fitted, 3, 3)), np.zeros((2, size))
    # The linear algebra: J's rows (landmark, then u and v), their weighted copies, the normal equations.
    arms, jacobian = np.zeros((n_landmarks, n_fitted, 3)), np.zeros((2 * n_landmarks, size))
    scaled, scaled_residuals = np.empty((2 * n_landmarks, size)), np.zeros(2 * n_landmarks)
    hessian, factor, step = np.zeros((size, size)), np.zeros((size, size)), np.zeros(size)
    scale = noise * face_size  # pixels per unit of normalised residual
    focal_over_scale = focal / scale
    _observations(
        pixels, observed, group_weights, center_x, center_y, scale, robust_scale * robust_scale, offsets, unit_mask, frame_weights,
        cost_weights,
    )  # fmt: skip
    use = 1 if predicted else 0
    if predicted:
        _prediction_terms(
            prediction_exp.astype(np.float64), prediction_rotations.astype(np.float64), prediction_transl.astype(np.float64), fitted,
            inverse, offset,
        )  # fmt: skip
    else:  # no prediction: the motion weights are zero, so the prior's second row adds nothing
        for index in range(n_fitted):
            inverse[index] = np.eye(3)
    term_weights, term_diagonals = prior_weights[use], prior_diagonals[use]
    inverse_scale_squared = 1.0 / (robust_scale * robust_scale)
    state_exp, state_rotations, state_transl = exp.astype(np.float64), rotations.astype(np.float64), transl.astype(np.float64)
    rows = np.zeros(2, np.int64)  # each slot's contour row
    costs = np.zeros(2)

    def evaluate(slot: int, exp: np.ndarray, rotations: np.ndarray, transl: np.ndarray) -> None:
        """A state's contour row, cost and terms into ``slot`` (numba compiles this closure into the kernel)."""
        rows[slot] = contour_row(rotations[0]) if has_contour else 0
        costs[slot] = _evaluate(
            exp, rotations, transl, parents, local_rest, local_basis, corrected, spans[rows[slot]], landmarks, joints, pair_weights,
            bases, focal, offsets, unit_mask, frame_weights, cost_weights, inverse_scale_squared, fitted, inverse, offset, term_weights,
            term_diagonals, coupling, jaw_opening, values[slot], world_rot[slot], world_pos[slot], contributions[slot], points[slot],
            errors[slot], squared[slot], weights[slot], prior_rows[slot], prior_gradient[slot], prior_diagonal[slot],
        )  # fmt: skip

    current = 0
    evaluate(current, state_exp, state_rotations, state_transl)
    damping = initial_damping
    # Chord steps exactly as FrameFitter.fit: the Jacobian is kept while steps are accepted.
    linearised, fresh, augmented = False, False, False
    count = used = 0
    while used < iterations:
        used += 1
        if not linearised:
            _jacobian(
                points[current], state_rotations, world_rot[current], world_pos[current], spans[rows[current]], landmarks, joints,
                pair_weights, bases, contributions[current], joint_coeff_basis, joint_offset_basis, parents, fitted, subtree, corrected,
                frame_weights, focal_over_scale, arms, jacobian,
            )  # fmt: skip
            linearised, fresh = True, True
        # After a refused step from a fresh Jacobian, the state, its weights and so the rows and the normal
        # equations are the previous iteration's: only the damping changes.
        if not augmented:
            count = _weigh_rows(jacobian, weights[current], errors[current], scaled, scaled_residuals)
            _gram(scaled, count, hessian)
        decrease, largest = _damped_step(
            hessian, augmented, scaled, scaled_residuals, count, coupling, prior_diagonal[current], prior_gradient[current], damping,
            factor, step,
        )  # fmt: skip
        augmented = True
        moved_exp, moved_rotations, moved_transl = _apply_step(state_exp, state_rotations, state_transl, step, fitted)
        if decrease < cost_tolerance * costs[current]:
            state_exp, state_rotations, state_transl = moved_exp, moved_rotations, moved_transl
            break
        spare = 1 - current
        evaluate(spare, moved_exp, moved_rotations, moved_transl)
        accept = math.isfinite(costs[spare]) and costs[spare] <= costs[current]
        gain = (costs[current] - costs[spare]) / max(costs[current], 1e-12)
        damping = min(max(damping / 3 if accept else damping * 10, 1e-7), 1e7)
        if accept:
            state_exp, state_rotations, state_transl = moved_exp, moved_rotations, moved_transl
            current, fresh, augmented = spare, False, False
        elif not fresh:
            linearised, augmented = False, False
        if largest < step_tolerance or (accept and gain < cost_tolerance):
            break
    # The RMS error in pixels of the robust-weighted residuals.
    weighted = total = 0.0
    for landmark in range(weights.shape[1]):
        weighted += weights[current, landmark] * squared[current, landmark]
        total += weights[current, landmark]
    rms_px = math.sqrt(weighted * robust_scale * robust_scale / max(total, 1e-12)) * noise * face_size
    dtype = exp.dtype
    rounded = np.empty(2, dtype)
    rounded[0], rounded[1] = costs[current], rms_px
    return state_exp.astype(dtype), state_rotations.astype(dtype), state_transl.astype(dtype), float(rounded[0]), float(rounded[1]), used


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

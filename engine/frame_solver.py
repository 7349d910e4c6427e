"""The per-frame tracking solve of one frame on the CPU, in float64 NumPy on preallocated-size arrays.

:class:`engine.fitting.FrameFitter` solves batches with PyTorch on any device; for the live case (one frame,
about 200 residuals x 60 unknowns) its cost is PyTorch's per-operation overhead, not arithmetic. This solver
runs the same Levenberg-Marquardt iterations (same residuals, priors, damping, chord steps and stopping
rules, see FrameFitter.fit) with each iteration assembled in a few dozen NumPy products:

- points: one matrix-vector product of the expression basis, one of the pose correctives, and a batched
  3x3 rotation of each active joint's share (LandmarkModel's sum over joints);
- Jacobian: the joint-major bases rotated by the world rotations in one product, the rotation columns as
  cross products with each fitted joint's arm, the projection applied per row;
- normal equations: one product J^T W J and a Cholesky solve of the small system.

Results equal FrameFitter's in float64 to rounding (tests compare both on synthetic sequences).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from engine.camera import MIN_DEPTH
from engine.fitting import FitConfig, FitResult, FrameBlock, FrameParams, Targets, fitted_joints, landmark_weights
from engine.flame import axis_angles, contour_row
from engine.landmark_model import LandmarkModel, LandmarkTable
from engine.timing import synchronizer

log = logging.getLogger(__name__)

#: Tables converted per contour row, as LandmarkModel keeps its own (the yaw rows a head visits).
_TABLES_KEPT = 16


def _skew(vector: np.ndarray) -> np.ndarray:
    x, y, z = vector
    return np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])


def _rodrigues(vectors: np.ndarray) -> np.ndarray:
    """(N, 3) -> (N, 3, 3), as engine.flame.rodrigues (the same 1e-8 offset keeps it smooth at zero)."""
    angle = np.linalg.norm(vectors + 1e-8, axis=-1)[:, None, None]
    axis = vectors / angle[:, :, 0]
    x, y, z = axis.T
    zero = np.zeros_like(x)
    skew = np.stack([zero, -z, y, z, zero, -x, -y, x, zero], axis=-1).reshape(-1, 3, 3)
    return np.eye(3) + np.sin(angle) * skew + (1 - np.cos(angle)) * (skew @ skew)


def _arrays(table: LandmarkTable) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A LandmarkTable's weight (.., L, Ja), rest (.., Ja, 3, L), coefficient and pose bases (.., Ja, 3, L, N), float64."""

    def array(tensor: torch.Tensor) -> np.ndarray:
        return tensor.detach().cpu().double().numpy()

    return array(table.weight), np.moveaxis(array(table.rest), -3, -1), array(table.coeff_basis), array(table.pose_basis)


class _Table:
    """The landmarks of one frame laid out for single-frame products: the static points after the contour
    row that the head's yaw selects (as LandmarkModel.single_frame_table joins them)."""

    def __init__(self, parts: list[tuple[np.ndarray, ...]], joints: np.ndarray, has_pose_correctives: bool, pose_features: np.ndarray, subtree: np.ndarray) -> None:
        weight, rest, coeff_basis, pose_basis = (np.concatenate(arrays, axis=axis) for arrays, axis in zip(zip(*parts), (0, 2, 2, 2)))
        active, _, count, n_coeffs = coeff_basis.shape
        self.joints = joints
        self.count = count
        self.weight = weight  # (L, Ja)
        self.rest = rest  # (Ja, 3, L)
        self.coeff_basis = coeff_basis.reshape(active * 3, count * n_coeffs)  # (Ja*3, L*C)
        self.coeff_rows = coeff_basis.reshape(active * 3 * count, n_coeffs)  # (Ja*3*L, C)
        self.has_pose_correctives = has_pose_correctives
        self.pose_rows = pose_basis.reshape(active * 3 * count, -1)  # (Ja*3*L, 9 (J-1))
        # The correctives' rotation Jacobian needs only the features of the fitted joints.
        self.pose_fitted = np.ascontiguousarray(pose_basis[..., pose_features]).reshape(active * 3, -1)
        self.subtree = subtree[:, joints]  # (fitted joints, Ja): which active joints move with each
        self.subtree_weight = self.weight @ self.subtree.T  # (L, fitted joints)
        self.joint_weights = np.ascontiguousarray(weight.T[:, None, :])  # (Ja, 1, L)


@dataclass
class _Frame:
    """One frame's observations in the solver's layout."""

    pixels: np.ndarray  # (2, L), NaN where not observed
    observed: np.ndarray  # (L,)
    group_weights: np.ndarray  # (L,), zero where not observed
    scale: float  # pixels per unit of normalised residual
    face_size: float
    focal: float
    center: tuple[float, float]
    robust_scale: float

    def __post_init__(self) -> None:
        # The residual (pixel - target) / scale as (points * focal_signs / depth + offsets) * unit_mask.
        self.focal_signs = np.array([[self.focal], [-self.focal]])
        self.offsets = np.where(self.observed, np.array(self.center)[:, None] - self.pixels, 0.0)
        self.unit_mask = self.observed / self.scale
        self.group_weights = np.where(self.observed, self.group_weights, 0.0)
        self.cost_weights = self.group_weights * self.robust_scale**2


@dataclass
class _State:
    exp: np.ndarray  # (E,)
    rotations: np.ndarray  # (J, 3, 3)
    transl: np.ndarray  # (3,)


@dataclass
class _Evaluation:
    """One state's landmarks, residuals and prior; what its Jacobian needs is kept with it."""

    table: _Table
    shares: np.ndarray  # (Ja, 3, L) each active joint's share of each landmark, posed
    world_rot: np.ndarray  # (J, 3, 3)
    world_pos: np.ndarray  # (J, 3)
    points: np.ndarray  # (3, L)
    errors: np.ndarray  # (2, L) normalised residuals, zero where not observed
    weights: np.ndarray  # (L,) robust weight times group weight, zero where not observed
    cost: float
    prior_gradient: np.ndarray
    prior_diagonal: np.ndarray


class CpuFrameFitter:
    """FrameFitter.fit for one frame at a time, in NumPy on the CPU, whatever device the model lives on.

    Built once per identity (``model`` from LandmarkModel.with_fixed_shape), like FrameFitter.
    """

    def __init__(self, model: LandmarkModel, config: FitConfig) -> None:
        self.model = model
        self.config = config
        self.joints = fitted_joints(model.n_joints, config)
        self.n_exp = model.n_coeffs
        self.size = self.n_exp + 3 * len(self.joints) + 3
        self.parents = list(model.parents)
        # The kinematic tree level by level (children of the root, their children, ...): one product per level.
        depth = [0] * len(self.parents)
        for joint in range(1, len(self.parents)):
            depth[joint] = depth[self.parents[joint]] + 1
        self.levels = [
            (np.array(level), np.array([self.parents[j] for j in level]))
            for level in ([j for j in range(1, len(depth)) if depth[j] == d] for d in range(1, max(depth, default=0) + 1))
        ]
        self.joint_rest = model.joint_rest.detach().cpu().double().numpy()  # (J, 3)
        self.joint_coeff_basis = model.joint_coeff_basis.detach().cpu().double().numpy()  # (J, 3, C)
        self.joint_offset_basis = self.joint_coeff_basis - self.joint_coeff_basis[[max(p, 0) for p in self.parents]]
        self.subtree = model.subtree.detach().cpu().double().numpy()[self.joints]  # (fitted, J): joints below each
        # Pose-corrective features are 9 per joint below the root: those of the fitted joints, and d vec(R)/d delta.
        self.corrected = [(i, joint) for i, joint in enumerate(self.joints) if joint > 0]
        self.pose_features = np.concatenate([np.arange(9 * (joint - 1), 9 * joint) for _, joint in self.corrected])
        self.generators = np.stack([_skew(axis) for axis in np.eye(3)])  # [e_a]x
        self.corrected_slots = [i for i, _ in self.corrected]
        self.corrected_joints = [joint for _, joint in self.corrected]
        self.translation_columns = np.eye(3)[:, None, :]
        # Every contour row converted once (about 10 MB for FLAME), so that a turning head costs one join per row.
        self.static = _arrays(model.static)
        self.contour = _arrays(model.contour) if model.contour is not None else None
        self._tables: dict[int | None, _Table] = {}
        self._priors(config)

    def _priors(self, config: FitConfig) -> None:
        """The prior and motion weights of [exp, fitted joint angles, translation]: FrameFitter's, in NumPy."""
        block = FrameBlock(self.n_exp, self.joints, config, {"dtype": torch.float64, "device": "cpu"})
        self.prior_weight, self.motion_weight = block.prior_weight.numpy(), block.motion_weight.numpy()
        self.coupling = block.coupling.numpy()
        self.jaw_opening = block.jaw_opening

    def _table(self, rotations: np.ndarray) -> _Table:
        row = contour_row(rotations[0]) if self.model.contour is not None else None
        table = self._tables.get(row)
        if table is None:
            if len(self._tables) >= _TABLES_KEPT:
                del self._tables[next(iter(self._tables))]  # the oldest row
            parts = [self.static] if row is None else [tuple(part[row] for part in self.contour), self.static]
            static = self.model.static
            table = self._tables[row] = _Table(parts, static.joints.cpu().numpy(), static.has_pose_correctives, self.pose_features, self.subtree)
        return table

    # ------------------------------------------------------------------------------------------ evaluation
    def _kinematics(self, exp: np.ndarray, rotations: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rest_joints = self.joint_rest + self.joint_coeff_basis @ exp
        world_rot = np.empty_like(rotations)
        world_pos = np.empty_like(rest_joints)
        world_rot[0], world_pos[0] = rotations[0], rest_joints[0]
        for joints, parents in self.levels:
            world_rot[joints] = world_rot[parents] @ rotations[joints]
            world_pos[joints] = (world_rot[parents] @ (rest_joints[joints] - rest_joints[parents])[..., None])[..., 0] + world_pos[parents]
        return rest_joints, world_rot, world_pos

    def _prior(self, state: _State, prediction: _State | None) -> tuple[float, np.ndarray, np.ndarray]:
        rotations = state.rotations[self.joints]
        if prediction is not None:
            relative = prediction.rotations[self.joints].transpose(0, 2, 1) @ rotations
            logs = axis_angles(np.concatenate([rotations, relative]))
            angles, change_angles = logs[: len(self.joints)].ravel(), logs[len(self.joints) :].ravel()
        else:
            angles = axis_angles(rotations).ravel()
        value = np.concatenate([state.exp, angles, state.transl])
        weight = self.prior_weight.copy()
        if value[self.jaw_opening] < 0:
            weight[self.jaw_opening] = self.config.priors.jaw_overclose
        coupled = value @ self.coupling
        gradient = weight * value + coupled
        cost = 0.5 * ((weight * value**2).sum() + (coupled * value).sum())
        diagonal = weight
        if prediction is not None:
            change = np.concatenate([state.exp - prediction.exp, change_angles, state.transl - prediction.transl])
            gradient = gradient + self.motion_weight * change
            cost = cost + 0.5 * (self.motion_weight * change**2).sum()
            diagonal = diagonal + self.motion_weight
        return cost, gradient, diagonal

    def _evaluate(self, state: _State, frame: _Frame, prediction: _State | None) -> _Evaluation:
        table = self._table(state.rotations)
        rest_joints, world_rot, world_pos = self._kinematics(state.exp, state.rotations)
        joints = table.joints
        rest = table.rest + (table.coeff_rows @ state.exp).reshape(table.rest.shape)
        if table.has_pose_correctives:
            features = (state.rotations[1:] - np.eye(3)).ravel()
            rest += (table.pose_rows @ features).reshape(table.rest.shape)
        # Each joint's share: R_j (S_lj - W_lj Jr_j) + W_lj P_j = R_j S_lj + W_lj (P_j - R_j Jr_j).
        offset = world_pos[joints] - (world_rot[joints] @ rest_joints[joints][..., None])[..., 0]  # (Ja, 3)
        shares = world_rot[joints] @ rest + table.joint_weights * offset[:, :, None]
        points = shares.sum(axis=0) + state.transl[:, None]
        depth = np.maximum(-points[2], MIN_DEPTH)
        # u = f x / (-z) + cx, v = f (-y) / (-z) + cy; errors normalised, zero where not observed.
        errors = (points[:2] * (frame.focal_signs / depth) + frame.offsets) * frame.unit_mask
        relative = (errors**2).sum(axis=0) / self.config.robust_scale**2
        weights = frame.group_weights / (1.0 + relative)
        data_cost = (frame.cost_weights * np.log1p(relative)).sum()
        prior_cost, prior_gradient, prior_diagonal = self._prior(state, prediction)
        return _Evaluation(table, shares, world_rot, world_pos, points, errors, weights, data_cost + prior_cost, prior_gradient, prior_diagonal)

    def _jacobian(self, state: _State, evaluation: _Evaluation, frame: _Frame) -> np.ndarray:
        """(2L, size) d residual / d [exp, rotation increments of the fitted joints, translation], rows x then y."""
        table, world_rot, world_pos = evaluation.table, evaluation.world_rot, evaluation.world_pos
        joints, count, n_exp, fitted = table.joints, table.count, self.n_exp, len(self.joints)
        rotation_rows = world_rot[joints].transpose(1, 0, 2).reshape(3, -1)  # (3, Ja*3)
        d_points = np.empty((3, count, self.size))
        # d points / d exp: sum_j R_j dS_lj/dc + W_lj (dP_j/dc - R_j dJr_j/dc).
        d_pos = np.empty_like(self.joint_coeff_basis)
        d_pos[0] = self.joint_coeff_basis[0]
        for joints_below, parents in self.levels:
            d_pos[joints_below] = world_rot[parents] @ self.joint_offset_basis[joints_below] + d_pos[parents]
        joint_term = d_pos[joints] - world_rot[joints] @ self.joint_coeff_basis[joints]  # (Ja, 3, C)
        d_points[..., :n_exp] = (rotation_rows @ table.coeff_basis).reshape(3, count, n_exp)
        d_points[..., :n_exp] += (table.weight @ joint_term.reshape(len(joints), -1)).reshape(count, 3, n_exp).transpose(1, 0, 2)
        # d points / d rotation increment a of joint k: e_a-th column of -[arm_lk]x Rw_k = (Rw_k e_a) x arm_lk.
        arms = (table.subtree @ evaluation.shares.reshape(len(joints), -1)).reshape(fitted, 3, count)
        arms -= table.subtree_weight.T[:, None, :] * world_pos[self.joints][:, :, None]
        axes = world_rot[self.joints][:, :, :, None]  # (fitted, xyz, a, 1): column a is the world axis of increment a
        arm = arms[:, :, None, :]  # (fitted, xyz, 1, L)
        d_rot = d_points[..., n_exp : n_exp + 3 * fitted].reshape(3, count, fitted, 3)
        for xyz in range(3):
            first, second = (xyz + 1) % 3, (xyz + 2) % 3
            d_rot[xyz] = (axes[:, first] * arm[:, second] - axes[:, second] * arm[:, first]).transpose(2, 0, 1)
        if table.has_pose_correctives and self.corrected:
            # d vec(R_k)/d delta_a = vec(R_k [e_a]x), through the pose-corrective bases rotated to the world.
            corrected = len(self.corrected)
            rotated = (rotation_rows @ table.pose_fitted).reshape(3 * count, corrected, 9).transpose(1, 0, 2)  # (K, 3L, 9)
            local = (state.rotations[self.corrected_joints][:, None] @ self.generators).reshape(-1, 3, 9).transpose(0, 2, 1)
            corrective = (rotated @ local).reshape(corrected, 3, count, 3)  # one product per joint (an einsum is 10x slower)
            d_rot[:, :, self.corrected_slots] += corrective.transpose(1, 2, 0, 3)
        d_points[..., -3:] = self.translation_columns
        # Projection u = f x / (-z), v = f (-y) / (-z), divided by the residual scale.
        depth = np.maximum(-evaluation.points[2], MIN_DEPTH)
        scale = (frame.focal / depth / frame.scale)[:, None]
        x_over_z = (evaluation.points[0] / depth)[:, None]
        y_over_z = (-evaluation.points[1] / depth)[:, None]
        jacobian = np.empty((2, count, self.size))
        np.multiply(x_over_z, d_points[2], out=jacobian[0])
        jacobian[0] += d_points[0]
        jacobian[0] *= scale
        np.multiply(y_over_z, d_points[2], out=jacobian[1])
        jacobian[1] -= d_points[1]
        jacobian[1] *= scale
        return jacobian.reshape(2 * count, self.size)

    # ----------------------------------------------------------------------------------------------- solve
    def _solve(self, hessian: np.ndarray, gradient: np.ndarray, damping: float) -> np.ndarray:
        """Marquardt step, as engine.fitting's: (H + damping diag(H) + tiny I) step = -gradient; zero if singular.

        PyTorch's LAPACK calls on the arrays' own memory: fewer checks per call than NumPy's.
        """
        diagonal = np.diagonal(hessian)
        damped = hessian + np.diag(diagonal * damping + 1e-9 * max(diagonal.max(), 1e-9))
        factor, info = torch.linalg.cholesky_ex(torch.from_numpy(damped))
        if info.item() != 0:
            return np.zeros_like(gradient)
        step = -torch.cholesky_solve(torch.from_numpy(gradient)[:, None], factor)[:, 0].numpy()
        return step if np.isfinite(step).all() else np.zeros_like(step)

    def _apply(self, state: _State, step: np.ndarray) -> _State:
        rotations = state.rotations.copy()
        deltas = step[self.n_exp : -3].reshape(len(self.joints), 3)
        rotations[self.joints] = state.rotations[self.joints] @ _rodrigues(deltas)
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
        face_size = float(targets.face_size[0])
        frame = _Frame(
            targets.pixels[0].detach().cpu().double().numpy().T, targets.observed[0].cpu().numpy(),
            targets.weights.detach().cpu().double().numpy(), config.noise * face_size, face_size, float(focal), center,
            config.robust_scale,
        )  # fmt: skip
        predicted_state = None if prediction is None else _state(prediction)
        state = _state(params)
        evaluation = self._evaluate(state, frame, predicted_state)
        damping = config.initial_damping
        # Chord steps exactly as FrameFitter.fit: the Jacobian is kept while steps are accepted.
        jacobian, fresh = None, False
        used = 0
        for used in range(1, iterations + 1):
            if jacobian is None:
                jacobian, fresh = self._jacobian(state, evaluation, frame), True
            weighted = jacobian * np.tile(evaluation.weights, 2)[:, None]
            hessian = (weighted.T @ jacobian) + self.coupling
            hessian[np.diag_indices(self.size)] += evaluation.prior_diagonal
            gradient = (weighted.T @ evaluation.errors.ravel()) + evaluation.prior_gradient
            step = self._solve(hessian, gradient, damping)
            candidate = self._apply(state, step)
            predicted = -(gradient @ step) - 0.5 * (step @ hessian @ step)
            if predicted < config.cost_tolerance * evaluation.cost:
                state = candidate
                break
            evaluation_c = self._evaluate(candidate, frame, predicted_state)
            accept = bool(np.isfinite(evaluation_c.cost)) and evaluation_c.cost <= evaluation.cost
            gain = (evaluation.cost - evaluation_c.cost) / max(evaluation.cost, 1e-12)
            damping = min(max(damping / 3 if accept else damping * 10, 1e-7), 1e7)
            if accept:
                state, evaluation, fresh = candidate, evaluation_c, False
            elif not fresh:
                jacobian = None
            if np.abs(step).max() < config.step_tolerance or (accept and gain < config.cost_tolerance):
                break
        return self._result(state, evaluation, frame, params, used)

    def _result(self, state: _State, evaluation: _Evaluation, frame: _Frame, like: FrameParams, used: int) -> FitResult:
        options = {"dtype": like.exp.dtype, "device": like.exp.device}
        params = FrameParams(
            torch.as_tensor(state.exp[None], **options), torch.as_tensor(state.rotations[None], **options),
            torch.as_tensor(state.transl[None], **options),
        )  # fmt: skip
        weights = evaluation.weights
        mean_square = (weights * (evaluation.errors**2).sum(axis=0)).sum() / max(weights.sum(), 1e-12)
        rms_px = np.sqrt(mean_square) * self.config.noise * frame.face_size
        return FitResult(params, torch.tensor([evaluation.cost], **options), torch.tensor([rms_px], **options), used)


def _state(params: FrameParams) -> _State:
    def array(tensor: torch.Tensor) -> np.ndarray:
        return tensor[0].detach().cpu().double().numpy()

    return _State(array(params.exp), array(params.rotations), array(params.transl))



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

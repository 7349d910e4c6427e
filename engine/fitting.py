"""Levenberg-Marquardt fitting of a head model to 2D landmarks.

Two problems share one residual model:
- :class:`FrameFitter` fits per-frame parameters (expression, joint rotations, translation) for a batch of
  independent frames with the identity fixed: the per-frame tracking step, warm-started, a few iterations;
- :func:`calibrate` fits one identity (shape) and focal length shared by several frames jointly with each
  frame's parameters, eliminating the per-frame blocks with a Schur complement so the cost grows linearly
  with the number of frames.

Residuals are pixel errors divided by ``noise * face size`` (so every weight is independent of image
resolution and face size) under a Cauchy robust loss (IRLS weights), plus Gaussian priors on shape,
expression and joint rotations (jaw hinge, coupled eyes) and, when tracking, temporal terms that pull each
parameter towards its prediction from the previous frames. Rotations are updated multiplicatively,
R <- R exp([delta]), so no Euler singularities arise. A step that raises the cost is refused and the damping
raised; a non-finite step leaves the state as it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
import torch

from engine.camera import FOV_RANGE_DEG, focal_from_fov, project, project_with_jacobian
from engine.config import Range
from engine.flame import rodrigues, rotation_log
from engine.frames import FrameArrays, FrameParams
from engine.head_model import JAW, LEFT_EYE, NECK, RIGHT_EYE, ROOT, has_eyes
from engine.jit import compiled
from engine.landmark_model import LandmarkEvaluation, LandmarkModel


@dataclass
class Priors:
    """Weights of the Gaussian priors, in units of one landmark's squared normalised residual."""

    shape: float = 1.0
    exp: float = 0.05
    #: Eyelid weights (0 open, 1 closed), when the model has eyelid blendshapes.
    eyelids: float = 0.05
    #: Jaw rotation about its local x (opening), y and z; opening beyond closed (negative x) is penalised hard.
    jaw: tuple[float, float, float] = (0.5, 200.0, 200.0)
    jaw_overclose: float = 500.0
    neck: float = 50.0
    eyes: float = 2.0
    eye_coupling: float = 50.0  # the two eyes look the same way
    fov_deg: Annotated[float, Range(*FOV_RANGE_DEG)] = 50.0
    fov: float = 2.0  # on log(focal)


@dataclass
class Temporal:
    """Weights pulling each parameter towards its prediction from previous frames (tracking only)."""

    exp: float = 0.5
    #: Lower than the expression's: a blink closes and opens the lids within a few frames.
    eyelids: float = 0.1
    jaw: float = 20.0
    eyes: float = 2.0
    neck: float = 50.0
    head_rotation: float = 200.0  # per radian^2
    translation: float = 2.0e4  # per metre^2


@dataclass
class FitConfig:
    group_weights: dict[str, float] = field(default_factory=lambda: {"lmk68": 1.0, "mediapipe": 0.5, "eyes": 2.0})
    noise: float = 0.004  # expected landmark noise as a fraction of the face size (bounding-box diagonal)
    robust_scale: float = 3.0  # Cauchy scale, in units of the noise
    priors: Priors = field(default_factory=Priors)
    temporal: Temporal = field(default_factory=Temporal)
    fit_neck: bool = False
    track_iterations: int = 4
    calib_iterations: int = 25
    initial_damping: float = 1e-3
    #: Stop when no parameter moves more than this (radians, coefficients, metres) ...
    step_tolerance: float = 1e-4
    #: ... or when an accepted step lowers the cost by less than this fraction (calibration: the second).
    cost_tolerance: float = 1e-2
    calibration_tolerance: float = 1e-4


@dataclass
class Targets:
    """Observed pixels per landmark of a LandmarkModel, NaN where not observed, and per-landmark weights."""

    pixels: torch.Tensor  # (B, L, 2)
    weights: torch.Tensor  # (L,) group weight of each landmark

    def __post_init__(self) -> None:
        # Compiled: for a frame's few hundred points even NumPy's per-call overhead costs more than the work.
        observed, extent = _observed_extent(self.pixels.numpy(force=True))
        self.observed = torch.from_numpy(observed).to(self.pixels.device)  # (B, L)
        #: (B,) bounding-box diagonal of the observed points, in pixels. PyTorch's norm, to the bit as before:
        #: the fits (and calibration, with a poorly conditioned identity space) follow this scale.
        self.face_size = torch.linalg.vector_norm(torch.from_numpy(extent), dim=-1).clamp_min(1.0).to(self.pixels.device)


@dataclass
class FrameTargets:
    """One frame's :class:`Targets` as NumPy arrays, for the per-frame solver on the CPU (engine.frame_solver):
    a live frame makes no tensor. The same values as a batch of one's Targets (tests compare both)."""

    pixels: np.ndarray  # (L, 2) float64 holding values of the model's dtype, NaN where not observed
    weights: np.ndarray  # (L,) float64 group weight of each landmark
    observed: np.ndarray  # (L,) bool
    face_size: float  # bounding-box diagonal of the observed points, pixels

    @staticmethod
    def of(pixels: np.ndarray, weights: np.ndarray) -> FrameTargets:
        """From pixels (L, 2) in the model's dtype (as Targets' tensor holds them), C-contiguous, and float64
        weights (L,)."""
        pixels64, observed, face_size = frame_target_arrays(pixels)
        return FrameTargets(pixels64, weights, observed, face_size)


@compiled
def frame_target_arrays(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """:class:`FrameTargets`' arrays of pixels (L, 2) in the model's dtype: the pixels in float64, which are
    observed (L,) and the face size (compiled: one call per frame)."""
    observed, extent = _observed_extent(pixels.reshape(1, pixels.shape[0], 2))
    return pixels.astype(np.float64), observed[0], max(_diagonal(extent[0]), 1.0)


@compiled
def _diagonal(extent: np.ndarray) -> float:
    """The length of an extent (2,) as PyTorch's vector_norm computes it on the CPU in the extent's dtype: x^2
    rounded to the dtype plus y^2 in one fused multiply-add, then the square root. For float32 (the tracker's
    dtype) the float64 sum below stands in for the fused one (the tests compare it with PyTorch); float64 has
    no wider type here and may differ from PyTorch in the last bit. (np.float64, not float(): numba's float()
    of a float32 stays a float32.)"""
    x, y = extent[0], extent[1]
    total = np.empty(1, extent.dtype)
    total[0] = np.float64(x * x) + np.float64(y) * np.float64(y)
    return np.float64(np.sqrt(total[0]))


@compiled
def _observed_extent(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which landmarks of pixels (B, L, 2) are observed (both coordinates finite): (B, L) bool, and the extent
    (B, 2) of each item's observed points' bounding box in the pixels' dtype (-inf without any)."""
    batch, count = pixels.shape[0], pixels.shape[1]
    observed = np.zeros((batch, count), dtype=np.bool_)
    low = np.full((batch, 2), np.inf, dtype=pixels.dtype)
    high = np.full((batch, 2), -np.inf, dtype=pixels.dtype)
    for item in range(batch):
        for landmark in range(count):
            x, y = pixels[item, landmark, 0], pixels[item, landmark, 1]
            if math.isfinite(x) and math.isfinite(y):
                observed[item, landmark] = True
                low[item, 0], low[item, 1] = min(low[item, 0], x), min(low[item, 1], y)
                high[item, 0], high[item, 1] = max(high[item, 0], x), max(high[item, 1], y)
    return observed, high - low


def landmark_weights(model: LandmarkModel, config: FitConfig) -> torch.Tensor:
    weights = torch.zeros(model.n_landmarks, dtype=model.joint_rest.dtype, device=model.joint_rest.device)
    for group, part in model.slices.items():
        weights[part] = config.group_weights.get(group, 1.0)
    return weights


def _options(like: torch.Tensor) -> dict:
    return {"dtype": like.dtype, "device": like.device}


def fitted_joints(n_joints: int, config: FitConfig) -> list[int]:
    joints = [ROOT] + ([NECK] if config.fit_neck else []) + [JAW]
    return joints + ([LEFT_EYE, RIGHT_EYE] if has_eyes(n_joints) else [])


@dataclass
class _Residuals:
    values: torch.Tensor  # (B, L*2) normalised residuals, zero where not observed
    weights: torch.Tensor  # (B, L*2) robust weight times group weight, zero where not observed
    data_cost: torch.Tensor  # (B,)
    scale: torch.Tensor  # (B, 1, 1) pixels per unit of normalised residual
    # Filled in by _linearise, only for states the solver linearises.
    d_points: torch.Tensor | None = None  # (B, L*2, 3) d residual / d world point, normalised
    d_log_focal: torch.Tensor | None = None  # (B, L*2)


@dataclass
class _Assessment:
    """One state of the fit, evaluated without Jacobians: its landmarks, residuals and total cost, and the
    per-frame priors' gradient and Hessian diagonal (for the next step's normal equations)."""

    evaluation: LandmarkEvaluation
    residuals: _Residuals
    cost: torch.Tensor  # (B,) per frame (FrameFitter), or () the whole joint problem (calibrate)
    prior_gradient: torch.Tensor  # (B, size)
    prior_diagonal: torch.Tensor  # (B, size)


def _residuals(evaluation: LandmarkEvaluation, focal: torch.Tensor, center: tuple[float, float], targets: Targets, config: FitConfig) -> _Residuals:
    pixels = project(evaluation.points, focal, center)
    observed = targets.observed
    scale = (config.noise * targets.face_size)[:, None, None]
    error = torch.where(observed[..., None], (pixels - targets.pixels) / scale, torch.zeros_like(pixels))
    squared = (error**2).sum(dim=-1)  # (B, L)
    c2 = config.robust_scale**2
    robust = 1.0 / (1.0 + squared / c2)
    weights = torch.where(observed, targets.weights * robust, torch.zeros_like(robust))
    data_cost = (targets.weights * observed * c2 * torch.log1p(squared / c2)).sum(dim=1)
    batch, count = squared.shape
    return _Residuals(error.reshape(batch, count * 2), weights.repeat_interleave(2, dim=1), data_cost, scale)


def _linearise(model: LandmarkModel, evaluation: LandmarkEvaluation, residuals: _Residuals, focal: torch.Tensor, center: tuple[float, float]) -> LandmarkEvaluation:
    """Add the Jacobians of the landmarks and of their projection to an evaluation and its residuals."""
    if residuals.d_points is None:
        _, d_points, d_log_focal = project_with_jacobian(evaluation.points, focal, center)
        batch, count = d_points.shape[:2]
        residuals.d_points = (d_points / residuals.scale[..., None]).reshape(batch, count * 2, 3)
        residuals.d_log_focal = (d_log_focal / residuals.scale).reshape(batch, count * 2)
    return model.add_jacobians(evaluation)


class FrameBlock:
    """Jacobian columns and priors of the per-frame parameters: [exp, rotation increments, translation].

    The priors act on one vector per frame, [exp, axis-angle of each fitted joint, translation], with
    per-element weights built once; only the jaw's over-closing hinge changes per evaluation. ``n_exp`` counts
    every expression coefficient, the last ``n_eyelids`` of them being eyelid weights with priors of their own.
    """

    def __init__(self, n_exp: int, joints: list[int], config: FitConfig, options: dict, n_eyelids: int = 0) -> None:
        self.n_exp = n_exp
        self.joints = joints
        self.joint_index = torch.tensor(joints, dtype=torch.long, device=options["device"])  # indexing without a list
        self.config = config
        self.size = n_exp + 3 * len(joints) + 3
        priors, temporal = config.priors, config.temporal
        prior = torch.zeros(self.size, **options)
        motion = torch.zeros(self.size, **options)
        self.coupling = torch.zeros(self.size, self.size, **options)
        prior[:n_exp], motion[:n_exp] = priors.exp, temporal.exp
        if n_eyelids:
            prior[n_exp - n_eyelids : n_exp], motion[n_exp - n_eyelids : n_exp] = priors.eyelids, temporal.eyelids
        motion[-3:] = temporal.translation
        joint_prior = {NECK: priors.neck, JAW: torch.tensor(priors.jaw, **options), LEFT_EYE: priors.eyes, RIGHT_EYE: priors.eyes}
        joint_motion = {ROOT: temporal.head_rotation, NECK: temporal.neck, JAW: temporal.jaw, LEFT_EYE: temporal.eyes, RIGHT_EYE: temporal.eyes}
        self.rot_slices = {joint: slice(n_exp + 3 * i, n_exp + 3 * i + 3) for i, joint in enumerate(joints)}
        for joint, part in self.rot_slices.items():
            prior[part] = joint_prior.get(joint, 0.0)
            motion[part] = joint_motion[joint]
        if LEFT_EYE in self.rot_slices:
            left, right = self.rot_slices[LEFT_EYE], self.rot_slices[RIGHT_EYE]
            eye3 = priors.eye_coupling * torch.eye(3, **options)
            self.coupling[left, left], self.coupling[right, right] = eye3, eye3
            self.coupling[left, right], self.coupling[right, left] = -eye3, -eye3
        self.jaw_opening = self.rot_slices[JAW].start
        self.jaw_overclose = torch.tensor(priors.jaw_overclose, **options)
        prior[-3:] = 0  # translation has no prior of its own
        self.prior_weight, self.motion_weight = prior, motion

    def jacobian(self, evaluation: LandmarkEvaluation, residuals: _Residuals) -> torch.Tensor:
        """(B, L*2, size) d residual / d frame parameters."""
        batch = residuals.values.shape[0]
        d_points = residuals.d_points.reshape(batch, -1, 2, 3)
        d_exp = d_points @ evaluation.d_coeffs[..., -self.n_exp :] if self.n_exp else d_points[..., :0]
        d_rot = d_points @ evaluation.d_rotations.index_select(3, self.joint_index).flatten(-2)
        columns = [d_exp, d_rot, d_points]
        return torch.cat(columns, dim=-1).reshape(batch, residuals.values.shape[1], self.size)

    def hessian(self, diagonal: torch.Tensor) -> torch.Tensor:
        """The priors' Hessian (B, size, size) from the diagonal that :meth:`prior` returns."""
        return torch.diag_embed(diagonal) + self.coupling

    def prior(self, params: FrameParams, prediction: FrameParams | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prior cost (B,), gradient (B, size) and Hessian diagonal (B, size) of the per-frame parameters."""
        rotations = params.rotations.index_select(1, self.joint_index)
        if prediction is not None:  # one log for the joint angles and their change since the prediction
            relative = prediction.rotations.index_select(1, self.joint_index).transpose(-1, -2) @ rotations
            logs = rotation_log(torch.cat([rotations, relative], dim=1)).flatten(1)
            angles, change_angles = logs.chunk(2, dim=1)
        else:
            angles = rotation_log(rotations).flatten(1)
        value = torch.cat([params.exp, angles, params.transl], dim=1)
        weight = self.prior_weight.expand_as(value).clone()
        weight[:, self.jaw_opening] = torch.where(value[:, self.jaw_opening] < 0, self.jaw_overclose, self.prior_weight[self.jaw_opening])
        coupled = value @ self.coupling
        gradient = weight * value + coupled
        cost = 0.5 * ((weight * value**2).sum(dim=1) + (coupled * value).sum(dim=1))
        diagonal = weight
        if prediction is not None:
            change = torch.cat([params.exp - prediction.exp, change_angles, params.transl - prediction.transl], dim=1)
            gradient = gradient + self.motion_weight * change
            cost = cost + 0.5 * (self.motion_weight * change**2).sum(dim=1)
            diagonal = diagonal + self.motion_weight
        return cost, gradient, diagonal

    def apply(self, params: FrameParams, step: torch.Tensor) -> FrameParams:
        exp = params.exp + step[:, : self.n_exp]
        deltas = step[:, self.n_exp : -3].reshape(step.shape[0], len(self.joints), 3)
        rotations = params.rotations.clone()
        rotations[:, self.joint_index] = params.rotations.index_select(1, self.joint_index) @ rodrigues(deltas)
        return FrameParams(exp, rotations, params.transl + step[:, -3:])


@dataclass
class FitResult:
    params: FrameParams
    cost: torch.Tensor  # (B,) final cost
    rms_px: torch.Tensor  # (B,) robustly weighted RMS landmark error in pixels
    iterations: int

    def frame(self, row: int = 0) -> FrameFit:
        """One frame of the batch as a :class:`FrameFit`."""
        return FrameFit(self.params.arrays(row), float(self.cost[row]), float(self.rms_px[row]), self.iterations)


@dataclass
class FrameFit:
    """One frame's :class:`FitResult` in NumPy and floats (the per-frame CPU solver's, and what the tracker
    takes from either solver)."""

    params: FrameArrays
    cost: float
    rms_px: float  # a value of the parameters' dtype, as FitResult's tensor holds it
    iterations: int


def _weighted_rms_px(residuals: _Residuals, targets: Targets, config: FitConfig) -> torch.Tensor:
    weights = residuals.weights
    mean_square = (weights * residuals.values**2).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-12) * 2
    return mean_square.sqrt() * config.noise * targets.face_size


def _solve(hessian: torch.Tensor, gradient: torch.Tensor, damping: torch.Tensor) -> torch.Tensor:
    """Marquardt step: (H + damping * diag(H) + tiny I) step = -gradient, batched."""
    diagonal = torch.diagonal(hessian, dim1=-2, dim2=-1)
    regular = diagonal * damping[:, None] + 1e-9 * diagonal.amax(dim=-1, keepdim=True).clamp_min(1e-9)
    factor, info = torch.linalg.cholesky_ex(hessian + torch.diag_embed(regular))
    step = -torch.cholesky_solve(gradient[..., None], factor)[..., 0]
    return torch.where((info == 0)[:, None] & torch.isfinite(step), step, torch.zeros_like(step))


class FrameFitter:
    """Per-frame fits with the identity fixed (``model`` from LandmarkModel.with_fixed_shape).

    Built once per identity: the priors' weight vectors are made here, not for every frame.
    """

    def __init__(self, model: LandmarkModel, config: FitConfig) -> None:
        self.model = model
        self.config = config
        options = _options(model.joint_rest)
        self.block = FrameBlock(model.n_coeffs, fitted_joints(model.n_joints, config), config, options, model.layer.n_eyelids)
        self.initial_damping = torch.full((1,), config.initial_damping, **options)

    def fit(
        self,
        params: FrameParams,
        targets: Targets,
        focal: torch.Tensor,
        center: tuple[float, float],
        prediction: FrameParams | None = None,
        iterations: int | None = None,
    ) -> FitResult:
        """Fit a batch of independent frames, starting from ``params``; ``prediction`` adds temporal priors."""
        model, block, config = self.model, self.block, self.config
        iterations = config.track_iterations if iterations is None else iterations
        damping = self.initial_damping.expand(params.exp.shape[0])
        state = params
        current = self.assess(state, targets, focal, center, prediction)
        # After the first iteration the Jacobian is kept (a chord step): warm-started frames move little, so
        # re-linearising would cost most of an iteration for the same step. Residuals, robust weights and
        # priors are always current, so the fixed point is unchanged; a refused chord step re-linearises.
        jacobian, fresh = None, False
        used = 0
        for used in range(1, iterations + 1):
            residuals = current.residuals
            if jacobian is None:
                jacobian, fresh = block.jacobian(_linearise(model, current.evaluation, residuals, focal, center), residuals), True
            weighted = jacobian * residuals.weights[..., None]
            hessian = weighted.transpose(1, 2) @ jacobian + block.hessian(current.prior_diagonal)
            gradient = (weighted.transpose(1, 2) @ residuals.values[..., None])[..., 0] + current.prior_gradient
            step = _solve(hessian, gradient, damping)
            candidate = block.apply(state, step)
            # The quadratic model predicts the step's gain; when it is negligible, take the step unchecked and
            # spare the evaluation that would only confirm convergence.
            predicted = -(gradient * step).sum(dim=1) - 0.5 * (step[:, None] @ hessian @ step[..., None])[:, 0, 0]
            if bool((predicted < config.cost_tolerance * current.cost).all()):
                state = candidate
                break
            trial = self.assess(candidate, targets, focal, center, prediction)
            accept = torch.isfinite(trial.cost) & (trial.cost <= current.cost)
            gain = (current.cost - trial.cost) / current.cost.clamp_min(1e-12)
            damping = torch.where(accept, damping / 3, damping * 10).clamp(1e-7, 1e7)
            if bool(accept.all()):
                state, current = candidate, trial
                fresh = False
            elif bool(accept.any()):
                state = _merge(accept, candidate, state)
                current = self.assess(state, targets, focal, center, prediction)
                jacobian = None
            elif not fresh:
                jacobian = None
            settled = (step.abs().amax(dim=1) < config.step_tolerance) | (accept & (gain < config.cost_tolerance))
            if bool(settled.all()):
                break
        return FitResult(state, current.cost, _weighted_rms_px(current.residuals, targets, config), used)

    def assess(
        self, state: FrameParams, targets: Targets, focal: torch.Tensor, center: tuple[float, float], prediction: FrameParams | None
    ) -> _Assessment:
        """`state` against `targets`: landmarks, residuals, and the cost with the priors (and temporal terms)."""
        evaluation = self.model.evaluate(state.exp, state.rotations, state.transl, jacobians=False)
        residuals = _residuals(evaluation, focal, center, targets, self.config)
        prior_cost, prior_gradient, prior_diagonal = self.block.prior(state, prediction)
        return _Assessment(evaluation, residuals, residuals.data_cost + prior_cost, prior_gradient, prior_diagonal)


def _merge(take_first: torch.Tensor, first: FrameParams, second: FrameParams) -> FrameParams:
    def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(take_first.reshape(-1, *([1] * (a.dim() - 1))), a, b)

    return FrameParams(pick(first.exp, second.exp), pick(first.rotations, second.rotations), pick(first.transl, second.transl))


@dataclass
class Calibration:
    """One identity and focal length shared by several frames, and each frame's own parameters."""

    shape: torch.Tensor  # (S,)
    focal: float
    frames: FitResult
    #: How well the frames determined the focal length: the standard deviation of log(focal) that the data
    #: alone allow (the inverse square root of the cost's curvature along log focal, with the identity and
    #: every frame's pose free), e.g. 0.1 = about 10 %. None when the focal length was not fitted.
    log_focal_std: float | None = None


def calibrate(
    model: LandmarkModel,
    params: FrameParams,
    targets: Targets,
    focal: float,
    center: tuple[float, float],
    config: FitConfig,
    fit_focal: bool = True,
    shape: torch.Tensor | None = None,
    iterations: int | None = None,
) -> Calibration:
    """Joint fit of shape (and focal length) with the per-frame parameters of K frames.

    ``model`` evaluates shape and expression coefficients (not a fixed-shape model). The per-frame blocks
    are eliminated by a Schur complement: each iteration solves K small systems and one of size n_shape(+1).
    """
    n_shape = model.layer.n_shape
    options = _options(params.exp)
    block = FrameBlock(model.n_coeffs - n_shape, fitted_joints(model.n_joints, config), config, options, model.layer.n_eyelids)
    frames = params.exp.shape[0]
    shape = torch.zeros(n_shape, **options) if shape is None else shape.to(**options)
    log_focal = torch.tensor(math.log(focal), **options)
    prior_log_focal = math.log(focal if not fit_focal else focal_from_fov(config.priors.fov_deg, 2 * center[1]))
    n_shared = n_shape + (1 if fit_focal else 0)
    iterations = config.calib_iterations if iterations is None else iterations

    problem = _JointProblem(model, block, targets, center, config, fit_focal, prior_log_focal)
    state = params
    current = problem.assess(state, shape, log_focal)
    damping = torch.tensor([config.initial_damping], **options)
    used = 0
    schur = None
    for used in range(1, iterations + 1):
        evaluation, residuals, cost = current.evaluation, current.residuals, current.cost
        frame_jacobian = block.jacobian(_linearise(model, evaluation, residuals, log_focal.exp(), center), residuals)  # (K, 2L, P)
        d_points = residuals.d_points.reshape(frames, -1, 2, 3)
        shared_columns = [(d_points @ evaluation.d_coeffs[..., :n_shape]).flatten(1, 2)]
        if fit_focal:
            shared_columns.append(residuals.d_log_focal[..., None])
        shared_jacobian = torch.cat(shared_columns, dim=-1)  # (K, 2L, n_shared)
        weights = residuals.weights[..., None]
        h_ff = (frame_jacobian * weights).transpose(1, 2) @ frame_jacobian + block.hessian(current.prior_diagonal)
        h_sf = (shared_jacobian * weights).transpose(1, 2) @ frame_jacobian  # (K, n_shared, P)
        h_ss = ((shared_jacobian * weights).transpose(1, 2) @ shared_jacobian).sum(dim=0)
        g_f = ((frame_jacobian * weights).transpose(1, 2) @ residuals.values[..., None])[..., 0] + current.prior_gradient
        g_s = ((shared_jacobian * weights).transpose(1, 2) @ residuals.values[..., None])[..., 0].sum(dim=0)
        h_ss = h_ss + torch.diag_embed(torch.cat([torch.full((n_shape,), config.priors.shape, **options), torch.full((n_shared - n_shape,), config.priors.fov, **options)]))
        g_s[:n_shape] += config.priors.shape * shape
        if fit_focal:
            g_s[n_shape] += config.priors.fov * (log_focal - prior_log_focal)

        h_ff_damped = h_ff + torch.diag_embed(torch.diagonal(h_ff, dim1=-2, dim2=-1) * damping + 1e-9)
        factor, info = torch.linalg.cholesky_ex(h_ff_damped)
        if bool((info != 0).any()):
            damping = damping * 10
            continue
        solved = torch.cholesky_solve(torch.cat([h_sf.transpose(1, 2), g_f[..., None]], dim=-1), factor)
        schur = h_ss - (h_sf @ solved[..., :n_shared]).sum(dim=0)
        reduced = g_s - (h_sf @ solved[..., n_shared:]).sum(dim=0)[..., 0]
        shared_step = _solve(schur[None], reduced[None], damping)[0]
        frame_step = -(solved[..., n_shared:][..., 0] + (solved[..., :n_shared] @ shared_step[:, None])[..., 0])
        if not bool(torch.isfinite(frame_step).all() and torch.isfinite(shared_step).all()):
            damping = damping * 10
            continue

        candidate = block.apply(state, frame_step)
        shape_c = shape + shared_step[:n_shape]
        log_focal_c = log_focal + shared_step[n_shape] if fit_focal else log_focal
        trial = problem.assess(candidate, shape_c, log_focal_c)
        if bool(torch.isfinite(trial.cost)) and bool(trial.cost <= cost):
            state, shape, log_focal, current = candidate, shape_c, log_focal_c, trial
            converged = bool(cost - trial.cost <= config.calibration_tolerance * cost) or max(frame_step.abs().max(), shared_step.abs().max()) < config.step_tolerance
            damping = (damping / 3).clamp_min(1e-7)
            if converged:
                break
        else:
            damping = damping * 10
            if bool(damping > 1e4):  # steps that short no longer lower the cost: this is the minimum
                break
    residuals = current.residuals
    result = FitResult(state, residuals.data_cost, _weighted_rms_px(residuals, targets, config), used)
    spread = _log_focal_std(schur, residuals, config, n_shared + frames * block.size) if fit_focal else None
    return Calibration(shape, float(log_focal.exp()), result, spread)


@dataclass
class _JointProblem:
    """What the cost of :func:`calibrate` depends on besides the state, the identity and the focal length."""

    model: LandmarkModel
    block: FrameBlock
    targets: Targets
    center: tuple[float, float]
    config: FitConfig
    fit_focal: bool
    prior_log_focal: float

    def assess(self, state: FrameParams, shape: torch.Tensor, log_focal: torch.Tensor) -> _Assessment:
        """All frames with one identity `shape` and focal length: the cost is the whole problem's (a scalar)."""
        config = self.config
        coeffs = torch.cat([shape.expand(state.exp.shape[0], -1), state.exp], dim=1)
        evaluation = self.model.evaluate(coeffs, state.rotations, state.transl, jacobians=False)
        residuals = _residuals(evaluation, log_focal.exp(), self.center, self.targets, config)
        prior_cost, prior_gradient, prior_diagonal = self.block.prior(state, None)
        shared_cost = 0.5 * config.priors.shape * (shape**2).sum()
        if self.fit_focal:
            shared_cost = shared_cost + 0.5 * config.priors.fov * (log_focal - self.prior_log_focal) ** 2
        total = (residuals.data_cost + prior_cost).sum() + shared_cost
        return _Assessment(evaluation, residuals, total, prior_gradient, prior_diagonal)


def _log_focal_std(schur: torch.Tensor | None, residuals: _Residuals, config: FitConfig, n_params: int) -> float:
    """sigma of log(focal) from the data: the marginal curvature along it (the Schur complement's last row,
    with the identity eliminated too) without the priors, scaled by the residuals' actual
    variance (the model's misfit counts as noise, so a fit that explains the frames poorly is not trusted)."""
    if schur is None:
        return math.inf
    # The data's own curvature: without the identity prior, which would otherwise lend the focal length a
    # certainty that only comes from preferring the mean face.
    data = schur.double() - torch.diag_embed(torch.full((schur.shape[0],), config.priors.shape, dtype=torch.float64))
    data[-1, -1] += config.priors.shape - config.priors.fov
    inverse = torch.linalg.pinv(data, hermitian=True)
    curvature = 1.0 / float(inverse[-1, -1])
    observed = int((residuals.weights > 0).sum())
    variance = max(2.0 * float(residuals.data_cost.sum()) / max(observed - n_params, 1), 1.0)
    return math.sqrt(variance / curvature) if curvature > 0 else math.inf

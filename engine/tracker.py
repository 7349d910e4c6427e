"""Tracking: fit one image, calibrate identity once from diverse frames, then fit every frame warm-started.

The per-frame life of a :class:`Tracker`:

1. Until calibrated, every tracked frame (fitted with the current identity, the mean face at first) is a
   candidate for calibration; after ``calibration_seconds`` the most diverse ones (head pose and expression,
   farthest-point selection) are fitted jointly for one identity and focal length, which is then frozen.
2. Each frame starts from the previous one (or a constant-velocity prediction) and runs a few
   Levenberg-Marquardt iterations with temporal priors; a frame without a face, with too few landmarks or
   with a residual that is too high is marked invalid, the last good parameters are held, and the next
   face is re-acquired from a cold start (PnP on the mean pose).

The model, its landmarks, the camera and the identity in use are the tracker's :class:`~engine.rig.HeadRig`
(``tracker.rig``); the tracker itself is the state machine above. Output frames are
:class:`engine.frames.TrackedFrame`; ``engine.frames`` (and the rig, for what needs the model) converts them to
the reference format, the wire message and back.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated, Literal

import cv2
import numpy as np
import torch

from engine.camera import FLIP, FOV_RANGE_DEG, Camera, fov_from_focal
from engine.config import Range
from engine.errors import UserError
from engine.filters import OneEuroConfig, OneEuroFilter
from engine.fitting import Calibration, FitConfig, FrameFit, FrameFitter, FrameTargets, Targets, calibrate
from engine.flame import axis_angles, rotation_matrices
from engine.frames import NUMPY_DTYPES, FrameArrays, FrameParams, TrackedFrame, camera_from_world, frame_from_params
from engine.frame_solver import CpuFrameFitter, faster_frame_solver
from engine.head_model import HeadModel
from engine.jit import compiled
from engine.landmark_model import LandmarkModel
from engine.rig import HeadRig, RigIdentity
from engine.targets import trackable_face

log = logging.getLogger(__name__)

_FLIP = np.array(FLIP)


@dataclass
class TrackerConfig:
    n_shape: Annotated[int, Range(1)] = 100
    n_exp: Annotated[int, Range(1)] = 50
    #: Vertical field of view in degrees that tracking starts with: the known one when ``fit_fov`` is False, else
    #: the first guess that calibration replaces; None: the webcam default (``fit.priors.fov_deg``).
    fov_deg: Annotated[float, Range(*FOV_RANGE_DEG)] | None = None
    #: Estimate the field of view during calibration; False keeps ``fov_deg`` as given (``--fov``).
    fit_fov: bool = True
    #: An estimated FOV is kept only when the frames determined log(focal) this well (standard deviation; 0.1
    #: is about +-10 % in focal length); otherwise ``fov_deg`` (by default the webcam default) is used.
    fov_max_log_std: float = 0.05
    fit: FitConfig = field(default_factory=FitConfig)
    calibration_frames: Annotated[int, Range(1)] = 8
    #: Live: how long to gather candidate frames before calibrating.
    calibration_seconds: float = 2.0
    candidate_pool: int = 64
    warm_start: Literal["velocity", "previous", "none"] = "velocity"
    cold_iterations: int = 12
    #: A fit whose weighted RMS landmark error exceeds this fraction of the face size counts as lost.
    loss_threshold: float = 0.06
    #: At least this fraction of the landmarks must be observed (finite) for a frame to be fitted.
    min_observed_fraction: Annotated[float, Range(0, 1)] = 0.5
    #: Observed landmarks spanning less than this (bounding-box diagonal, pixels) are not a trackable face.
    min_face_px: float = 8.0
    #: Landmarks whose spread across their main direction is below this fraction of the spread along it
    #: (collinear points) are not a trackable face.
    min_face_aspect: float = 0.05
    output_filter: OneEuroConfig | None = None
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    #: Per-frame solve: "numpy" on the CPU whatever ``device`` is (one frame is too small for PyTorch's
    #: per-operation cost, let alone kernel launches), "torch" on ``device`` (the batched solver), or "auto":
    #: NumPy when ``device`` is the CPU, else whichever of the two measures faster when the tracker is made.
    frame_solver: Literal["auto", "numpy", "torch"] = "auto"
    #: Calibrate from the candidate pool in a thread of its own and adopt the result between frames, so that
    #: live tracking never waits for it (offline runs calibrate in line, for results that never vary).
    calibrate_in_background: bool = False


@dataclass
class TrackingIdentity:
    """A rig identity with the per-frame fitter specialised to it (see Tracker.identity_for)."""

    rig: RigIdentity
    fitter: CpuFrameFitter | FrameFitter


@dataclass
class _CalibrationOutcome:
    """A calibration's result with the camera and FOV provenance it leads to, before the tracker takes them."""

    result: Calibration
    camera: Camera
    fov_source: str
    fov_log_std: float | None


@dataclass
class _Candidate:
    mp478: np.ndarray | None
    lmk68: np.ndarray | None
    params: FrameArrays
    feature: np.ndarray


class Tracker:
    """Calibrate-once, track-every-frame fitting of one head model to one camera's landmarks."""

    def __init__(self, head: HeadModel, image_size: tuple[int, int], config: TrackerConfig | None = None) -> None:
        self.config = config or TrackerConfig()
        if not self.config.fit_fov and self.config.fov_deg is None:
            raise UserError("a field of view that is not estimated must be given: set fov_deg (--fov DEG)")
        if self.config.dtype not in NUMPY_DTYPES:
            raise UserError(f"the tracker fits in float32 or float64, not {self.config.dtype}")
        self._numpy_dtype = NUMPY_DTYPES[self.config.dtype]
        height, width = image_size
        #: The FOV tracking starts with: the given one, or the first guess an estimate falls back to.
        self.first_fov_deg = self.config.fov_deg if self.config.fov_deg is not None else self.config.fit.priors.fov_deg
        self._first_camera = Camera.from_fov(width, height, self.first_fov_deg)
        self.rig = HeadRig(
            head, self._first_camera, self.config.n_shape, self.config.n_exp, self.config.fit, self.config.device, self.config.dtype
        )
        self._weighted_landmarks = self.rig.targets.weights.numpy(force=True) > 0
        #: trackable_face's limits, as the floats its compiled code takes.
        self._face_limits = (
            float(self.config.min_observed_fraction), float(self.config.min_face_px), float(self.config.min_face_aspect)
        )
        # The kernels of a frame compiled (or loaded) now, not on the first frame.
        trackable_face(np.zeros((3, 2)), np.ones(3, dtype=bool), np.ones(3, dtype=bool), 0.5, 1.0, 0.0)
        rest = FrameArrays.neutral(1, 2, self._numpy_dtype)
        _velocity_prediction(rest.rotations, rest.rotations, rest.transl, rest.transl, 0.5)
        rest.finite()
        self.rig.root_joint(rest.axis_angle()[0])
        camera_from_world(np.zeros(3), np.zeros(3), np.zeros(3))
        #: Where the FOV comes from: "given" (--fov), "estimated", or "default" (the frames did not determine it).
        self.fov_source = "default" if self.config.fit_fov else "given"
        #: The standard deviation of log(focal) the last calibration's frames allowed (None: not estimated).
        self.fov_log_std: float | None = None
        self.frame_solver = self.config.frame_solver
        if self.frame_solver == "auto":
            on_cpu = torch.device(self.config.device).type == "cpu"
            self.frame_solver = "numpy" if on_cpu else faster_frame_solver(self.rig.fixed_landmarks, self.config.fit, image_size, self.rig.camera.focal)
        self.fitter = self._fitter(self.rig.fixed_landmarks)
        self._camera_changed()
        self.calibrated = False
        self.shape_version = 0
        self._history: list[tuple[float, FrameArrays]] = []  # last valid frames, newest last
        self._lost = True
        self._pool: list[_Candidate] = []
        self._pool_started: float | None = None
        self._filter = OneEuroFilter(self.config.output_filter) if self.config.output_filter else None
        self._last_frame: TrackedFrame | None = None
        self._calibration_thread: threading.Thread | None = None
        self._calibration_generation = 0  # a request to recalibrate makes a running calibration's result stale
        self._calibrated_identity: tuple[TrackingIdentity, _CalibrationOutcome] | None = None  # from the calibration thread
        self._calibration_lock = threading.Lock()

    # --------------------------------------------------------------------------------------------- helpers
    def _fitter(self, landmarks: LandmarkModel) -> CpuFrameFitter | FrameFitter:
        solver = CpuFrameFitter if self.frame_solver == "numpy" else FrameFitter
        return solver(landmarks, self.config.fit)

    def _identity(self, shape: torch.Tensor, camera: Camera) -> TrackingIdentity:
        """What tracking with this identity and camera needs, built without touching the tracker's state."""
        identity = self.rig.identity_for(shape, camera)
        return TrackingIdentity(identity, self._fitter(identity.landmarks))

    def _use(self, identity: TrackingIdentity) -> None:
        self.rig.use(identity.rig)
        self.fitter = identity.fitter
        self._camera_changed()

    def _camera_changed(self) -> None:
        """What each frame reads of the rig's camera, as numbers: the focal length in the rig's dtype, the centre,
        and the FOV."""
        self._focal = float(self.rig.focal)
        camera = self.rig.camera
        self._center = camera.center
        self._fov_deg = self.first_fov_deg if camera == self._first_camera else camera.fov_deg

    @property
    def fov_deg(self) -> float:
        """The camera's vertical field of view in degrees, as frames, files and logs report it: exactly the given
        (or default) value until calibration sets the focal length, then the focal length's."""
        return self._fov_deg

    def can_fit(self, mp478: np.ndarray | None, lmk68: np.ndarray | None) -> bool:
        """Whether one frame's landmarks can be fitted: enough observed, spanning a face."""
        if mp478 is None and lmk68 is None:
            return False
        return self._observed_enough(self.rig.targets.frame(mp478, lmk68))

    def _observed_enough(self, targets: FrameTargets) -> bool:
        """Enough landmarks observed, spanning a face (not a point, a line or a few pixels)."""
        return trackable_face(targets.pixels, targets.observed, self._weighted_landmarks, *self._face_limits)

    def cold_start(self, targets: Targets, model: LandmarkModel | None = None, exp: torch.Tensor | None = None) -> FrameParams:
        """Rigid pose from PnP of the neutral model's landmarks; expression zero, joints at rest."""
        model = model or self.rig.fixed_landmarks
        batch = targets.pixels.shape[0]
        options = {"dtype": self.config.dtype, "device": self.config.device}
        n_coeffs = model.n_coeffs
        coeffs = torch.zeros(1, n_coeffs, **options)
        if exp is not None:
            coeffs[:, -exp.shape[-1] :] = exp
        identity = torch.eye(3, **options).expand(1, model.n_joints, 3, 3).clone()
        neutral = model.evaluate(coeffs, identity, torch.zeros(1, 3, **options), jacobians=False).points[0]
        object_points = (neutral.cpu().double().numpy() * _FLIP).astype(np.float64)
        root_rest = model.joint_rest[0] + model.joint_coeff_basis[0] @ coeffs[0]
        root_rest = root_rest.cpu().double().numpy()
        rotations = identity.expand(batch, -1, -1, -1).clone()
        transl = torch.zeros(batch, 3, **options)
        intrinsics = self.rig.camera.intrinsics()
        for item in range(batch):
            pixels = targets.pixels[item].cpu().double().numpy()
            usable = np.isfinite(pixels).all(axis=1) & (targets.weights.cpu().numpy() > 0)
            rot_cv, trans_cv = self._solve_pnp(object_points[usable], pixels[usable], intrinsics)
            root = _FLIP[:, None] * rot_cv * _FLIP[None, :]
            rotations[item, 0] = torch.as_tensor(root, **options)
            transl[item] = torch.as_tensor(_FLIP * trans_cv - root_rest + root @ root_rest, **options)
        exp0 = torch.zeros(batch, self.rig.layer.n_expression, **options)
        return FrameParams(exp0, rotations, transl)

    def _solve_pnp(self, object_points: np.ndarray, pixels: np.ndarray, intrinsics: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(pixels) >= 6:
            ok, rvec, tvec = cv2.solvePnP(object_points, pixels, intrinsics, None, flags=cv2.SOLVEPNP_EPNP)
            if ok:
                ok, rvec, tvec = cv2.solvePnP(object_points, pixels, intrinsics, None, rvec, tvec, True, cv2.SOLVEPNP_ITERATIVE)
            if ok and np.all(np.isfinite(tvec)) and tvec[2, 0] > 0:
                return cv2.Rodrigues(rvec)[0], tvec[:, 0]
        # Degenerate input: a frontal head at the depth that matches the observed face size.
        extent = np.ptp(pixels, axis=0).max() if len(pixels) else self.rig.camera.height / 3
        model_extent = np.ptp(object_points, axis=0)[:2].max() if len(object_points) else 0.15
        depth = self.rig.camera.focal * model_extent / max(extent, 1.0)
        center = pixels.mean(axis=0) if len(pixels) else np.array(self.rig.camera.center)
        offset = (center - np.array(self.rig.camera.center)) * depth / self.rig.camera.focal
        return np.eye(3), np.array([offset[0], offset[1], depth])

    def _predict(self, timestamp: float) -> FrameArrays:
        t1, last = self._history[-1]
        if self.config.warm_start != "velocity" or len(self._history) < 2:
            return last
        t0, before = self._history[-2]
        ratio = min((timestamp - t1) / max(t1 - t0, 1e-3), 2.0) * 0.5  # damped: half the observed velocity
        return FrameArrays(last.exp, *_velocity_prediction(last.rotations, before.rotations, last.transl, before.transl, ratio))

    # -------------------------------------------------------------------------------------------- tracking
    def track(self, mp478: np.ndarray | None, lmk68: np.ndarray | None = None, timestamp: float | None = None) -> TrackedFrame:
        """Fit one frame. ``mp478`` (478, 2) and/or ``lmk68`` (68, 2) pixels, NaN unobserved; None = no face."""
        timestamp = time.monotonic() if timestamp is None else timestamp
        started = time.perf_counter()
        self._adopt_background_calibration()
        if mp478 is None and lmk68 is None:
            return self._invalid(started)
        targets = self.rig.targets.frame(mp478, lmk68)
        if not self._observed_enough(targets):
            return self._invalid(started)
        warm = not self._lost and self._history and self.config.warm_start != "none"
        if warm:
            initial = self._predict(timestamp)
            result = self._fit(initial, targets, mp478, lmk68, prediction=initial)
        else:
            initial = self.cold_start(self.rig.targets.build_frame(mp478, lmk68)).arrays()
            result = self._fit(initial, targets, mp478, lmk68, iterations=self.config.cold_iterations)
        rms_px = result.rms_px
        face_size = targets.face_size
        params = result.params
        if not math.isfinite(rms_px) or rms_px > self.config.loss_threshold * face_size or not params.finite():
            log.debug("fit rejected: rms %.2f px for a face of %.0f px", rms_px, face_size)
            return self._invalid(started, rms_px, result.iterations)
        self._lost = False
        self._history = (self._history + [(timestamp, params)])[-2:]
        if not self.calibrated and self._calibration_thread is None:
            self._offer_candidate(mp478, lmk68, params, timestamp)
        frame = self._frame(params, True, rms_px, result.iterations, started, timestamp)
        self._last_frame = frame
        return frame

    def _fit(
        self, initial: FrameArrays, targets: FrameTargets, mp478: np.ndarray | None, lmk68: np.ndarray | None,
        prediction: FrameArrays | None = None, iterations: int | None = None,
    ) -> FrameFit:
        """One frame's fit: from the targets' arrays on the CPU solver, else from a batch of one's tensors."""
        center = self._center
        if isinstance(self.fitter, CpuFrameFitter):
            return self.fitter.fit_frame(initial, targets, self._focal, center, prediction, iterations)
        params = initial.as_params(self.config.device)
        anchor = None if prediction is None else params if prediction is initial else prediction.as_params(self.config.device)
        targets_batch = self.rig.targets.build_frame(mp478, lmk68)
        return self.fitter.fit(params, targets_batch, self.rig.focal, center, anchor, iterations).frame()

    def _invalid(self, started: float, rms_px: float = float("nan"), iterations: int = 0) -> TrackedFrame:
        """No usable fit: hold the last good parameters, mark invalid, re-acquire from a cold start next."""
        self._lost = True
        if self._filter is not None:
            self._filter.reset()
        if self._last_frame is not None:
            fit_ms = (time.perf_counter() - started) * 1e3
            return self._last_frame.held(rms_px, iterations, fit_ms, self.calibrated, self.shape_version)
        neutral = FrameArrays.neutral(self.rig.layer.n_expression, self.rig.layer.n_joints, self._numpy_dtype)
        return self._frame(neutral, False, rms_px, iterations, started, None)

    def frame_from(self, params: FrameParams, rms_px: float = float("nan")) -> TrackedFrame:
        """A valid TrackedFrame for given parameters (batch of one), e.g. a calibration frame."""
        return self._frame(params.arrays(), True, rms_px, 0, time.perf_counter(), None)

    def _frame(self, params: FrameArrays, valid: bool, rms_px: float, iterations: int, started: float, timestamp: float | None) -> TrackedFrame:
        exp, pose, transl = params.axis_angle()
        if self._filter is not None and timestamp is not None:
            packed = self._filter(np.concatenate([exp, pose.ravel(), transl]), timestamp)
            exp, pose, transl = packed[: exp.size], packed[exp.size : exp.size + pose.size].reshape(pose.shape), packed[-3:]
        n_exp = self.rig.layer.n_exp
        return frame_from_params(
            exp[:n_exp], pose, transl, self.rig.root_joint(exp), self._fov_deg, valid, rms_px, iterations,
            (time.perf_counter() - started) * 1e3, self.calibrated, self.shape_version,
            eyelids=exp[n_exp:] if self.rig.layer.n_eyelids else None,
        )

    # ----------------------------------------------------------------------------------------- calibration
    def _offer_candidate(self, mp478: np.ndarray | None, lmk68: np.ndarray | None, params: FrameArrays, timestamp: float) -> None:
        if self._pool_started is None:
            self._pool_started = timestamp
        exp, pose, _ = params.axis_angle()
        feature = diversity_feature(pose, exp)
        distinct = all(np.linalg.norm(feature - c.feature) > 0.02 for c in self._pool)
        if distinct and len(self._pool) < self.config.candidate_pool:
            self._pool.append(_Candidate(None if mp478 is None else mp478.copy(), None if lmk68 is None else lmk68.copy(), params, feature))
        if timestamp - self._pool_started >= self.config.calibration_seconds or len(self._pool) >= self.config.candidate_pool:
            self._calibrate_from_pool()

    def adopt_identity(self, shape: torch.Tensor) -> None:
        """Track with an identity refined elsewhere (photometric refinement); call between frames."""
        self.adopt_prepared_identity(self.identity_for(shape))

    def identity_for(self, shape: torch.Tensor) -> TrackingIdentity:
        """Everything tracking with ``shape`` needs, built on the caller's thread (the slow part of adopting
        an identity, kept off the tracking thread); hand it to :meth:`adopt_prepared_identity`."""
        return self._identity(shape, self.rig.camera)

    def adopt_prepared_identity(self, identity: TrackingIdentity) -> None:
        """Track with an identity from :meth:`identity_for`; call between frames."""
        if identity.rig.camera != self.rig.camera:  # calibrated again meanwhile: the identity keeps the new camera
            identity = self._identity(identity.rig.shape, self.rig.camera)
        self._use(identity)
        self.shape_version += 1

    def adopt_calibration(self, shape: torch.Tensor, focal: float) -> None:
        """Take an identity and focal length (pixels) calibrated earlier (a resumed offline run) as if calibrated now."""
        self.calibrated = True
        self._use(self._identity(shape, self.rig.camera.with_focal(focal)))
        self.shape_version += 1

    def resume_after(self, previous: list[tuple[float, FrameParams]], last_valid: bool) -> None:
        """Continue a sequence as if its earlier frames had been tracked by this tracker: ``previous`` holds
        the last (up to two) valid frames as (timestamp, parameters), oldest first, and ``last_valid`` says
        whether the frame just before the next one was tracked (else the next one starts cold)."""
        self._history = [(t, params.arrays()) for t, params in previous[-2:]]
        self._lost = not (last_valid and self._history)
        self._last_frame = self._frame(self._history[-1][1], True, math.nan, 0, time.perf_counter(), None) if self._history else None

    def request_recalibration(self) -> None:
        """Gather new candidate frames and calibrate again (the current identity is kept meanwhile)."""
        self.calibrated = False
        self._pool, self._pool_started = [], None
        with self._calibration_lock:
            self._calibration_generation += 1
            self._calibrated_identity = None
        self._calibration_thread = None

    def _calibrate_at_default_fov(self, params: FrameParams, targets: Targets, estimate: Calibration, camera: Camera) -> Calibration:
        """The frames did not determine the focal length (little head rotation, a far face): calibrate the
        identity again at the documented webcam default (``camera``) instead of trusting a number they barely
        constrain."""
        log.warning(
            "the frames do not determine the field of view (estimate %.0f deg, +-%.0f %% in focal length): using the "
            "webcam default of %.0f deg; pass --fov DEG if you know it",
            fov_from_focal(estimate.focal, self.rig.camera.height), 100 * min(estimate.log_focal_std, 9.99), camera.fov_deg,
        )
        return calibrate(
            self.rig.landmarks, params, targets, camera.focal, camera.center, self.config.fit, fit_focal=False, shape=self.rig.shape
        )

    def fov_description(self) -> str:
        """Where the FOV comes from, in words, for logs and files."""
        if self.fov_source == "given":
            return "given"
        spread = "" if self.fov_log_std is None else f", +-{100 * min(self.fov_log_std, 9.99):.0f} % in focal length"
        return f"{self.fov_source}{spread}"

    def fov_report(self) -> dict[str, object]:
        """The FOV, its source and how well the frames determined it, for meta.json and session.json."""
        return {
            "deg": self.fov_deg,
            "source": self.fov_source,
            "log_focal_std": self.fov_log_std if self.fov_log_std is not None and math.isfinite(self.fov_log_std) else None,
            "default_deg": self.first_fov_deg,
            "max_log_focal_std": self.config.fov_max_log_std,
        }

    def _calibrate_from_pool(self) -> None:
        chosen = select_diverse([c.feature for c in self._pool], self.config.calibration_frames)
        candidates = [self._pool[i] for i in chosen]
        observations, initial = [(c.mp478, c.lmk68) for c in candidates], [c.params.as_params(self.config.device) for c in candidates]
        self._pool, self._pool_started = [], None
        if not self.config.calibrate_in_background:
            self.calibrate(observations, initial)
            return
        generation = self._calibration_generation

        def work() -> None:
            outcome = self._calibration(observations, initial)
            identity = self._identity(outcome.result.shape, outcome.camera)
            with self._calibration_lock:
                if generation == self._calibration_generation:
                    self._calibrated_identity = (identity, outcome)

        self._calibration_thread = threading.Thread(target=work, name="flame-live-calibration", daemon=True)
        self._calibration_thread.start()

    @property
    def calibrating_in_background(self) -> bool:
        """A background calibration started and its identity not yet adopted (it may have just finished)."""
        return self._calibration_thread is not None

    def close(self) -> None:
        """Wait for a background calibration still running. Its thread is a daemon that runs PyTorch: one still
        running when the interpreter exits aborts the process (SIGABRT, "terminate called without an active
        exception"), as ``live`` did when a short clip ended during calibration on a busy machine."""
        if self._calibration_thread is not None:
            self._calibration_thread.join()

    def _adopt_background_calibration(self) -> None:
        """Between frames: take the identity that the calibration thread finished, if any."""
        if self._calibration_thread is None:
            return
        with self._calibration_lock:
            finished, self._calibrated_identity = self._calibrated_identity, None
        if finished is None:
            if not self._calibration_thread.is_alive():  # it failed: gather candidates again
                log.warning("calibration failed; calibrating again from the next frames")
                self._calibration_thread = None
            return
        self._calibration_thread = None
        identity, outcome = finished
        self._use(identity)
        self._adopt_fov(outcome)
        log.info(
            "calibrated in the background: fov %.1f deg (%s), rms %.2f px",
            self.fov_deg, self.fov_description(), float(outcome.result.frames.rms_px.mean()),
        )

    def calibrate(
        self, observations: list[tuple[np.ndarray | None, np.ndarray | None]], initial: list[FrameParams] | None = None
    ) -> Calibration:
        """Fit identity (and FOV unless fixed) jointly over these frames, then freeze it for tracking."""
        started = time.perf_counter()
        outcome = self._calibration(observations, initial)
        self._use(self._identity(outcome.result.shape, outcome.camera))
        self._adopt_fov(outcome)
        log.info(
            "calibrated on %d frames in %.0f ms: fov %.1f deg (%s), rms %.2f px",
            len(observations), (time.perf_counter() - started) * 1e3, self.fov_deg, self.fov_description(),
            float(outcome.result.frames.rms_px.mean()),
        )
        return outcome.result

    def _adopt_fov(self, outcome: _CalibrationOutcome) -> None:
        """The rest of taking a calibration, after its identity: how the FOV was found, and the new version."""
        self.fov_source, self.fov_log_std = outcome.fov_source, outcome.fov_log_std
        self.calibrated = True
        self.shape_version += 1

    def _calibration(
        self, observations: list[tuple[np.ndarray | None, np.ndarray | None]], initial: list[FrameParams] | None
    ) -> _CalibrationOutcome:
        """The joint fit of :meth:`calibrate`, leaving the tracker as it was (safe on another thread)."""
        mp = [o[0] for o in observations]
        lmk = [o[1] for o in observations]
        targets = self.rig.targets.build(
            None if any(m is None for m in mp) else np.stack(mp),
            None if any(m is None for m in lmk) else np.stack(lmk),
        )
        if initial is None:
            params = self.cold_start(targets, self.rig.fixed_landmarks)
        else:
            params = FrameParams.cat(initial)
        fit_focal = self.config.fit_fov
        result = calibrate(
            self.rig.landmarks, params, targets, self.rig.camera.focal, self.rig.camera.center, self.config.fit,
            fit_focal=fit_focal, shape=self.rig.shape,
        )
        camera, fov_source, fov_log_std = self.rig.camera, self.fov_source, self.fov_log_std
        if fit_focal:
            fov_source, fov_log_std = "estimated", result.log_focal_std
            if not result.log_focal_std <= self.config.fov_max_log_std:
                camera = Camera.from_fov(self.rig.camera.width, self.rig.camera.height, self.first_fov_deg)
                fov_source = "default"
                result = self._calibrate_at_default_fov(params, targets, result, camera)
        return _CalibrationOutcome(result, camera.with_focal(result.focal), fov_source, fov_log_std)


def fit_single(
    head: HeadModel,
    image_size: tuple[int, int],
    mp478: np.ndarray | None = None,
    lmk68: np.ndarray | None = None,
    config: TrackerConfig | None = None,
) -> dict[str, np.ndarray]:
    """Fit one image's landmarks (shape, expression, pose, FOV): the reference tracker's arrays."""
    tracker = Tracker(head, image_size, config)
    started = time.perf_counter()
    if not tracker.can_fit(mp478, lmk68):
        return tracker.rig.reference_arrays(tracker._invalid(started))
    result = tracker.calibrate([(mp478, lmk68)])
    rms_px = float(result.frames.rms_px[0])
    face_size = float(tracker.rig.targets.build_frame(mp478, lmk68).face_size[0])
    if not math.isfinite(rms_px) or rms_px > tracker.config.loss_threshold * face_size or not result.frames.params.finite():
        return tracker.rig.reference_arrays(tracker._invalid(started, rms_px))
    return tracker.rig.reference_arrays(tracker.frame_from(result.frames.params, rms_px))


@compiled
def _velocity_prediction(
    rotations: np.ndarray, before: np.ndarray, transl: np.ndarray, transl_before: np.ndarray, ratio: float
) -> tuple[np.ndarray, np.ndarray]:
    """The last frame's joint rotations (J, 3, 3) and translation (3,) moved on by ``ratio`` times their change
    since the frame ``before``: the root turns by that share of its rotation between the two (in float64), the
    translation moves in the parameters' dtype (each operation rounded to it, as NumPy's would be); the other
    joints stay. New arrays, in the dtype of the last frame's."""
    last_root = rotations[0].astype(np.float64)
    relative = np.empty((1, 3, 3))  # before_root^T last_root
    for x in range(3):
        for y in range(3):
            relative[0, x, y] = before[0, 0, x] * last_root[0, y] + before[0, 1, x] * last_root[1, y] + before[0, 2, x] * last_root[2, y]
    turn = rotation_matrices(axis_angles(relative) * ratio)[0]
    predicted = rotations.copy()
    for x in range(3):
        for y in range(3):
            predicted[0, x, y] = last_root[x, 0] * turn[0, y] + last_root[x, 1] * turn[1, y] + last_root[x, 2] * turn[2, y]
    share = np.empty(1, transl.dtype)
    share[0] = ratio
    moved = np.empty_like(transl)
    for x in range(3):
        moved[x] = transl[x] + (transl[x] - transl_before[x]) * share[0]
    return predicted, moved


def diversity_feature(pose: np.ndarray, exp: np.ndarray) -> np.ndarray:
    """How frames differ, for choosing calibration frames (here) and the refiner's keyframes (realtime.keyframes):
    head rotation (pose[0], radians, weight 2) then the 10 leading expressions (weight 0.3). Rotation weighs more
    because turning the head shows the face's depth, which pins down identity and focal length."""
    return np.concatenate([2.0 * pose[0], 0.3 * exp[:10]])


def select_diverse(features: list[np.ndarray], count: int) -> list[int]:
    """Farthest-point selection: start from the most neutral frame, then add the frame farthest from the set."""
    if len(features) <= count:
        return list(range(len(features)))
    stacked = np.stack(features)
    chosen = [int(np.argmin(np.linalg.norm(stacked, axis=1)))]
    distance = np.linalg.norm(stacked - stacked[chosen[0]], axis=1)
    while len(chosen) < count:
        nxt = int(np.argmax(distance))
        chosen.append(nxt)
        distance = np.minimum(distance, np.linalg.norm(stacked - stacked[nxt], axis=1))
    return sorted(chosen)

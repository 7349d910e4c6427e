"""Offline smoothing of a tracked sequence, using past and future frames alike.

Per-frame fits follow every flicker of the detector. Offline, every frame is known, so each parameter track
(expression, jaw, neck, eyes, camera rotation and translation) is replaced by the maximum a posteriori
estimate of a fixed-interval smoother: the per-frame fits are observations with Gaussian noise, the motion
an integrated random walk (the model of a Kalman / RTS smoother) whose accelerations are heavy-tailed.
Solved as a robust Whittaker smoother::

    minimise  sum_t (x_t - y_t)^2  +  lambda * sum_t w_t (x_{t+1} - 2 x_t + x_{t-1})^2

by iteratively reweighted least squares (each step one banded, pentadiagonal solve per parameter), with
Cauchy weights w_t = 1 / (1 + (a_t / c)^2) on the accelerations a_t. ``c`` is a multiple of the parameter's
own noise level (estimated robustly from its fourth differences), so the same settings fit every parameter:
accelerations at the noise level are smoothed as a linear smoother would, while accelerations far above it
(a blink, a mouth snapping open) lose their penalty and keep their speed instead of being smeared over the
neighbouring frames.

Two groups get their own lambda, because their real motion is not alike. The head pose (camera rotation and
translation, neck) moves slowly, but its per-frame fit trembles with the face: on speech clips the jaw's
motion leaks into pitch and translation, and that tremble moves every landmark. Expression, jaw and eyes
carry speech (syllables at 4-6 Hz) and blinks, the fastest real motion of a face, so they are smoothed far
less. Rotation and translation stay in one group: the fits trade one for the other (a small pitch looks
like a small vertical shift), so their noise is correlated, and smoothing one harder than the other turns
that correlated noise back into landmark jitter.

A head that really moves fast (a quick turn filmed at a low frame rate) is not noise, but the parameter
tracks alone cannot tell: its tremble and its real motion look alike there. Where the fitted landmarks can
be measured against the detector's, :func:`smooth_within_fit` therefore lowers lambda (the pose's first)
until smoothing costs at most ``max_error_rise`` of the per-frame fits' landmark error (the discrepancy
principle, in the landmarks' own space).

Each run of consecutive valid frames is smoothed on its own: a lost face and its re-acquisition are not
bridged. Invalid frames (they hold the last good parameters) are left as they are.

:func:`smooth_linear` is the same smoother without reweighting, for corrections to an already smoothed fit
(photometric refinement's): they have no noise of their own to measure, and their fast content is what
their caller limits.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Annotated

import numpy as np

from engine.config import Range
from engine.jit import compiled

log = logging.getLogger(__name__)

#: The per-frame keys that vary and are smoothed (``eyelids`` only exists with eyelid blendshapes); shape, fov
#: and K are per-sequence.
SMOOTHED_KEYS = ("exp", "eyelids", "jaw_pose", "neck_pose", "eye_pose", "cam")
#: The keys of the head pose, smoothed with :attr:`SmoothingConfig.pose_strength`; the rest with ``strength``.
POSE_KEYS = ("neck_pose", "cam")
#: Columns of ``cam`` that are Euler angles (radians; unwrapped before smoothing).
_CAM_ANGLES = slice(0, 3)
# The k-th difference of white noise with standard deviation s has standard deviation sqrt(C(2k, k)) s.
_DIFFERENCE_GAIN = {k: math.sqrt(math.comb(2 * k, k)) for k in range(1, 5)}
_NOISE_ORDER = 4
_NOISE_ORDER_GAIN = np.sqrt(70.0)
_MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class SmoothingConfig:
    """How strongly :func:`smooth_sequence` smooths.

    ``strength`` is lambda above for expression, jaw and eyes and ``pose_strength`` for the head pose
    (:data:`POSE_KEYS`), both for a 25 fps input: the weight of smooth motion against the per-frame fits
    (larger is smoother). The prior is on physical acceleration, so other frame rates scale them by
    (fps / 25)^4: a 12.5 fps clip moves four times as far between frames and is smoothed far less.
    ``robust`` (in units of the acceleration's noise) is where an acceleration stops counting as noise and
    is kept (Cauchy weights: its pull fades); ``order`` of the differences penalised (2: acceleration, 3:
    jerk); ``iterations`` of reweighting. ``max_error_rise``: how much :func:`smooth_within_fit` lets
    smoothing raise the landmark error, as a fraction of the per-frame fits' own.
    """

    strength: Annotated[float, Range(0, 1000)] = 3.0
    pose_strength: Annotated[float, Range(0, 10000)] = 40.0
    robust: float = 2.0
    order: Annotated[int, Range(1, 3)] = 2
    iterations: Annotated[int, Range(1)] = 6
    reference_fps: Annotated[float, Range(1)] = 25.0
    max_error_rise: float = 0.05

    def strength_at(self, fps: float, pose: bool = False) -> float:
        """lambda for a sequence of ``fps`` frames per second (of the head pose with ``pose``)."""
        strength = self.pose_strength if pose else self.strength
        return strength * (fps / self.reference_fps) ** (2 * self.order)

    def describe(self) -> dict[str, object]:
        return {"method": "robust fixed-interval smoother (Whittaker, Cauchy-weighted accelerations), head pose "
                "and face smoothed with their own strengths", **asdict(self)}


#: How often :func:`smooth_within_fit` halves both strengths (to about a thousandth) before it keeps the fits.
_HALVINGS = 10


def noise_level(values: np.ndarray) -> np.ndarray:
    """Per column of (T, D) ``values``: the standard deviation of its frame-to-frame noise.

    Robust (median absolute deviation) on the fourth differences: they amplify white noise (by sqrt(70))
    while they all but remove smooth motion (a 1 Hz motion at 25 fps by 0.06), so real motion does not pass
    for noise.
    """
    if values.shape[0] <= _NOISE_ORDER:
        return np.zeros(values.shape[1])
    high = np.diff(values, n=_NOISE_ORDER, axis=0)
    return _MAD_TO_SIGMA * np.median(np.abs(high - np.median(high, axis=0)), axis=0) / _NOISE_ORDER_GAIN


def smooth_track(values: np.ndarray, strengths: np.ndarray, config: SmoothingConfig) -> np.ndarray:
    """Smooth (T, D) ``values`` (one contiguous run, every row observed), column d with lambda ``strengths[d]``
    (already scaled to the frame rate: :meth:`SmoothingConfig.strength_at`)."""
    if values.shape[0] <= _NOISE_ORDER:
        return values.copy()
    sigma = noise_level(values)
    smoothed = values.copy()
    columns = np.flatnonzero((sigma > 0) & (strengths > 0))
    if len(columns):
        order = config.order
        thresholds = config.robust * _DIFFERENCE_GAIN[order] * sigma[columns]
        smoothed[:, columns] = _robust_whittaker(
            np.ascontiguousarray(values[:, columns], dtype=np.float64), np.asarray(strengths, dtype=np.float64)[columns],
            thresholds, _stencil(order), max(1, config.iterations),
        )
    return smoothed


def _stencil(order: int) -> np.ndarray:
    """The ``order``-th difference's coefficients (order + 1,), of x_i .. x_{i+order}, as ``np.diff`` weighs them."""
    return np.array([(-1.0) ** (order - k) * math.comb(order, k) for k in range(order + 1)])


@compiled
def _robust_whittaker(tracks: np.ndarray, strengths: np.ndarray, thresholds: np.ndarray, stencil: np.ndarray, iterations: int) -> np.ndarray:
    """Each column d of (T, D) ``tracks`` smoothed with lambda ``strengths[d]`` by ``iterations`` of reweighting:
    each a solve of ``(I + D^T diag(lambda w) D) x = y`` by a banded Cholesky factorisation (as LAPACK's ``pbsv``,
    which ``scipy.linalg.solveh_banded`` calls), then Cauchy weights ``w = 1 / (1 + (a / thresholds[d])^2)`` on
    the result's differences ``a``.

    Compiled (numba), all columns at once: a LAPACK call per column and iteration spent most of its time in
    Python. The columns are the innermost loop, so that the factorisation's serial chain (a square root and
    divisions per frame) runs for every column side by side, in vector registers.
    """
    frames, count = tracks.shape
    order = len(stencil) - 1
    rows = frames - order
    x = np.empty_like(tracks)
    band = np.empty((frames, order + 1, count))  # band[j, m] = A[j, j + m]: the upper triangle, row by row
    weights = np.ones((rows, count))
    differences = np.empty_like(tracks)
    for iteration in range(iterations):
        if iteration > 0:  # the previous solution's order-th differences, as np.diff takes them
            differences[:] = x
            for level in range(order):
                for i in range(frames - level - 1):
                    for d in range(count):
                        differences[i, d] = differences[i + 1, d] - differences[i, d]
            for i in range(rows):
                for d in range(count):
                    ratio = differences[i, d] / thresholds[d]
                    weights[i, d] = 1.0 / (1.0 + ratio * ratio)
        # Row i of D touches frames i..i+order: it adds lambda w_i s_a s_b at (i+a, i+b).
        band[:, 0] = 1.0
        band[:, 1:] = 0.0
        for a in range(order + 1):
            for b in range(a, order + 1):
                for i in range(rows):
                    for d in range(count):
                        band[i + a, b - a, d] += strengths[d] * weights[i, d] * stencil[a] * stencil[b]
        # A = U^T U, U upper triangular with ``order`` bands, in place of A.
        for j in range(frames):
            reach = min(order, frames - 1 - j)
            for d in range(count):
                pivot = math.sqrt(band[j, 0, d])
                band[j, 0, d] = pivot
                for m in range(1, reach + 1):
                    band[j, m, d] /= pivot
            for m in range(1, reach + 1):
                for n in range(m, reach + 1):
                    for d in range(count):
                        band[j + m, n - m, d] -= band[j, m, d] * band[j, n, d]
        # U^T z = y, then U x = z (z kept in x).
        for j in range(frames):
            for d in range(count):
                total = tracks[j, d]
                for i in range(max(0, j - order), j):
                    total -= band[i, j - i, d] * x[i, d]
                x[j, d] = total / band[j, 0, d]
        for j in range(frames - 1, -1, -1):
            for d in range(count):
                total = x[j, d]
                for m in range(1, min(order, frames - 1 - j) + 1):
                    total -= band[j, m, d] * x[j + m, d]
                x[j, d] = total / band[j, 0, d]
    return x


def smooth_linear(values: np.ndarray, strengths: np.ndarray, order: int = 2) -> np.ndarray:
    """(T, D) ``values`` (one contiguous run) smoothed by a linear Whittaker smoother: column d minimises
    ``sum (x - y)^2 + strengths[d] * sum (order-th difference of x)^2``, with no reweighting (every
    acceleration is penalised alike: the robust smoother's one solve, with an infinite threshold)."""
    smoothed = values.astype(np.float64, copy=True)
    columns = np.flatnonzero(strengths > 0)
    if len(values) <= order or not len(columns):
        return smoothed
    smoothed[:, columns] = _robust_whittaker(
        np.ascontiguousarray(smoothed[:, columns]), np.asarray(strengths, dtype=np.float64)[columns], np.full(len(columns), np.inf),
        _stencil(order), 1,
    )
    return smoothed


def valid_runs(valid: np.ndarray) -> list[slice]:
    """The maximal runs of consecutive True in ``valid``, as slices."""
    edges = np.diff(np.concatenate([[0], valid.astype(np.int8), [0]]))
    return [slice(int(a), int(b)) for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))]


def smooth_sequence(stacked: dict[str, np.ndarray], config: SmoothingConfig, fps: float) -> dict[str, np.ndarray]:
    """Smooth a stacked sequence of ``fps`` frames per second in the reference format (each key (T, ...),
    ``valid`` (T,)).

    Returns a new dict with :data:`SMOOTHED_KEYS` smoothed over every run of valid frames, everything else
    (and every invalid frame) unchanged, dtypes kept.
    """
    valid = np.asarray(stacked["valid"], dtype=bool).reshape(-1)
    keys = [key for key in SMOOTHED_KEYS if key in stacked]
    columns = [np.asarray(stacked[key], dtype=np.float64).reshape(len(valid), -1) for key in keys]
    joined = np.concatenate(columns, axis=1)
    strengths = np.concatenate(
        [np.full(block.shape[1], config.strength_at(fps, pose=key in POSE_KEYS)) for key, block in zip(keys, columns)]
    )
    angles = slice(0, 0)
    if "cam" in keys:
        start = sum(c.shape[1] for c in columns[: keys.index("cam")])
        angles = slice(start + _CAM_ANGLES.start, start + _CAM_ANGLES.stop)
    out = joined.copy()
    for run in valid_runs(valid):
        track = joined[run].copy()
        track[:, angles] = np.unwrap(track[:, angles], axis=0)
        smoothed = smooth_track(track, strengths, config)
        # Back into (-pi, pi] where the input was, so a smoothed angle never jumps by 2 pi.
        smoothed[:, angles] = (smoothed[:, angles] + np.pi) % (2 * np.pi) - np.pi
        out[run] = smoothed
    result = dict(stacked)
    offset = 0
    for key, block in zip(keys, columns):
        width = block.shape[1]
        result[key] = out[:, offset : offset + width].reshape(stacked[key].shape).astype(stacked[key].dtype)
        offset += width
    return result


def smooth_within_fit(
    stacked: dict[str, np.ndarray], config: SmoothingConfig, fps: float,
    fit_error: Callable[[dict[str, np.ndarray]], float],
) -> tuple[dict[str, np.ndarray], SmoothingConfig]:
    """:func:`smooth_sequence` as strong as ``config`` asks, or weaker where that moves the fitted landmarks
    more than ``config.max_error_rise`` (a fraction) further from the detector's than the per-frame fits are.

    ``fit_error`` maps stacked arrays to the fitted landmarks' mean distance to the detector's. The head-pose
    strength steps down (by sqrt(2)) until the error is within bounds or it reaches the face's ``strength``;
    then both halve together, down to about a thousandth, and past that the per-frame fits are kept. Returns
    the smoothed arrays and the configuration used.
    """
    allowed = (1.0 + config.max_error_rise) * fit_error(stacked)
    for used in _weaker_settings(config):
        smoothed = smooth_sequence(stacked, used, fps)
        if fit_error(smoothed) <= allowed:
            break
    else:
        used = replace(config, strength=0.0, pose_strength=0.0)
        smoothed = {key: value.copy() for key, value in stacked.items()}
    if used != config:
        log.info("smoothed with strength %.3g (head pose %.3g) instead of %.3g (%.3g): stronger smoothing moved the "
                 "landmarks more than %.0f %% further from the detector's (fast motion)", used.strength,
                 used.pose_strength, config.strength, config.pose_strength, 100 * config.max_error_rise)
    return smoothed, used


def _weaker_settings(config: SmoothingConfig) -> Iterator[SmoothingConfig]:
    """``config``, then its head-pose strength in steps of sqrt(2) down to the face's, then both halved
    together :data:`_HALVINGS` times."""
    yield config
    pose_strength = config.pose_strength
    while pose_strength / math.sqrt(2.0) > config.strength:
        pose_strength /= math.sqrt(2.0)
        yield replace(config, pose_strength=pose_strength)
    strength, pose_strength = config.strength, min(config.pose_strength, config.strength)
    if pose_strength != config.pose_strength:
        yield replace(config, pose_strength=pose_strength)
    for _ in range(_HALVINGS):
        strength, pose_strength = strength / 2, pose_strength / 2
        yield replace(config, strength=strength, pose_strength=pose_strength)

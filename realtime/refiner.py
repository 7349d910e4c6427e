"""The live refiner: a background thread that turns keyframes into a photometrically refined identity.

It consumes the keyframe selector's queue (:class:`realtime.handoff.DropOldestQueue`: the live loop only offers), keeps
the latest ``pool_size`` keyframes, fits shape, albedo and lighting to them jointly with its own
:class:`~engine.rig.HeadRig` (nothing is shared with the live tracker), and hands each result to ``on_update(shape, tex,
light)``. The callback runs on the refiner's thread: the live loop should store the result and adopt it
between frames (``Tracker.adopt_identity``), then publish ``flame.shape``.

Guard: a refined shape is handed over only when landmark-only fits of the pool's (recent) frames with it are
no worse than with the identity the live tracker uses now (``current_shape()``); otherwise it is dropped,
logged and counted in ``rejected``, and the next fit starts again from the live identity.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from engine.camera import Camera
from engine.frames import state_from_frames
from engine.head_model import HeadModel
from engine.photometric import PhotometricConfig, PhotometricFitter
from engine.rig import HeadRig
from engine.tracker import Tracker, TrackerConfig, TrackingIdentity
from realtime.handoff import DropOldestQueue
from realtime.keyframes import Keyframe

log = logging.getLogger(__name__)

IdentityCallback = Callable[[np.ndarray, np.ndarray, np.ndarray], None]


class RefinedIdentityHandoff:
    """The refiner's newest identity on its way to the live tracker.

    :meth:`receive` is the refiner's ``on_update``: it prepares the identity on the refiner's thread (the slow
    part), so that :meth:`adopt`, called by the live loop between frames, only swaps it in. A result that comes
    before the previous one was adopted replaces it.
    """

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.appearance: tuple[np.ndarray, np.ndarray] | None = None
        """(texture, light) of the adopted identity; None until the first one."""
        self._lock = threading.Lock()
        self._pending: tuple[TrackingIdentity, np.ndarray, np.ndarray] | None = None

    def receive(self, shape: np.ndarray, tex: np.ndarray, light: np.ndarray) -> None:
        identity = self.tracker.identity_for(torch.as_tensor(shape))
        with self._lock:
            self._pending = (identity, tex, light)

    def adopt(self) -> None:
        """Track with the newest received identity, if one came since the last call."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            identity, tex, light = pending
            self.tracker.adopt_prepared_identity(identity)
            self.appearance = (tex, light)


@dataclass
class RefinerConfig:
    pool_size: int = 6
    """Keyframes fitted together; the oldest leaves when a new one arrives."""
    iterations: int = 30
    guard_tolerance: float = 0.01
    """A refined shape may raise the pool's landmark RMS by at most this fraction of the live identity's."""
    photometric: PhotometricConfig = field(default_factory=lambda: PhotometricConfig(size=192))
    tracker: TrackerConfig = field(default_factory=TrackerConfig)


class LiveRefiner:
    """Refines identity from keyframes on its own thread; ``start``/``stop`` or use as a context manager."""

    def __init__(self, head: HeadModel, queue: DropOldestQueue[Keyframe], current_shape: Callable[[], torch.Tensor],
                 on_update: IdentityCallback, config: RefinerConfig | None = None) -> None:
        """``current_shape()`` returns the identity the live tracker uses now (called on the refiner's thread)."""
        self.head = head
        self.queue = queue
        self.on_update = on_update
        self.current_shape = current_shape
        self.config = config or RefinerConfig()
        self.updates = 0
        self.rejected = 0
        self._shape = current_shape().detach().cpu().clone()
        self._guard: Tracker | None = None
        self._pool: list[Keyframe] = []
        self._fitter: PhotometricFitter | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="photometric-refiner", daemon=True)

    def start(self) -> LiveRefiner:
        log.info("photometric refinement started: identity, texture and light are fitted to keyframes in the background")
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Finish the fit in progress, then end; the queue's remaining keyframes are left unrefined."""
        self._stop.set()
        self._thread.join(timeout)

    def __enter__(self) -> LiveRefiner:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            keyframe = self.queue.get(timeout=0.1)
            if keyframe is None:
                if self.queue.ended:
                    return
                continue
            self._pool = (self._pool + [keyframe])[-self.config.pool_size :]
            try:
                self._refine()
            except Exception:  # noqa: BLE001 - a failed refinement must never take the live loop down
                log.exception("photometric refinement failed; the current identity stays in use")

    def _refine(self) -> None:
        started = time.monotonic()
        log.debug("refining the identity on %d keyframes", len(self._pool))
        fov_deg = self._pool[-1].tracked.fov_deg
        fitter = self._fitter_for(self._pool[-1].image.shape[:2], fov_deg)
        live = self._padded(self.current_shape().detach().cpu(), fitter.rig)
        fitter.shape = live.to(device=fitter.device, dtype=fitter.dtype)
        batch = fitter.prepare([k.image for k in self._pool], [k.landmarks for k in self._pool])
        initial = state_from_frames([k.tracked for k in self._pool], fitter.dtype, fitter.device)
        fitter.fit_identity(batch, initial, self.config.iterations)
        guard = self._guard_for(fitter.rig.camera, fov_deg)
        candidate, current = self._landmark_rms(guard, fitter.shape), self._landmark_rms(guard, live)
        if not candidate <= current * (1.0 + self.config.guard_tolerance):
            self.rejected += 1
            log.info("refined identity not adopted: it fits the recent frames' landmarks worse (%.2f px RMS against "
                     "%.2f px with the live identity)", candidate, current)
            fitter.shape = live.to(device=fitter.device, dtype=fitter.dtype)
            return
        self.updates += 1
        log.info("refined identity #%d from %d keyframes in %.1f s", self.updates, len(self._pool), time.monotonic() - started)
        self.on_update(fitter.shape.cpu().numpy().copy(), fitter.appearance.state(), fitter.light.cpu().numpy().reshape(-1))

    def _guard_for(self, camera: Camera, fov_deg: float) -> Tracker:
        """A tracker for the guard's landmark fits with the fitter's camera (``fov_deg`` made it): each keyframe
        fitted on its own from a cold start, never calibrating, so that two identities are compared fairly."""
        if self._guard is None or self._guard.rig.camera != camera:
            config = replace(self.config.tracker, fov_deg=fov_deg, fit_fov=False, warm_start="none",
                             calibration_seconds=math.inf, output_filter=None)
            self._guard = Tracker(self.head, (camera.height, camera.width), config)
        return self._guard

    def _landmark_rms(self, guard: Tracker, shape: torch.Tensor) -> float:
        """Mean RMS pixel error of landmark-only fits of the pool's frames with this identity."""
        guard.adopt_identity(self._padded(shape.cpu(), guard.rig))
        errors = [fit.rms_px for fit in (guard.track(k.landmarks, timestamp=0.0) for k in self._pool) if fit.valid]
        return float(np.mean(errors)) if errors else float("inf")

    @staticmethod
    def _padded(shape: torch.Tensor, rig: HeadRig) -> torch.Tensor:
        """``shape`` cut or zero-padded to the rig's number of identity coefficients."""
        count = min(shape.numel(), rig.layer.n_shape)
        padded = torch.zeros(rig.layer.n_shape, dtype=rig.shape.dtype)
        padded[:count] = shape.reshape(-1)[:count]
        return padded

    def _fitter_for(self, image_size: tuple[int, int], fov_deg: float) -> PhotometricFitter:
        """The fitter, made for the keyframes' image size (height, width) and FOV (the first time, or when either
        changed)."""
        height, width = image_size
        camera = Camera.from_fov(width, height, fov_deg)
        if self._fitter is None or self._fitter.rig.camera != camera:
            config = self.config.tracker
            rig = HeadRig(self.head, camera, config.n_shape, config.n_exp, config.fit, config.device, config.dtype)
            shape = self._shape if self._fitter is None else self._fitter.shape.cpu()
            rig.use(rig.identity_for(self._padded(shape, rig)))
            self._fitter = PhotometricFitter(rig, self.config.photometric)
        return self._fitter

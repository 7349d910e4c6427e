"""The live refiner: a background thread that turns keyframes into a photometrically refined identity.

It consumes :class:`realtime.keyframes.KeyframeQueue` (never blocking the live loop, which only puts), keeps
the latest ``pool_size`` keyframes, fits shape, albedo and lighting to them jointly with its own
:class:`Tracker` (nothing is shared with the live tracker), and hands each result to ``on_update(shape, tex,
light)``. The callback runs on the refiner's thread: the live loop should store the result and adopt it
between frames (``Tracker.adopt_identity``), then publish ``flame.shape``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.head_model import HeadModel
from engine.photometric import PhotometricConfig, PhotometricFitter, state_from_tracked
from engine.tracker import Tracker, TrackerConfig
from realtime.keyframes import Keyframe, KeyframeQueue

log = logging.getLogger(__name__)

IdentityCallback = Callable[[np.ndarray, np.ndarray, np.ndarray], None]


@dataclass
class RefinerConfig:
    pool_size: int = 6
    """Keyframes fitted together; the oldest leaves when a new one arrives."""
    iterations: int = 30
    photometric: PhotometricConfig = field(default_factory=lambda: PhotometricConfig(size=192))
    tracker: TrackerConfig = field(default_factory=TrackerConfig)


class LiveRefiner:
    """Refines identity from keyframes on its own thread; ``start``/``stop`` or use as a context manager."""

    def __init__(self, head: HeadModel, queue: KeyframeQueue, initial_shape: torch.Tensor, on_update: IdentityCallback,
                 config: RefinerConfig | None = None) -> None:
        self.head = head
        self.queue = queue
        self.on_update = on_update
        self.config = config or RefinerConfig()
        self.updates = 0
        self._shape = initial_shape.detach().cpu().clone()
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
                if self.queue.closed:
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
        fitter = self._fitter_for(self._pool[-1])
        batch = fitter.prepare([k.image for k in self._pool], [k.landmarks for k in self._pool])
        initial = state_from_tracked([k.tracked for k in self._pool], fitter.device, fitter.dtype)
        fitter.fit_identity(batch, initial, self.config.iterations)
        self.updates += 1
        log.info("refined identity #%d from %d keyframes in %.1f s", self.updates, len(self._pool), time.monotonic() - started)
        self.on_update(fitter.shape.cpu().numpy().copy(), fitter.appearance.state(), fitter.light.cpu().numpy().reshape(-1))

    def _fitter_for(self, keyframe: Keyframe) -> PhotometricFitter:
        """The fitter, made for the keyframes' image size and FOV (the first time, or when either changed)."""
        height, width = keyframe.image.shape[:2]
        camera = None if self._fitter is None else self._fitter.tracker.camera
        if camera is None or (camera.height, camera.width, camera.fov_deg) != (height, width, keyframe.tracked.fov_deg):
            config = TrackerConfig(**{**self.config.tracker.__dict__, "fov_deg": keyframe.tracked.fov_deg})
            tracker = Tracker(self.head, (height, width), config)
            shape = self._shape if self._fitter is None else self._fitter.shape.cpu()
            count = min(shape.numel(), tracker.layer.n_shape)
            padded = torch.zeros(tracker.layer.n_shape, dtype=tracker.shape.dtype)
            padded[:count] = shape[:count]
            tracker.adopt_identity(padded)
            self._fitter = PhotometricFitter(tracker, self.config.photometric)
        return self._fitter

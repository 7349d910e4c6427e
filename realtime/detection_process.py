"""MediaPipe in a process of its own: frames go in through shared memory, landmarks come back the same way.

Why a process: MediaPipe's Python wrapper holds the interpreter lock for part of every frame, and so does
the NumPy solver; in one process the two slow each other down (measured: 60 detections took 2.5 times as
long beside a busy Python thread). In its own process MediaPipe runs at its own rate while this process
decodes, fits, writes and publishes.

How: one shared-memory block holds a ring of ``slots`` (image, result) pairs, allocated once. A frame is
copied (or resized) straight into a free slot's image, the slot number and timestamp go to the worker over a
pipe, and the worker writes the landmarks, depth, blendshapes and transform into the same slot and sends
back a few numbers. Several frames can be in flight (:meth:`DetectionProcess.submit`, then
:meth:`DetectionProcess.collect` in the same order), so the worker never waits for the next frame.

Shutdown: :meth:`DetectionProcess.close` (or leaving the ``with`` block) stops the worker and frees the
shared memory. The worker ignores Ctrl-C (the parent decides when to stop) and exits by itself when the
parent dies, because its end of the pipe then reports end-of-file. A worker that dies makes the next
:meth:`collect` raise :class:`DetectionProcessError` instead of waiting for ever.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import importlib
import logging
import multiprocessing
import os
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np

from engine.cpu_priority import BACKGROUND_NICENESS
from engine.head_model import ModelFileError
from engine.landmarks import N_LANDMARKS, FaceLandmarker, FaceObservation, LandmarkerConfig
from flame_client.messages import BLENDSHAPE_NAMES

log = logging.getLogger(__name__)

#: Frames in flight by default: one being detected, two waiting in the pipe (see ``realtime.detection.IN_FLIGHT``).
DEFAULT_SLOTS = 3
_START_TIMEOUT_S = 120.0  # the worker imports MediaPipe and loads the model; a busy machine takes its time
_STOP_TIMEOUT_S = 5.0
_ALIGNMENT = 64


class DetectionProcessError(RuntimeError):
    """The detection process failed or ended while frames were in flight."""


@dataclass(frozen=True)
class Detection:
    """One collected frame: the face MediaPipe found (None: no face) and how long MediaPipe took for it."""

    observation: FaceObservation | None
    mediapipe_ms: float
    """MediaPipe's own time for the frame, measured in the worker (no waiting, no copying)."""
    idle_ms: float = 0.0
    """How long the worker waited for this frame after answering the one before (next to nothing when the frame
    was already waiting for it; 0 for the first frame): time MediaPipe could have worked but had nothing to do."""


def resized(image: np.ndarray, size: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
    """`image` at (width, height) `size`: area averaging when shrinking, bilinear when enlarging; written into
    `out` when given (no allocation)."""
    import cv2  # here, not at the top: MediaPipe's worker imports this module and never resizes (see DEFERRED_MODULES)

    shrinking = size[0] * size[1] < image.shape[0] * image.shape[1]
    return cv2.resize(image, size, dst=out, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


class _Ring:
    """Views of the shared block: per slot an RGB image and the arrays of one face."""

    def __init__(self, buffer: memoryview, image_size: tuple[int, int], slots: int) -> None:
        height, width = image_size
        layout = _layout(image_size, slots)
        self.images = np.ndarray((slots, height, width, 3), np.uint8, buffer, layout["images"])
        self.points = np.ndarray((slots, N_LANDMARKS, 2), np.float32, buffer, layout["points"])
        self.depth = np.ndarray((slots, N_LANDMARKS), np.float32, buffer, layout["depth"])
        self.blendshapes = np.ndarray((slots, len(BLENDSHAPE_NAMES)), np.float32, buffer, layout["blendshapes"])
        self.transform = np.ndarray((slots, 4, 4), np.float64, buffer, layout["transform"])

    def store(self, slot: int, observation: FaceObservation) -> None:
        self.points[slot] = observation.points
        self.depth[slot] = observation.depth
        self.blendshapes[slot] = observation.blendshapes
        self.transform[slot] = observation.transform

    def observation(self, slot: int, timestamp_ms: int) -> FaceObservation:
        """The face in ``slot`` as arrays of its own (the slot is reused for later frames)."""
        return FaceObservation(
            points=self.points[slot].copy(),
            depth=self.depth[slot].copy(),
            blendshapes=self.blendshapes[slot].copy(),
            transform=self.transform[slot].copy(),
            image_size=(self.images.shape[1], self.images.shape[2]),
            timestamp_ms=timestamp_ms,
        )


def _layout(image_size: tuple[int, int], slots: int) -> dict[str, int]:
    """Byte offsets of the ring's arrays in the shared block, each aligned; ``end`` is the block's size."""
    height, width = image_size
    sizes = {
        "images": slots * height * width * 3,
        "points": slots * N_LANDMARKS * 2 * 4,
        "depth": slots * N_LANDMARKS * 4,
        "blendshapes": slots * len(BLENDSHAPE_NAMES) * 4,
        "transform": slots * 16 * 8,
    }
    offsets, position = {}, 0
    for name, size in sizes.items():
        offsets[name] = position
        position += -(-size // _ALIGNMENT) * _ALIGNMENT
    offsets["end"] = position
    return offsets


class DetectionProcess:
    """A MediaPipe Face Landmarker in a worker process, for frames of one size. Use as a context manager.

    ``detect`` is a drop-in for :meth:`engine.landmarks.FaceLandmarker.detect`; ``submit`` and ``collect``
    keep several frames in flight. Not thread-safe: one thread submits and collects.
    """

    def __init__(
        self, config: LandmarkerConfig, image_size: tuple[int, int], slots: int = DEFAULT_SLOTS, background: bool = False
    ) -> None:
        """``image_size`` is (height, width), the size of every frame submitted. A ``background`` worker runs at
        a lower CPU priority (Unix ``nice`` +:data:`BACKGROUND_NICENESS`): it takes the cores that the others
        leave idle, so that it never slows a foreground MediaPipe beside it."""
        if slots < 1:
            raise ValueError(f"slots must be at least 1, not {slots}")
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.slots = slots
        self._memory = SharedMemory(create=True, size=_layout(self.image_size, slots)["end"])
        self._ring: _Ring | None = _Ring(self._memory.buf, self.image_size, slots)
        self._free = collections.deque(range(slots))
        self._in_flight: collections.deque[int] = collections.deque()
        self._connection, worker_end = multiprocessing.Pipe()
        self._closed = False
        self._process: subprocess.Popen | None = None
        try:
            self._process = _start_worker(worker_end, BACKGROUND_NICENESS if background else 0)
            worker_end.close()  # only the worker holds it now, so its death reads as end-of-file here
            self._send((config, self._memory.name, self.image_size, slots, log.isEnabledFor(logging.DEBUG)))
            self._wait_until_ready()
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def memory_name(self) -> str:
        """The shared-memory block's name (under /dev/shm on Linux); gone once closed."""
        return self._memory.name

    def cpu_seconds(self) -> float:
        """CPU time the worker has used so far, user and system (Linux; NaN where /proc is not available)."""
        if self.pid is None:
            return float("nan")
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, IndexError):
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    @property
    def in_flight(self) -> int:
        """Frames submitted and not yet collected."""
        return len(self._in_flight)

    def submit(self, image_rgb: np.ndarray, timestamp_ms: int | None = None, resize: bool = False) -> np.ndarray:
        """Copy an (H, W, 3) uint8 RGB image of the process's size into a free slot and start its detection;
        with ``resize``, an image of another size is resized into the slot instead (:func:`resized`, no copy
        in between). Returns the slot's image, the frame as MediaPipe sees it: a view, valid until collected.

        In VIDEO mode ``timestamp_ms`` must rise (the worker bumps one that does not, as FaceLandmarker
        does); None stamps it with the worker's clock. Raises when every slot is in flight.
        """
        if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image_rgb.shape} {image_rgb.dtype}")
        if not self._free:
            raise RuntimeError(f"all {self.slots} slots are in flight: collect a detection first")
        same_size = image_rgb.shape[:2] == self.image_size
        if not same_size and not resize:
            raise ValueError(f"this detection process takes {self.image_size[1]}x{self.image_size[0]} images, "
                             f"not {image_rgb.shape[1]}x{image_rgb.shape[0]}")
        slot = self._free[0]
        image = self._live_ring().images[slot]
        if same_size:
            np.copyto(image, image_rgb)
        else:
            resized(image_rgb, (self.image_size[1], self.image_size[0]), out=image)
        self._send((slot, None if timestamp_ms is None else int(timestamp_ms)))
        self._free.popleft()
        self._in_flight.append(slot)
        return image

    def collect(self, timeout_s: float | None = None) -> Detection | None:
        """The oldest frame in flight, detected; None if it is not done within ``timeout_s`` (None: wait)."""
        if not self._in_flight:
            raise RuntimeError("no frame in flight: submit one first")
        if timeout_s is not None and not self._connection.poll(timeout_s):
            if not self._alive():
                raise self._died()
            return None
        reply = self._receive()
        if reply[0] == "failed":
            raise DetectionProcessError(f"MediaPipe failed in the detection process: {reply[1]}")
        slot, found, timestamp_ms, mediapipe_ms, idle_ms = reply
        expected = self._in_flight.popleft()
        if slot != expected:
            raise DetectionProcessError(f"the detection process answered for slot {slot}, expected {expected}")
        observation = self._live_ring().observation(slot, timestamp_ms) if found else None
        self._free.append(slot)
        return Detection(observation, mediapipe_ms, idle_ms)

    def detect(self, image_rgb: np.ndarray, timestamp_ms: int | None = None) -> FaceObservation | None:
        """Find the face in one image and wait for it (as FaceLandmarker.detect); None when there is none."""
        self.submit(image_rgb, timestamp_ms)
        detection = self.collect()
        assert detection is not None  # collect without a timeout waits for the answer
        return detection.observation

    def close(self) -> None:
        """Stop the worker (it finishes the frame it is on) and free the shared memory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._process is not None:
            try:
                self._connection.send(None)
            except (BrokenPipeError, OSError):
                pass  # already gone
            try:
                self._process.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("the MediaPipe process did not stop in %.0f s; killing it", _STOP_TIMEOUT_S)
                self._process.kill()
                self._process.wait()
        self._connection.close()
        self._ring = None  # the views must go before the block can be closed
        self._memory.close()
        self._memory.unlink()

    def __enter__(self) -> DetectionProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _live_ring(self) -> _Ring:
        if self._ring is None:
            raise RuntimeError("the detection process is closed")
        return self._ring

    def _send(self, message: object) -> None:
        try:
            self._connection.send(message)
        except (BrokenPipeError, OSError):
            raise self._died() from None

    def _receive(self) -> tuple:
        try:
            return self._connection.recv()
        except (EOFError, OSError):
            raise self._died() from None

    def _alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _died(self) -> DetectionProcessError:
        code = None
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self._process.wait(1.0)
        return DetectionProcessError(f"the MediaPipe detection process ended unexpectedly (exit code {code})")

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._connection.poll(0.1):
            if not self._alive():
                raise self._died()
            if time.monotonic() > deadline:
                raise DetectionProcessError(f"the MediaPipe detection process did not start within {_START_TIMEOUT_S:.0f} s")
        reply = self._receive()
        if reply[0] == "model_error":
            raise ModelFileError(reply[1])
        if reply[0] != "ready":
            raise DetectionProcessError(f"the MediaPipe detection process could not start: {reply[1]}")


def _start_worker(worker_end: Connection, niceness: int) -> subprocess.Popen:
    """Start the worker as a fresh interpreter running :func:`_worker_main` on its end of the pipe, ``niceness``
    steps below this process's CPU priority.

    A plain subprocess, not multiprocessing's spawn, so the caller's main script is never imported again in
    the worker. It gets a session of its own, so Ctrl-C on the terminal reaches only this process, which
    stops the worker in order. It finds this package through this process's import path.
    """
    descriptor = worker_end.fileno()
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
    code = f"from realtime.detection_process import _worker_main; _worker_main({descriptor}, {int(niceness)})"
    return subprocess.Popen(
        [sys.executable, "-c", code], pass_fds=[descriptor], env=environment, stdin=subprocess.DEVNULL, start_new_session=True
    )


class _DeferredModule(types.ModuleType):
    """Stands in for a module of :data:`DEFERRED_MODULES` in ``sys.modules`` until something reads an
    attribute of it that it does not hold: then the real module is imported and the read is answered from it."""

    def __getattr__(self, name: str) -> object:
        root = self.__name__.partition(".")[0]
        for module_name in DEFERRED_MODULES:
            if module_name.partition(".")[0] == root and isinstance(sys.modules.get(module_name), _DeferredModule):
                del sys.modules[module_name]
        return getattr(importlib.import_module(self.__name__), name)


#: Imported on first use, not on import, in the worker, which never uses them: MediaPipe's vision package
#: imports its drawing utilities, which import matplotlib's pyplot (half of MediaPipe's import time, 0.3 s)
#: and OpenCV (0.05-0.1 s; the parent resizes frames into the ring), and its audio package imports
#: sounddevice, which loads PortAudio (0.05 s).
DEFERRED_MODULES = ("matplotlib", "matplotlib.pyplot", "cv2", "sounddevice")


def defer_unused_imports() -> None:
    """Put stand-ins for :data:`DEFERRED_MODULES` in ``sys.modules`` (before MediaPipe is imported), each
    imported for real on its first use; a submodule's stand-in is also its parent's attribute, so
    ``import matplotlib.pyplot as plt`` binds the stand-in. A module already imported stays as it is."""
    for module_name in DEFERRED_MODULES:
        parent, _, child = module_name.rpartition(".")
        if module_name.partition(".")[0] in sys.modules and not isinstance(sys.modules.get(parent), _DeferredModule):
            continue
        sys.modules[module_name] = _DeferredModule(module_name)
        if parent:
            setattr(sys.modules[parent], child, sys.modules[module_name])


def _worker_main(descriptor: int, niceness: int = 0) -> None:
    """The worker: read its configuration, then answer each (slot, timestamp) request with (slot, found,
    timestamp, MediaPipe's ms, ms idle before the request) until told to stop (None) or until the parent is gone (end-of-file)."""
    if niceness and hasattr(os, "nice"):  # before MediaPipe loads: its start-up is background work too
        os.nice(niceness)
    defer_unused_imports()
    connection = Connection(descriptor)
    try:
        config, memory_name, image_size, slots, verbose = connection.recv()
    except (EOFError, OSError):
        return
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    memory = SharedMemory(name=memory_name)
    # The parent created the block and unlinks it; without this, this process's tracker would unlink it too
    # when this process ends. The tracker knows POSIX shared memory by its name with the leading slash.
    resource_tracker.unregister("/" + memory.name, "shared_memory")
    ring = _Ring(memory.buf, image_size, slots)
    try:
        _serve(config, ring, connection)
    finally:
        del ring
        memory.close()
        connection.close()


def _serve(config: LandmarkerConfig, ring: _Ring, connection: Connection) -> None:
    try:
        landmarker = FaceLandmarker(config)
    except ModelFileError as error:
        connection.send(("model_error", str(error)))
        return
    except Exception as error:  # noqa: BLE001 - reported to the parent, which raises it
        connection.send(("start_error", f"{type(error).__name__}: {error}"))
        return
    gc.collect()
    gc.freeze()  # MediaPipe and the model stay for good: later collections need not walk them
    connection.send(("ready",))
    answered: float | None = None  # when the last answer went out: the wait for a request is idle time from there
    with landmarker:
        while True:
            try:
                request = connection.recv()
            except (EOFError, OSError):
                return  # the parent is gone
            if request is None:
                return
            slot, timestamp_ms = request
            started = time.perf_counter()
            idle_ms = 0.0 if answered is None else (started - answered) * 1e3
            try:
                observation = landmarker.detect(ring.images[slot], timestamp_ms)
            except Exception as error:  # noqa: BLE001 - reported to the parent, which raises it
                connection.send(("failed", f"{type(error).__name__}: {error}"))
                return
            mediapipe_ms = (time.perf_counter() - started) * 1e3
            if observation is not None:
                ring.store(slot, observation)
            timestamp_ms = observation.timestamp_ms if observation is not None else 0
            try:
                connection.send((slot, observation is not None, timestamp_ms, mediapipe_ms, idle_ms))
            except (BrokenPipeError, OSError):
                return
            answered = time.perf_counter()

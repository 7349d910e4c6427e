"""The optional --preview window: the fitted mesh and/or the landmarks over the newest frame, with the frame
rate, the latency and the calibration state.

Keys: ``m`` cycles mesh / landmarks / both, ``r`` recalibrates, ``q`` or Esc quits (as does closing the window).

Drawing never slows tracking: the live loop only hands over references to its newest result (:meth:`submit`,
no copy, no wait), and the GUI thread poses the mesh, renders it and shows it; results that arrive while it
draws replace each other, so it always draws the newest. That thread also creates and polls the OpenCV
windows: HighGUI (Qt) binds itself to the thread that opened its first window, for the life of the process,
so one long-lived GUI thread serves every preview a process opens (on Linux it need not be the main thread).
Without a display, :func:`display_available` says so in one line and the caller tracks on without a window.
"""

from __future__ import annotations

import enum
import logging
import os
import queue
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from engine.cpu_priority import lower_thread_priority
from engine.demo_head import DEMO_HEAD_NAME
from engine.export import posed_vertices
from engine.flame import FlameLayer
from engine.head_model import HeadModel
from engine.overlay import FITTED_RGB, INVALID_RGB, MESH_ALPHA, OBSERVED_RGB, LandmarkPairs, MeshPainter, composite, draw_label, draw_points
from realtime.handoff import DropOldestQueue

log = logging.getLogger(__name__)

TITLE = "flame-live preview (m: mesh/landmarks, r: recalibrate, q: quit)"
_CLOSE_KEYS = frozenset({27, ord("q")})  # Esc, q
_CALIBRATING_RGB = (255, 200, 40)


def display_available() -> bool:
    """Whether a window can be shown; if not, logs one line saying that tracking goes on without it."""
    # Without a display, Qt aborts the whole process instead of raising, so check before opening a window.
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        log.warning("--preview needs a display, but none is available ($DISPLAY is not set); tracking goes on without it")
        return False
    return True


class _GuiThread:
    """The process's one HighGUI thread: runs each preview's drawing loop in turn."""

    _jobs: queue.SimpleQueue | None = None
    _lock = threading.Lock()

    @classmethod
    def run(cls, job: Callable[[], None]) -> None:
        with cls._lock:
            if cls._jobs is None:
                cls._jobs = queue.SimpleQueue()
                threading.Thread(target=cls._serve, args=(cls._jobs,), name="preview", daemon=True).start()
            cls._jobs.put(job)

    @staticmethod
    def _serve(jobs: queue.SimpleQueue) -> None:
        lower_thread_priority()  # the preview yields the CPU to tracking when both want it
        while True:
            jobs.get()()


class PreviewMode(enum.Enum):
    MESH = "mesh"
    LANDMARKS = "landmarks"
    BOTH = "mesh + landmarks"

    def next(self) -> PreviewMode:
        modes = list(PreviewMode)
        return modes[(modes.index(self) + 1) % len(modes)]


@dataclass(frozen=True)
class PreviewFrame:
    """One result as the live loop hands it over; the window only reads it."""

    image: np.ndarray  # RGB, shared with the recorder: never modified
    arrays: dict[str, np.ndarray] | None  # the fit in the reference format (engine.frames.reference_arrays)
    landmarks: np.ndarray | None  # (478, 2) MediaPipe pixels, None without a face
    valid: bool
    calibrated: bool
    fps: float
    latency_ms: float


class PreviewWindow:
    """The preview window, drawn on the GUI thread; use as a context manager (closing waits for the window to go)."""

    def __init__(self, head: HeadModel, n_shape: int, n_exp: int, recalibrate: threading.Event, title: str = TITLE) -> None:
        self.title = title
        self.mode = PreviewMode.MESH
        self.drawn = 0
        """Frames shown so far."""
        self._draw_seconds: deque[float] = deque(maxlen=256)
        self._head, self._n_shape, self._n_exp = head, n_shape, n_exp
        self._recalibrate = recalibrate
        self._newest: DropOldestQueue[PreviewFrame] = DropOldestQueue(1)  # an undrawn frame is replaced
        self._stop = threading.Event()
        self._closed = threading.Event()
        self._finished = threading.Event()
        _GuiThread.run(self._run)

    @property
    def closed(self) -> bool:
        """True once the user quit (q, Esc, the window closed)."""
        return self._closed.is_set()

    def submit(self, frame: PreviewFrame) -> None:
        """Hand over the newest result; returns at once (an undrawn older one is replaced)."""
        self._newest.offer(frame)

    def draw_ms(self) -> float:
        """Median milliseconds to pose, render and show one frame, over the recent frames (0 before the first)."""
        recent = list(self._draw_seconds)
        return statistics.median(recent) * 1e3 if recent else 0.0

    def close(self) -> None:
        self._stop.set()
        self._newest.close()
        self._finished.wait(timeout=5.0)

    def __enter__(self) -> PreviewWindow:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ the drawing thread
    def _run(self) -> None:
        try:
            self._show_until_closed()
        finally:
            self._finished.set()

    def _show_until_closed(self) -> None:
        try:
            cv2.namedWindow(self.title, cv2.WINDOW_AUTOSIZE | cv2.WINDOW_GUI_NORMAL)
        except cv2.error as error:
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else "no GUI support"
            log.warning("--preview cannot open a window (%s); tracking goes on without it", reason)
            return
        # Built here, not in the live loop's thread: the loop never waits for the preview's set-up.
        layer = FlameLayer(self._head, self._n_shape, self._n_exp)
        painter = MeshPainter(self._head)
        pairs = LandmarkPairs.for_head(self._head)
        try:
            while not self._stop.is_set():
                frame = self._newest.get(timeout=0.03)  # short: the window's events are polled between frames
                if frame is not None:
                    started = time.perf_counter()
                    canvas = self._draw(frame, layer, painter, pairs)
                    cv2.imshow(self.title, cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
                    self._draw_seconds.append(time.perf_counter() - started)
                    self.drawn += 1
                if not self._handle_key(cv2.waitKey(1) & 0xFF):
                    break
        finally:
            self._closed.set()
            cv2.destroyWindow(self.title)
            cv2.waitKey(1)  # lets the GUI event loop actually remove the window

    def _handle_key(self, key: int) -> bool:
        """Act on a key; False when the preview should close."""
        if key in _CLOSE_KEYS:
            return False
        if key == ord("m"):
            self.mode = self.mode.next()
        elif key == ord("r"):
            log.info("recalibration requested from the preview window")
            self._recalibrate.set()
        return self.drawn == 0 or cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) >= 1

    def _draw(self, frame: PreviewFrame, layer: FlameLayer, painter: MeshPainter, pairs: LandmarkPairs | None) -> np.ndarray:
        canvas = frame.image.copy()
        height, width = canvas.shape[:2]
        vertices = K = None
        if frame.valid and frame.arrays is not None:
            vertices = posed_vertices(layer, frame.arrays, space="camera")
            K = frame.arrays["K"][0].astype(np.float64)
        if vertices is not None and self.mode is not PreviewMode.LANDMARKS:
            composite(canvas, painter.paint(vertices, K, (height, width)), MESH_ALPHA)
        if self.mode is not PreviewMode.MESH:
            # The points the tracker fits: observed (green, beneath) and fitted (magenta, on top).
            observed = frame.landmarks if pairs is None or frame.landmarks is None else pairs.observed(frame.landmarks)
            draw_points(canvas, observed, OBSERVED_RGB, radius=2)
            if vertices is not None and pairs is not None:
                draw_points(canvas, pairs.fitted(vertices, K), FITTED_RGB)
        rate = f"{frame.fps:.1f}" if frame.fps > 0 else "--"  # the rate is measured once a second
        draw_label(canvas, f"{rate} fps   latency {frame.latency_ms:.0f} ms   {self.mode.value}", 0)
        if not frame.valid:
            draw_label(canvas, "no face", 1, INVALID_RGB)
        elif not frame.calibrated:
            draw_label(canvas, "calibrating...", 1, _CALIBRATING_RGB)
        if self._head.is_demo:
            draw_label(canvas, DEMO_HEAD_NAME, 0, bottom=True)
        return canvas

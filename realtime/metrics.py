"""The live loop's measurements: per-frame stage times, the ``flame.metrics`` report, the status line and the
end-of-run summary.

The loop hands every frame's times to :class:`LiveMetrics` (:meth:`LiveMetrics.record_frame`) and, once per
``interval_s``, the counts it keeps (:class:`LiveCounts`) to :meth:`LiveMetrics.report`, which publishes them and
refreshes the status line. Recent frames (``window``) feed the published percentiles; a longer history
(``summary_window``) feeds the :class:`LiveSummary` a run returns.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flame_client.messages import metrics_message
from realtime.publishers import Publisher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiveSummary:
    """What a run did, as returned by ``LivePipeline.run``; times in milliseconds unless named otherwise."""

    frames: int
    valid_frames: int
    dropped_frames: int
    """Frames the source captured but the loop had no time for."""
    publisher_dropped: int
    duration_s: float
    """From the start of the loop to the last frame's publication (closing down is not counted)."""
    fps: float
    latency_p50_ms: float
    latency_p95_ms: float
    """Capture to publish, over the last ``summary_window`` frames."""
    added_p50_ms: float
    added_p95_ms: float
    """What the loop adds to MediaPipe per frame: capture to publish minus the frame's own MediaPipe time
    (waiting for a core or for MediaPipe, resizing, hand-offs, fitting, publishing), over the same frames."""
    mediapipe_ms: float
    tracker_ms: float
    """Median per-frame times of the two stages."""
    tracker_max_ms: float
    """The slowest fit, usually the frame that calibrated the identity."""
    keyframes: int
    keyframes_dropped: int
    frame_median_ms: float
    frame_max_ms: float
    """MediaPipe plus fitting and publishing, per frame after the warm-up frames."""
    fitting_cpu_median_ms: float = 0.0
    fitting_cpu_max_ms: float = 0.0
    """CPU time of the fitting stage's thread per frame (fit and publish) after the warm-up frames: the work
    itself, without the waits for a core or the interpreter lock that the wall-clock times include."""
    mediapipe_idle_share: float = float("nan")
    """After the warm-up frames, the share of the time MediaPipe's process waited for a frame (its idle time
    over idle plus detection time): near 0 when the loop keeps it busy (flat out), large when frames come
    slower than it detects them (a camera)."""
    cpu_ms_per_frame: float = float("nan")
    """CPU time per frame of this process (every thread) and MediaPipe's together, from the first frame to
    the last: the loop's whole cost, decoding included, start-up excluded."""
    calibration_frames: int = 0
    """Frames after the warm-up during which a background calibration ran (it shares the cores and the
    interpreter lock with the loop)."""
    frame_median_during_calibration_ms: float = 0.0
    frame_max_during_calibration_ms: float = 0.0
    frame_max_outside_calibration_ms: float = 0.0
    """Per-frame times as ``frame_median_ms`` / ``frame_max_ms``, of those frames and of the others."""
    mediapipe_median_during_calibration_ms: float = 0.0
    mediapipe_median_outside_calibration_ms: float = 0.0
    """MediaPipe's own time per frame (in its process), median over those frames and over the others: the part
    of a frame that the calibration's CPU use slows on a busy machine."""
    preview_frames: int = 0
    """Frames the preview window drew (on its own thread; the others were replaced by newer ones)."""
    preview_draw_ms: float = 0.0
    """Median time the preview thread took to pose, render and show one frame."""
    source_lost: str | None = None
    """Why the camera or stream stopped for good, when it did; the run then ends with a failure status."""

    def describe(self) -> str:
        lost = f"; stopped early: {self.source_lost}" if self.source_lost else ""
        return (
            f"processed {self.frames} frames ({self.valid_frames} with a face) in {self.duration_s:.1f} s: "
            f"{self.fps:.1f} fps, capture->publish p50 {self.latency_p50_ms:.0f} ms p95 {self.latency_p95_ms:.0f} ms, "
            f"{self.dropped_frames} frames dropped{lost}"
        )


@dataclass(frozen=True)
class LiveCounts:
    """What the loop has counted so far, for a report or the summary."""

    frames: int
    valid_frames: int
    dropped_frames: int
    """Frames the source captured but the loop had no time for."""
    publisher_dropped: int
    calibrated: bool
    keyframes: int | None = None
    """Keyframes selected (None: selection is off)."""
    keyframes_dropped: int = 0
    preview_frames: int = 0
    preview_draw_ms: float = 0.0
    source_lost: str | None = None


class Samples:
    """The most recent `capacity` values of one measurement, in a preallocated ring."""

    def __init__(self, capacity: int) -> None:
        self._values = np.zeros(capacity)
        self._count = 0

    def add(self, value: float) -> None:
        self._values[self._count % len(self._values)] = value
        self._count += 1

    def percentile(self, q: float) -> float:
        if self._count == 0:
            return 0.0
        return float(np.percentile(self._values[: min(self._count, len(self._values))], q))

    @property
    def count(self) -> int:
        """Values held (at most the capacity)."""
        return min(self._count, len(self._values))

    def maximum(self) -> float:
        return float(self._values[: min(self._count, len(self._values))].max()) if self._count else 0.0


class StageTimes:
    """Latency and stage times of recent frames."""

    def __init__(self, capacity: int) -> None:
        self.latency_ms = Samples(capacity)
        self.added_ms = Samples(capacity)
        self.mediapipe_ms = Samples(capacity)
        self.tracker_ms = Samples(capacity)

    def add(self, latency_ms: float, mediapipe_ms: float, tracker_ms: float) -> None:
        self.latency_ms.add(latency_ms)
        self.added_ms.add(latency_ms - mediapipe_ms)
        self.mediapipe_ms.add(mediapipe_ms)
        self.tracker_ms.add(tracker_ms)


class StatusLine:
    """One line that rewrites itself on a terminal; a log line per update elsewhere (files, CI logs)."""

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        self._terminal = enabled and sys.stderr.isatty()
        self._shown = False

    def show(self, text: str) -> None:
        if not self._enabled:
            return
        if self._terminal:
            sys.stderr.write("\r" + text + "\x1b[K")
            sys.stderr.flush()
            self._shown = True
        else:
            log.info(text)

    def finish(self) -> None:
        if self._shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


class LiveMetrics:
    """Stage times of the frames so far, reported as ``flame.metrics`` and a status line every ``interval_s``."""

    def __init__(self, interval_s: float, window: int, summary_window: int, warmup_frames: int, show_status: bool) -> None:
        self.interval_s = interval_s
        self.warmup_frames = warmup_frames
        self.fps = 0.0
        """Frames per second between the last two reports."""
        self._recent = StageTimes(window)
        self._history = StageTimes(summary_window)
        self._frame_ms = Samples(summary_window)  # after the warm-up frames
        self._fitting_cpu_ms = Samples(summary_window)  # after the warm-up frames
        self._calibration_frame_ms = Samples(summary_window)  # after the warm-up, during a background calibration
        self._other_frame_ms = Samples(summary_window)  # after the warm-up, the rest
        self._calibration_mediapipe_ms = Samples(summary_window)
        self._other_mediapipe_ms = Samples(summary_window)
        self._status = StatusLine(show_status)
        self._recorded = 0
        self._mediapipe_busy_ms = 0.0  # after the warm-up frames
        self._mediapipe_idle_ms = 0.0
        self._started = time.monotonic()
        self._last_frame = self._started
        self._last_report = (self._started, 0)  # (monotonic time, frames recorded) at the last report

    def start(self) -> None:
        """The run begins now: fps and the duration count from here."""
        self._started = self._last_frame = time.monotonic()
        self._last_report = (self._started, self._recorded)

    def record_frame(
        self, latency_ms: float, mediapipe_ms: float, tracker_ms: float, frame_ms: float, fitting_cpu_ms: float,
        mediapipe_idle_ms: float = 0.0, calibrating: bool = False,
    ) -> None:
        """One processed frame, just published: capture->publish latency, the two stages' times, the whole
        frame's, the CPU time the fitting stage spent on it, how long MediaPipe waited for it, and whether a
        background calibration ran meanwhile."""
        self._last_frame = time.monotonic()
        self._recorded += 1
        self._recent.add(latency_ms, mediapipe_ms, tracker_ms)
        self._history.add(latency_ms, mediapipe_ms, tracker_ms)
        if self._recorded > self.warmup_frames:
            self._frame_ms.add(frame_ms)
            self._fitting_cpu_ms.add(fitting_cpu_ms)
            (self._calibration_frame_ms if calibrating else self._other_frame_ms).add(frame_ms)
            (self._calibration_mediapipe_ms if calibrating else self._other_mediapipe_ms).add(mediapipe_ms)
            self._mediapipe_busy_ms += mediapipe_ms
            self._mediapipe_idle_ms += mediapipe_idle_ms

    def report_due(self) -> bool:
        return time.monotonic() - self._last_report[0] >= self.interval_s

    def report(self, counts: LiveCounts, publishers: Sequence[Publisher]) -> None:
        """Publish ``flame.metrics`` over the recent frames and refresh the status line."""
        now = time.monotonic()
        last_time, last_frames = self._last_report
        self.fps = (counts.frames - last_frames) / max(now - last_time, 1e-6)
        self._last_report = (now, counts.frames)
        recent = self._recent
        extra = {"frames": counts.frames, "valid_frames": counts.valid_frames, "publisher_dropped": counts.publisher_dropped}
        if counts.keyframes is not None:
            extra |= {"keyframes": counts.keyframes, "keyframes_dropped": counts.keyframes_dropped}
        message = metrics_message(
            fps=self.fps,
            latency_p50_ms=recent.latency_ms.percentile(50),
            latency_p95_ms=recent.latency_ms.percentile(95),
            dropped_frames=counts.dropped_frames,
            mediapipe_ms=recent.mediapipe_ms.percentile(50),
            tracker_ms=recent.tracker_ms.percentile(50),
            extra=extra,
        )
        for publisher in publishers:
            publisher.publish_metrics(message)
        self._status.show(
            f"{self.fps:5.1f} fps | latency p50 {message['latency_p50_ms']:4.0f} ms p95 {message['latency_p95_ms']:4.0f} ms"
            f" | mediapipe {message['mediapipe_ms']:3.0f} ms | tracker {message['tracker_ms']:3.0f} ms"
            f" | dropped {counts.dropped_frames} | {'calibrated' if counts.calibrated else 'calibrating'}"
        )

    def end_status_line(self) -> None:
        self._status.finish()

    def summary(self, counts: LiveCounts, cpu_seconds: float = float("nan")) -> LiveSummary:
        """The run so far, over the longer history; ``cpu_seconds``: CPU time the loop's processes used in it."""
        duration_s = self._last_frame - self._started
        history = self._history
        mediapipe_ms = self._mediapipe_busy_ms + self._mediapipe_idle_ms
        return LiveSummary(
            frames=counts.frames,
            valid_frames=counts.valid_frames,
            dropped_frames=counts.dropped_frames,
            publisher_dropped=counts.publisher_dropped,
            duration_s=duration_s,
            fps=counts.frames / duration_s if duration_s > 0 else 0.0,
            latency_p50_ms=history.latency_ms.percentile(50),
            latency_p95_ms=history.latency_ms.percentile(95),
            added_p50_ms=history.added_ms.percentile(50),
            added_p95_ms=history.added_ms.percentile(95),
            mediapipe_ms=history.mediapipe_ms.percentile(50),
            tracker_ms=history.tracker_ms.percentile(50),
            tracker_max_ms=history.tracker_ms.maximum(),
            keyframes=counts.keyframes or 0,
            keyframes_dropped=counts.keyframes_dropped,
            frame_median_ms=self._frame_ms.percentile(50),
            frame_max_ms=self._frame_ms.maximum(),
            fitting_cpu_median_ms=self._fitting_cpu_ms.percentile(50),
            fitting_cpu_max_ms=self._fitting_cpu_ms.maximum(),
            calibration_frames=self._calibration_frame_ms.count,
            frame_median_during_calibration_ms=self._calibration_frame_ms.percentile(50),
            frame_max_during_calibration_ms=self._calibration_frame_ms.maximum(),
            frame_max_outside_calibration_ms=self._other_frame_ms.maximum(),
            mediapipe_median_during_calibration_ms=self._calibration_mediapipe_ms.percentile(50),
            mediapipe_median_outside_calibration_ms=self._other_mediapipe_ms.percentile(50),
            mediapipe_idle_share=self._mediapipe_idle_ms / mediapipe_ms if mediapipe_ms > 0 else float("nan"),
            cpu_ms_per_frame=cpu_seconds * 1e3 / counts.frames if counts.frames else float("nan"),
            preview_frames=counts.preview_frames,
            preview_draw_ms=counts.preview_draw_ms,
            source_lost=counts.source_lost,
        )

"""Receive-side statistics for the client's once-a-second report: rates, latency percentiles, stream state."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from flame_client.messages import TOPIC_FRAME, TOPIC_METRICS, TOPIC_SHAPE


class ReceiveStats:
    """Collects received messages; :meth:`report_line` summarises the window since the previous report."""

    def __init__(self, window_start_s: float) -> None:
        self.totals: Counter[str] = Counter()
        self._window_start_s = window_start_s
        self._frames = 0
        self._valid_frames = 0
        self._capture_latency_ms: list[float] = []
        self._publish_latency_ms: list[float] = []
        self._shape: str | None = None
        self._server: str | None = None

    def add(self, topic: str, message: dict[str, Any], t_receive: float) -> None:
        """Count one validated message received at wall-clock time ``t_receive``."""
        self.totals[topic] += 1
        if topic == TOPIC_FRAME:
            self._frames += 1
            self._valid_frames += message["valid"]
            self._capture_latency_ms.append(1000.0 * (t_receive - message["t_capture"]))
            self._publish_latency_ms.append(1000.0 * (t_receive - message["t_publish"]))
        elif topic == TOPIC_SHAPE:
            self._shape = f"{message['model']} [{message['model_checksum'][:8]}] {len(message['shape'])} shape coeffs"
        elif topic == TOPIC_METRICS:
            self._server = (
                f"{message['fps']:.1f} fps, latency p95 {message['latency_p95_ms']:.0f} ms, "
                f"dropped {message['dropped_frames']}"
            )

    def report_line(self, now_s: float, rejected: int) -> str:
        """One line about the window ending at ``now_s`` (monotonic seconds); starts a new window."""
        rate = self._frames / max(now_s - self._window_start_s, 1e-9)
        parts = [f"frames {rate:.1f}/s"]
        if self._frames:
            parts[0] += f" ({100.0 * self._valid_frames / self._frames:.0f}% with a face)"
            capture_p50, capture_p95 = np.percentile(self._capture_latency_ms, [50, 95])
            parts.append(
                f"latency capture->receive p50 {capture_p50:.1f} p95 {capture_p95:.1f} ms, "
                f"publish->receive p50 {np.percentile(self._publish_latency_ms, 50):.1f} ms"
            )
        parts.append(f"model {self._shape or 'not received yet'}")
        if self._server:
            parts.append(f"server {self._server}")
        parts.append(f"rejected {rejected}")
        self._window_start_s = now_s
        self._frames = self._valid_frames = 0
        self._capture_latency_ms.clear()
        self._publish_latency_ms.clear()
        return " | ".join(parts)

    def summary(self, rejected: int) -> str:
        by_topic = ", ".join(f"{topic} {count}" for topic, count in sorted(self.totals.items()))
        return f"received {sum(self.totals.values())} messages ({by_topic or 'none'}), rejected {rejected}"

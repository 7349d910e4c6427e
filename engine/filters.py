"""One Euro filter (Casiez, Roussel, Vogel 2012): little jitter at rest, little lag in fast motion."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OneEuroConfig:
    """``min_cutoff`` (Hz) sets smoothing at rest; ``beta`` how fast the cutoff rises with speed."""

    min_cutoff: float = 1.5
    beta: float = 0.3
    derivative_cutoff: float = 1.0


def _alpha(cutoff: float, dt: float) -> float:
    tau = 1.0 / (2.0 * math.pi * cutoff)
    return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
    """Filters a vector signal sample by sample; each element gets its own adaptive cutoff."""

    def __init__(self, config: OneEuroConfig) -> None:
        self.config = config
        self._value: np.ndarray | None = None
        self._derivative: np.ndarray | None = None
        self._time: float | None = None

    def reset(self) -> None:
        self._value = self._derivative = self._time = None

    def __call__(self, value: np.ndarray, timestamp: float) -> np.ndarray:
        value = np.asarray(value, dtype=np.float64)
        if self._value is None or self._time is None or timestamp <= self._time:
            self._value, self._derivative, self._time = value.copy(), np.zeros_like(value), timestamp
            return value
        dt = timestamp - self._time
        derivative = (value - self._value) / dt
        a_d = _alpha(self.config.derivative_cutoff, dt)
        self._derivative = a_d * derivative + (1 - a_d) * self._derivative
        cutoff = self.config.min_cutoff + self.config.beta * np.abs(self._derivative)
        tau = 1.0 / (2.0 * math.pi * cutoff)
        a = 1.0 / (1.0 + tau / dt)
        self._value = a * value + (1 - a) * self._value
        self._time = timestamp
        return self._value.copy()

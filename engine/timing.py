"""Timing GPU work: CUDA runs asynchronously, so a clock read is only meaningful after the device has finished."""

from __future__ import annotations

from collections.abc import Callable

import torch


def synchronizer(device: str | torch.device) -> Callable[[], None]:
    """A function that waits for ``device`` to finish its queued work (does nothing off CUDA)."""
    device = torch.device(device)
    if device.type != "cuda":
        return lambda: None
    return lambda: torch.cuda.synchronize(device)

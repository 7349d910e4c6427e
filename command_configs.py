"""What each command's ``--config FILE`` may hold: one tree of configuration dataclasses per command.

Each tree gathers the library's own configuration dataclasses under table names (``[tracker]``,
``[tracker.fit.priors]``, ``[smoothing]``, ...) with the command's defaults; ``engine.config`` reads a file
into it, checks it and writes it back. Command-line options that set a configuration value are applied over
the file through :data:`OPTION_KEYS`. ``run_stream.py config COMMAND`` prints a command's tree as TOML.

Run controls (input and output paths, ``--overwrite``, ``--threads``, ``--jobs``) stay on the command line:
a configuration says how a result is made, not where it goes.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from typing import Any

from engine.smoothing import SmoothingConfig
from engine.tracker import TrackerConfig
from offline.refine_job import RefineOptions
from offline.render_job import RenderOptions
from realtime.live import live_tracker_config
from realtime.outputs import PublisherOptions
from realtime.pipeline import LiveConfig
from realtime.recorder import RecorderOptions
from realtime.sources import SourceOptions

#: The device a command's tree starts from: CUDA when PyTorch sees a GPU, else the CPU (see run_stream._device).
AUTO_DEVICE = "auto"


def _tracker(**changes: Any) -> TrackerConfig:
    return replace(TrackerConfig(device=AUTO_DEVICE), **changes)


@dataclass
class TrackCommandConfig:
    """track and batch: tracking, the smoothing pass and (track --photometric, batch --refine) the refinement.

    ``smoothing.strength = 0`` keeps the per-frame fits.
    """

    tracker: TrackerConfig = field(default_factory=_tracker)
    smoothing: SmoothingConfig = field(default_factory=SmoothingConfig)
    refine: RefineOptions = field(default_factory=RefineOptions)


@dataclass
class RefineCommandConfig:
    """refine: the photometric refinement of a recorded session, and the landmark fit it starts from.

    ``n_shape``, ``n_exp`` and the field of view of ``[tracker]`` are the recorded session's.
    """

    tracker: TrackerConfig = field(default_factory=_tracker)
    refine: RefineOptions = field(default_factory=RefineOptions)


@dataclass
class LiveCommandConfig:
    """live: the tracker (with the One Euro output filter), the loop and its refiner, the source, the outputs and
    the recording (``--record``)."""

    tracker: TrackerConfig = field(default_factory=lambda: live_tracker_config(AUTO_DEVICE))
    live: LiveConfig = field(default_factory=LiveConfig)
    source: SourceOptions = field(default_factory=SourceOptions)
    publishers: PublisherOptions = field(default_factory=PublisherOptions)
    recorder: RecorderOptions = field(default_factory=RecorderOptions)


@dataclass
class ReplayCommandConfig:
    """replay: where the recorded messages are published again."""

    publishers: PublisherOptions = field(default_factory=PublisherOptions)


@dataclass
class RenderCommandConfig:
    """render: what is drawn and how the video is encoded."""

    render: RenderOptions = field(default_factory=RenderOptions)


@dataclass
class BenchCommandConfig:
    """bench: the tracker and smoothing that are measured."""

    tracker: TrackerConfig = field(default_factory=_tracker)
    smoothing: SmoothingConfig = field(default_factory=SmoothingConfig)


COMMAND_CONFIGS: dict[str, type] = {
    "track": TrackCommandConfig,
    "batch": TrackCommandConfig,
    "refine": RefineCommandConfig,
    "live": LiveCommandConfig,
    "replay": ReplayCommandConfig,
    "render": RenderCommandConfig,
    "bench": BenchCommandConfig,
}

#: Command-line options (argparse ``dest``) and the configuration keys they set, over the file. A command sets
#: only the keys its tree has.
OPTION_KEYS: dict[str, tuple[str, ...]] = {
    "device": ("tracker.device",),
    "fov": ("tracker.fov_deg",),
    "n_shape": ("tracker.n_shape",),
    "n_exp": ("tracker.n_exp",),
    # track: the refinement (--photometric) is smoothed as the tracking it starts from is.
    "smoothing": ("smoothing.strength", "refine.smoothing.strength"),
    "pose_smoothing": ("smoothing.pose_strength", "refine.smoothing.pose_strength"),
    "size": ("refine.photometric.size",),
    "iterations": ("refine.photometric.frame_iterations",),
    "window": ("refine.window",),
    "max_frames": ("live.max_frames",),
    "landmarks": ("live.include_landmarks", "render.landmarks"),
    "preview": ("live.preview",),
    "refine": ("live.refine",),  # live --refine (batch --refine is a run control)
    "open_timeout": ("source.open_timeout_s",),
    "reconnect_attempts": ("source.reconnect_attempts",),
    "style": ("render.style",),
}
#: What an option implies beside its own keys: a known field of view (--fov DEG) is not estimated.
OPTION_IMPLIES: dict[str, dict[str, Any]] = {"fov": {"tracker.fit_fov": False}}


def command_config(command: str, args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Any:
    """``command``'s configuration: its defaults, then ``args.config`` (a file), then the options given.

    ``extra`` holds overrides the command computes itself (dotted keys; None: not given).
    """
    from engine.config import resolve

    cls = COMMAND_CONFIGS[command]
    default = cls()
    overrides: dict[str, Any] = {}
    for dest, keys in OPTION_KEYS.items():
        value = getattr(args, dest, None)
        implied = OPTION_IMPLIES.get(dest, {}) if value is not None else {}
        for key, setting in [(key, value) for key in keys] + list(implied.items()):
            if setting is not None and _has_key(default, key):
                overrides[key] = setting
    overrides.update(extra or {})
    config = resolve(default, getattr(args, "config", None), overrides)
    if hasattr(config, "tracker"):  # resolved: the device the work runs on
        config = replace(config, tracker=replace(config.tracker, device=torch_device(config.tracker.device, args)))
    return config


def torch_device(requested: str, args: argparse.Namespace | None = None) -> str:
    """A checked device: ``auto`` is CUDA when PyTorch sees a GPU, else the CPU."""
    import torch

    from cli_checks import device
    from engine.errors import UserError

    try:
        device(requested)
    except argparse.ArgumentTypeError as error:
        source = getattr(args, "config", None) if getattr(args, "device", None) is None else "--device"
        raise UserError(f"{source or 'device'}: 'tracker.device' = {error}") from None
    if requested == AUTO_DEVICE:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def active_smoothing(smoothing: SmoothingConfig | None) -> SmoothingConfig | None:
    """None (the per-frame fits are the result) for no smoothing or ``strength = 0``."""
    return None if smoothing is None or smoothing.strength == 0 else smoothing


def _has_key(config: Any, dotted: str) -> bool:
    for name in dotted.split("."):
        if not hasattr(config, name):
            return False
        config = getattr(config, name)
    return True

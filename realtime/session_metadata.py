"""What a live recording's ``session.json`` says about how it was made: source, model, tracker and camera at the
start, and the calibrated identity and camera once the tracker has calibrated (written again on every new
identity)."""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.head_model import HeadModel
from engine.tracker import Tracker
from flame_client.messages import SCHEMA_VERSION
from realtime.sources import FrameSource


def camera_metadata(tracker: Tracker) -> dict[str, Any]:
    camera = tracker.rig.camera
    return {
        "image_size": [camera.width, camera.height],
        "fov_deg": tracker.fov_deg,  # vertical, as everywhere in flame-live
        "fov": tracker.fov_report(),  # where it comes from: given, estimated, or the default the frames left
        "intrinsics": camera.intrinsics().tolist(),
    }


def session_metadata(
    source: FrameSource, head: HeadModel, tracker: Tracker, config: dict[str, Any], landmarks_in_messages: bool
) -> dict[str, Any]:
    """The metadata a recording starts with; ``calibration`` stays None until :func:`calibration_metadata`.
    ``config`` is the resolved configuration the run tracks with, as ``live --config`` reads it."""
    return {
        "source": source.description,
        "source_fps": source.fps,
        "model": head.describe(),
        "tracker": {"n_shape": tracker.rig.layer.n_shape, "n_exp": tracker.rig.layer.n_exp, "device": tracker.config.device},
        "camera": camera_metadata(tracker),
        "fov_fixed": not tracker.config.fit_fov,
        "config": config,
        "calibration": None,
        "schema_version": SCHEMA_VERSION,
        "landmarks_in_messages": landmarks_in_messages,
    }


def calibration_metadata(tracker: Tracker, shape: np.ndarray, t_capture: float | None) -> dict[str, Any]:
    """The update for a calibrated identity `shape` (the tracker's, as published) first used at `t_capture`."""
    calibration = {"shape_version": tracker.shape_version, "shape": shape.tolist(), "t_capture": t_capture}
    return {"calibration": calibration, "camera": camera_metadata(tracker)}

"""The software versions a result was made with, recorded in meta.json and session.json."""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform

import av
import cv2
import numpy as np
import torch


def software_versions() -> dict[str, str]:
    """flame-live and the libraries whose versions can change a result (fits, decoding, landmarks)."""
    try:
        flame_live = importlib.metadata.version("flame-live")
    except importlib.metadata.PackageNotFoundError:
        flame_live = "unknown (not installed)"
    versions = {
        "flame-live": flame_live,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "opencv": cv2.__version__,
        "av": av.__version__,
        "libavcodec": ".".join(map(str, av.library_versions["libavcodec"])),
    }
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        versions["mediapipe"] = importlib.metadata.version("mediapipe")
    return versions

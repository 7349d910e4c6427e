"""Which head model a command uses: ``--flame DIR``, ``--flame demo``, or the default.

The default is FLAME when the models folder holds a FLAME model, else the demo head (with a log line, so
nobody mistakes the demo head for FLAME).
"""

from __future__ import annotations

import logging
from pathlib import Path

from engine.head_model import HeadModel
from engine.model_files import FLAME_2023_OPEN, FLAME_MODEL, find_face_landmarker, find_spec_file

log = logging.getLogger(__name__)

DEMO = "demo"


def select_head_model(flame: str | None, models_dir: Path, n_tex: int | None = 0, tracking: bool = True) -> HeadModel:
    """Load the model a command asked for. ``n_tex=0`` skips texture spaces (only refinement needs them).

    ``tracking``: the command fits landmarks, so a FLAME folder without a usable landmark embedding is refused
    here, before any work (exports only pose the mesh and need none).
    """
    no_flame = find_spec_file(models_dir, FLAME_MODEL) is None and find_spec_file(models_dir, FLAME_2023_OPEN) is None
    if flame == DEMO or (flame is None and no_flame):
        from engine.demo_head import build_demo_head

        if flame is None:
            log.info("no FLAME model in %s: using the demo head (pass --flame DIR to use FLAME)", models_dir)
        return build_demo_head(find_face_landmarker(models_dir))
    from engine.assets import load_flame, require_tracking_landmarks

    model = load_flame(flame if flame is not None else models_dir, n_tex=n_tex)
    if tracking:
        require_tracking_landmarks(model)
    return model

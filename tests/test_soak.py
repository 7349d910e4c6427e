"""``bench --soak``: a short run of the live loop on a repeating clip, every frame delivered, memory measured."""

from __future__ import annotations

import math
from pathlib import Path

from realtime.bench import run_soak

GRID_CLIP = "bbaf2n.mpg"  # 75 frames (3 s): the soak repeats it


def test_a_short_soak_delivers_every_frame_and_measures_memory(shared_clips: Path, landmarker_task: Path) -> None:
    report = run_soak(shared_clips / GRID_CLIP, seconds=8.0, models_dir=landmarker_task.parent)
    assert report["frames_processed"] > 75, "the clip must play more than once"
    assert report["frames_received"] == report["frames_processed"] and report["rejected"] == 0
    assert report["rss_end_mb"] > 0 and math.isfinite(report["rss_growth_after_warm_up_mb"])

"""``bench --soak`` and ``bench --live``'s memory check: the live loop on a repeating clip, every frame delivered,
memory measured (this process and MediaPipe's)."""

from __future__ import annotations

import math
from pathlib import Path

from engine.landmarks import LandmarkerConfig
from realtime.bench import child_pids, resident_mb, resident_with_children_mb, run_memory_check, run_soak
from realtime.detection_process import DetectionProcess

GRID_CLIP = "bbaf2n.mpg"  # 75 frames (3 s): the soak repeats it


def test_a_short_soak_delivers_every_frame_and_measures_memory(shared_clips: Path, landmarker_task: Path) -> None:
    report = run_soak(shared_clips / GRID_CLIP, seconds=12.0, models_dir=landmarker_task.parent)
    assert report["frames_processed"] > 75, "the clip must play more than once"
    assert report["frames_received"] == report["frames_processed"] and report["rejected"] == 0
    assert report["rss_end_mb"] > 0 and math.isfinite(report["rss_growth_after_warm_up_mb"])


def test_the_memory_check_counts_mediapipes_process_and_reports_growth_per_10k_frames(
    shared_clips: Path, landmarker_task: Path
) -> None:
    report = run_memory_check(shared_clips / GRID_CLIP, frames=300, models_dir=landmarker_task.parent)
    assert report["frames_processed"] == 300 and not report["paced"], "flat out, the clip repeated until 300 frames"
    # Flat out, a busy machine may let the subscriber's own queue overflow by a frame or two.
    assert report["frames_received"] >= 290 and report["rejected"] == 0 and report["publisher_dropped"] == 0
    assert math.isfinite(report["rss_growth_per_10k_frames_mb"]) and report["frames_after_warm_up"] > 0


def test_resident_memory_includes_the_detection_process(landmarker_task: Path) -> None:
    alone = resident_with_children_mb()
    with DetectionProcess(LandmarkerConfig(landmarker_task), (64, 64)) as process:
        worker = resident_mb(process.pid)
        assert process.pid in child_pids() and worker > 10, "MediaPipe's process holds its model"
        assert resident_with_children_mb() >= alone + worker * 0.9
    assert process.pid not in child_pids()

"""``bench --clip``'s per-frame solve against MediaPipe, run as ``track`` runs them, on a real clip."""

from __future__ import annotations

import math
from pathlib import Path

from engine.benchmark import bench_solve_against_mediapipe
from engine.model_selection import select_head_model
from engine.tracker import TrackerConfig
from offline.track_job import detect_landmarks


def test_solve_is_timed_beside_mediapipe_on_every_frame_of_the_clip(shared_clips: Path, landmarker_task: Path) -> None:
    clip = shared_clips / "bbaf2n.mpg"
    sequence, _ = detect_landmarks(str(clip), landmarker_task, max_frames=24, progress=False)
    head = select_head_model("demo", landmarker_task.parent)
    report = bench_solve_against_mediapipe(head, str(clip), landmarker_task, sequence.mp478, sequence.image_size, sequence.fps, TrackerConfig(), 24)
    assert report["frames"] == 24
    assert report["numpy_valid_fraction"] == 1.0 and report["torch_valid_fraction"] == 1.0
    assert report["numpy_iterations_mean"] >= 1
    assert report["mediapipe_median_ms"] > 0 and report["numpy_solver_median_ms"] > 0
    assert math.isclose(report["numpy_over_mediapipe"], report["numpy_solver_median_ms"] / report["mediapipe_median_ms"])
    assert math.isclose(report["torch_over_numpy"], report["torch_solver_median_ms"] / report["numpy_solver_median_ms"])

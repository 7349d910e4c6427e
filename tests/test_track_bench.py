"""``bench --track``: the offline job against MediaPipe alone on a real clip, and the frame-file write costs."""

from __future__ import annotations

import math
from pathlib import Path

from engine.model_selection import select_head_model
from offline.track_bench import bench_track


def test_bench_track_reports_the_job_beside_mediapipe_alone(shared_clips: Path, landmarker_task: Path) -> None:
    report = bench_track(shared_clips / "bbaf2n.mpg", select_head_model("demo", landmarker_task.parent), landmarker_task)
    assert report["frames"] == 75
    assert report["track_fps"] > 0 and report["mediapipe_alone_fps"] > 0
    assert math.isclose(report["track_over_mediapipe_alone"], report["track_fps"] / report["mediapipe_alone_fps"])
    # The whole MediaPipe job counts its start-up, so it is slower than its detections alone.
    assert 0 < report["mediapipe_alone_job_fps"] < report["mediapipe_alone_fps"]
    assert math.isclose(report["track_over_mediapipe_alone_job"], report["track_fps"] / report["mediapipe_alone_job_fps"])
    assert report["track_cpu_ms_per_frame"] > 0 and report["mediapipe_alone_cpu_ms_per_frame"] > 0
    assert report["track_mediapipe_ms_per_frame"] > 0
    assert {"sampled_survey_s", "calibration_s", "first_detection_s", "stream_s", "tracking_s", "smoothing_s", "frame_files_s"} <= set(report["stages_s"])
    writes = report["frame_writes"]
    assert all(value > 0 for value in writes.values()) and set(writes) == {"atomic_fsync_each_ms", "as_track_writes_them_ms"}

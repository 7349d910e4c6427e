"""``bench --track VIDEO``: the offline ``track`` job against MediaPipe alone on the same frames, its stages, and
what writing the frame files costs: each durably on its own (an fsync apiece) against how ``track`` writes them
(:func:`offline.frame_files.write_npz_files`: atomic, one sync of the file system for all)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine.atomic import write_npz_atomic
from engine.head_model import HeadModel
from offline.frame_files import write_npz_files
from offline.track_job import TrackOptions, frame_path, track_input
from realtime.bench import cpu_seconds, mediapipe_alone_benchmark

WRITE_SAMPLES = 100


def bench_track(video: str | Path, head: HeadModel, landmarker_task: Path) -> dict[str, Any]:
    """Track every frame of ``video`` into a temporary folder, timing the whole job, between two runs of
    MediaPipe alone over the same frames (their mean is the reference, timed both from its first frame and as a
    whole job from its start); then time frame-file writes there."""
    before = mediapipe_alone_benchmark(video, landmarker_task.parent, max_frames=1 << 30, frame_size=None)
    with tempfile.TemporaryDirectory(prefix="flame-live-bench-") as folder:
        out_dir = Path(folder) / "track"
        started, cpu_started = time.perf_counter(), cpu_seconds()
        result = track_input(video, out_dir, head, landmarker_task, TrackOptions(progress=False))
        seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
        writes = _bench_frame_writes(Path(folder), result.results[len(result.results) // 2])
    after = mediapipe_alone_benchmark(video, landmarker_task.parent, max_frames=1 << 30, frame_size=None)
    alone_fps = (before["fps"] + after["fps"]) / 2
    alone_job_fps = (before["job_fps"] + after["job_fps"]) / 2
    frames = len(result.results)
    return {
        "video": str(video),
        "frames": frames,
        # Detection only, from the first frame handed over: MediaPipe's start-up left out, though track's counts.
        "mediapipe_alone_fps": alone_fps,
        "mediapipe_alone_fps_before_after": [before["fps"], after["fps"]],
        # The whole job on both sides, start-up included: what a user timing each from its start sees.
        "mediapipe_alone_job_fps": alone_job_fps,
        "track_seconds": seconds,
        "track_fps": frames / seconds,
        "track_over_mediapipe_alone": frames / seconds / alone_fps,
        "track_over_mediapipe_alone_job": frames / seconds / alone_job_fps,
        # CPU per frame: MediaPipe's process alone, against the whole job (its MediaPipe processes, decoding included).
        "mediapipe_alone_cpu_ms_per_frame": (before["cpu_ms_per_frame"] + after["cpu_ms_per_frame"]) / 2,
        "track_cpu_ms_per_frame": cpu * 1e3 / frames,
        "track_mediapipe_ms_per_frame": result.timings["mediapipe_ms_per_frame"],
        "stages_s": {key: value for key, value in result.timings.items() if key.endswith("_s")},
        "frame_writes": writes,
    }


def _bench_frame_writes(folder: Path, arrays: dict[str, np.ndarray]) -> dict[str, float]:
    """Milliseconds per frame file: atomic with its own fsync, one after another; and as ``track`` writes them
    (:func:`offline.frame_files.write_npz_files`: atomic without fsync, one after another, then one sync of the
    file system)."""
    durable = []
    for index in range(WRITE_SAMPLES):
        started = time.perf_counter()
        write_npz_atomic(frame_path(folder, index), arrays)
        durable.append(time.perf_counter() - started)
    started = time.perf_counter()
    write_npz_files(folder, ((frame_path(folder, WRITE_SAMPLES + index), arrays) for index in range(WRITE_SAMPLES)))
    batched = (time.perf_counter() - started) / WRITE_SAMPLES
    return {"atomic_fsync_each_ms": float(np.median(durable) * 1e3), "as_track_writes_them_ms": batched * 1e3}

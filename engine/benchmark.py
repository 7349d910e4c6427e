"""Speed measurements of the engine, reported as medians and ratios measured in one run.

Every function warms up first, times each repetition separately, and returns plain numbers (milliseconds
unless a key says otherwise) so that the command line can print them and store them as JSON.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from dataclasses import replace

import numpy as np
import torch

from engine.flame import FlameLayer
from engine.head_model import HeadModel
from engine.timing import synchronizer
from engine.tracker import Tracker, TrackerConfig, diversity_feature, select_diverse


def _timed(function: Callable[[], object], repeats: int, warmup: int = 5, sync: Callable[[], None] = lambda: None) -> np.ndarray:
    for _ in range(warmup):
        function()
    sync()
    samples = np.empty(repeats)
    for index in range(repeats):
        started = time.perf_counter()
        function()
        sync()
        samples[index] = (time.perf_counter() - started) * 1e3
    return samples


def summary(samples_ms: np.ndarray) -> dict[str, float]:
    return {"median_ms": float(np.median(samples_ms)), "p95_ms": float(np.percentile(samples_ms, 95))}


def bench_flame_layer(head: HeadModel, device: str = "cpu", n_shape: int = 100, n_exp: int = 50, repeats: int = 200) -> dict[str, float]:
    """Landmark-only against dense forward of the FLAME layer, batch 1."""
    layer = FlameLayer(head, n_shape, n_exp, device=device)
    params = layer.zero_params(1)
    generator = torch.Generator(device="cpu").manual_seed(0)
    params["exp"] = torch.randn(params["exp"].shape, generator=generator).to(device)
    params["pose"] = (0.2 * torch.randn(params["pose"].shape, generator=generator)).to(device)
    sync = synchronizer(device)
    with torch.no_grad():
        landmarks = _timed(lambda: layer.landmarks(**params), repeats, sync=sync)
        dense = _timed(lambda: layer.vertices(**params), repeats, sync=sync)
    return {
        "landmarks_median_ms": float(np.median(landmarks)),
        "dense_median_ms": float(np.median(dense)),
        "dense_over_landmarks": float(np.median(dense) / np.median(landmarks)),
        "vertices": head.n_vertices,
    }


def bench_tracking(
    head: HeadModel,
    mp478: np.ndarray | None,
    lmk68: np.ndarray | None,
    image_size: tuple[int, int],
    fps: float,
    config: TrackerConfig,
) -> dict[str, float]:
    """Per-frame tracking with and without warm start, and calibration, on one landmark sequence."""
    frames = (mp478 if mp478 is not None else lmk68).shape[0]

    def frame(index: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        return (None if mp478 is None else mp478[index], None if lmk68 is None else lmk68[index])

    sync = synchronizer(config.device)
    survey = Tracker(head, image_size, replace(config, calibration_seconds=float("inf")))
    features, usable = [], []
    for index in range(frames):
        result = survey.track(*frame(index), timestamp=index / fps)
        if result.valid:
            usable.append(index)
            features.append(diversity_feature(result.pose, result.exp))
    if not usable:
        raise ValueError("no frame of the benchmark sequence could be tracked")
    chosen = [usable[i] for i in select_diverse(features, config.calibration_frames)]

    calibration_ms = []
    for _ in range(3):
        tracker = Tracker(head, image_size, config)
        started = time.perf_counter()
        tracker.calibrate([frame(i) for i in chosen])
        sync()
        calibration_ms.append((time.perf_counter() - started) * 1e3)

    def run(tracker: Tracker) -> tuple[np.ndarray, float, float]:
        samples, iterations, valid = np.empty(frames), 0, 0
        for index in range(frames):
            started = time.perf_counter()
            result = tracker.track(*frame(index), timestamp=index / fps)
            sync()
            samples[index] = (time.perf_counter() - started) * 1e3
            iterations += result.iterations
            valid += result.valid
        return samples, iterations / frames, valid / frames

    warm_tracker = Tracker(head, image_size, config)
    warm_tracker.calibrate([frame(i) for i in chosen])
    run(warm_tracker)  # warm-up pass: first-call allocations stay out of the numbers
    warm, warm_iterations, warm_valid = run(warm_tracker)
    cold_tracker = Tracker(head, image_size, replace(config, warm_start="none"))
    cold_tracker.calibrate([frame(i) for i in chosen])
    cold, cold_iterations, cold_valid = run(cold_tracker)
    return {
        "frames": frames,
        "warm_median_ms": float(np.median(warm)),
        "warm_p95_ms": float(np.percentile(warm, 95)),
        "warm_fps": float(1e3 * frames / warm.sum()),
        "warm_iterations": warm_iterations,
        "warm_valid_fraction": warm_valid,
        "cold_median_ms": float(np.median(cold)),
        "cold_p95_ms": float(np.percentile(cold, 95)),
        "cold_iterations": cold_iterations,
        "cold_valid_fraction": cold_valid,
        "cold_over_warm": float(np.median(cold) / np.median(warm)),
        "calibration_median_ms": float(np.median(calibration_ms)),
        "calibration_frames": len(chosen),
    }


def bench_threads(
    head: HeadModel, mp478: np.ndarray | None, lmk68: np.ndarray | None, image_size: tuple[int, int], fps: float, used: int,
    frames: int = 60,
) -> dict[str, object]:
    """Tracking and calibration on the CPU (the first ``frames`` frames) with one PyTorch thread and with one
    per core: the evidence for the thread count the commands use (``used``, restored afterwards)."""
    mp478, lmk68 = (None if a is None else a[:frames] for a in (mp478, lmk68))
    cores = os.cpu_count() or 1
    report: dict[str, object] = {"used": used, "cores": cores}
    try:
        for threads in sorted({1, cores}):
            torch.set_num_threads(threads)
            figures = bench_tracking(head, mp478, lmk68, image_size, fps, TrackerConfig(device="cpu"))
            report[f"warm_median_ms_threads_{threads}"] = figures["warm_median_ms"]
            report[f"calibration_median_ms_threads_{threads}"] = figures["calibration_median_ms"]
    finally:
        torch.set_num_threads(used)
    return report


def bench_solve_against_mediapipe(
    head: HeadModel, video: str, task: Path, mp478: np.ndarray, image_size: tuple[int, int], fps: float, config: TrackerConfig, frames: int
) -> dict[str, float]:
    """Warm per-frame tracking with the NumPy and the PyTorch solver (on ``config.device``) against MediaPipe,
    as ``track`` runs them (:func:`offline.track_job.iter_detections`): frames decoded on a thread, detected
    by MediaPipe in its own process a few frames ahead, and each fitted here as its landmarks come back.
    Between two fits this process decodes, copies and waits, so the solver starts each frame with the caches
    that the product leaves it, not the warm ones of tracking frame after frame (``tracking_clip``).

    One pass per solver over the same frames, each fitting the landmarks detected in its pass; both trackers
    share one calibration, made on ``mp478`` (the clip's landmarks). Times: wall and CPU of ``track()`` in
    this thread (not the decoding thread's beside it), and MediaPipe's own time per frame in its process.
    """
    from engine.landmarks import LandmarkerConfig
    from offline.track_job import iter_detections
    from realtime.detection_process import DetectionProcess

    frames = min(frames, len(mp478))
    usable = [i for i in range(frames) if np.isfinite(mp478[i]).all()]
    chosen = usable[:: max(1, len(usable) // config.calibration_frames)][: config.calibration_frames]
    calibrated = Tracker(head, image_size, replace(config, calibration_seconds=float("inf")))
    calibrated.calibrate([(mp478[i], None) for i in chosen])
    sync = synchronizer(config.device)
    passes: dict[str, dict[str, list[float]]] = {}
    outcomes: dict[str, list[tuple[bool, int]]] = {}
    for solver in ("numpy", "torch"):
        tracker = Tracker(head, image_size, replace(config, frame_solver=solver, calibration_seconds=float("inf")))
        tracker.adopt_calibration(calibrated.rig.shape, calibrated.rig.camera.focal)
        times: dict[str, list[float]] = {"mediapipe": [], "solver": [], "solver_cpu": []}
        outcomes[solver] = []
        with DetectionProcess(LandmarkerConfig(task, running_mode="video"), image_size) as detector:
            for index, points, mediapipe_ms in iter_detections(video, detector, image_size, fps, "video", frames):
                started, started_cpu = time.perf_counter(), time.thread_time()
                result = tracker.track(points, timestamp=index / fps)
                sync()
                times["solver"].append(time.perf_counter() - started)
                times["solver_cpu"].append(time.thread_time() - started_cpu)
                times["mediapipe"].append(mediapipe_ms / 1e3)
                outcomes[solver].append((result.valid, result.iterations))
        tracker.close()
        passes[solver] = times
    warm = slice(min(10, frames // 4), None)  # the first frames build tables and start cold
    median = {(solver, key): float(np.median(values[warm])) * 1e3 for solver, times in passes.items() for key, values in times.items()}
    mediapipe_ms = median["numpy", "mediapipe"]
    return {
        "frames": len(passes["numpy"]["solver"]),
        "mediapipe_median_ms": mediapipe_ms,
        "numpy_solver_median_ms": median["numpy", "solver"],
        "numpy_solver_cpu_median_ms": median["numpy", "solver_cpu"],
        "torch_solver_median_ms": median["torch", "solver"],
        "numpy_over_mediapipe": median["numpy", "solver"] / mediapipe_ms,
        "torch_over_mediapipe": median["torch", "solver"] / median["torch", "mediapipe"],
        # What the medians are of: frames tracked (not held after a loss) and LM iterations per frame.
        "numpy_valid_fraction": float(np.mean([valid for valid, _ in outcomes["numpy"][warm]])),
        "numpy_iterations_mean": float(np.mean([iterations for _, iterations in outcomes["numpy"][warm]])),
        "torch_valid_fraction": float(np.mean([valid for valid, _ in outcomes["torch"][warm]])),
        "torch_over_numpy": median["torch", "solver"] / median["numpy", "solver"],
    }

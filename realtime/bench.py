"""The live loop measured: its speed on a clip (``bench --live``) and a long run (``bench --soak SECONDS``).

Speed: :func:`run_live_benchmark` runs ``live`` on a file (paced at the file's rate, or as fast as possible)
and :func:`mediapipe_alone_benchmark` times MediaPipe alone on the same frames, in its own process as in the
loop: the rate the loop could reach.

Soak: the loop runs as ``live`` does (capture thread, MediaPipe's process, tracker, ZeroMQ publisher) while a
real subscriber on 127.0.0.1 receives and validates every message, and the resident memory of this process and
of MediaPipe's is sampled. Memory is judged after a warm-up (models, caches and buffers reach their size in the
first minute), by the growth from there to the end and by the slope of a straight line through the samples, in
MB per hour and in MB per 10,000 frames. ``bench --live`` runs the same loop flat out on the repeated clip for a
number of frames (:func:`run_memory_check`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import resource
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import UserError
from engine.landmarks import LandmarkerConfig
from engine.model_files import find_face_landmarker, resolve_models_dir
from flame_client import Subscriber
from flame_client.messages import TOPIC_FRAME
from realtime.detection import IN_FLIGHT
from realtime.detection_process import Detection, DetectionProcess
from realtime.live import LiveOptions, live_tracker_config, run_live
from realtime.outputs import PublisherOptions
from realtime.pipeline import LiveConfig
from realtime.sources import SourceOptions, iter_frames

log = logging.getLogger(__name__)

#: Soak memory samples before this share of the run (at most WARM_UP_MAX_S) are warm-up and not judged.
WARM_UP_FRACTION = 0.2
WARM_UP_MAX_S = 120.0
SAMPLE_INTERVAL_S = 0.5
#: Frames left out of MediaPipe alone's slowest-over-median figure, as ``LiveConfig.warmup_frames`` are in the loop's.
WARM_UP_FRAMES = LiveConfig().warmup_frames


def run_live_benchmark(
    source: str | Path,
    flame: str | None = "demo",
    models_dir: Path | None = None,
    device: str = "cpu",
    max_frames: int = 300,
    frame_size: tuple[int, int] | None = (640, 480),
    realtime: bool = True,
    preview: bool = False,
) -> dict[str, Any]:
    """End-to-end speed of the live loop on a file: fps, capture->publish latency, MediaPipe and tracker ms.

    Frames are resized to `frame_size` (640x480 by default, a typical webcam) and published on a ZeroMQ
    socket on a free local port. With realtime=True the file plays at its own rate, as a camera would, so
    fps is capped by the file's rate and slow frames show up as drops; realtime=False measures throughput.
    """
    options = LiveOptions(
        source=str(source),
        realtime=realtime,
        flame=flame,
        models_dir=models_dir,
        tracker=live_tracker_config(device),
        publishers=PublisherOptions(zmq="tcp://127.0.0.1:*"),
        loop=LiveConfig(max_frames=max_frames, frame_size=frame_size, show_status=False, preview=preview),
    )
    summary = run_live(options)
    return {
        "source": str(source),
        "frame_size": list(frame_size) if frame_size else None,
        "realtime": realtime,
        "preview": preview,
        "device": device,
        "torch_threads": 1,
        **asdict(summary),
        "frame_max_over_median": summary.frame_max_ms / summary.frame_median_ms if summary.frame_median_ms else float("nan"),
        # The slowest frame that a background calibration overlapped, and the slowest of the others.
        "frame_max_over_median_during_calibration": (
            summary.frame_max_during_calibration_ms / summary.frame_median_ms if summary.frame_median_ms else float("nan")
        ),
        "frame_max_over_median_outside_calibration": (
            summary.frame_max_outside_calibration_ms / summary.frame_median_ms if summary.frame_median_ms else float("nan")
        ),
        "fitting_cpu_max_over_median": (
            summary.fitting_cpu_max_ms / summary.fitting_cpu_median_ms if summary.fitting_cpu_median_ms else float("nan")
        ),
    }


def mediapipe_alone_benchmark(
    source: str | Path, models_dir: Path | None = None, max_frames: int = 300, frame_size: tuple[int, int] | None = (640, 480)
) -> dict[str, float]:
    """MediaPipe alone on the frames the live benchmark sees, in the conditions of the loop: in a process of its
    own, fed through the same shared-memory ring, each frame resized into it the same way, with frames queued
    so that it never waits. Its rate is the one the live loop could reach if decoding, resizing, fitting and
    publishing cost nothing. Times are MediaPipe's own, measured in its process; ``fps`` is frames over the
    wall time from the first frame handed over to the last answer; ``job_fps`` is frames over the whole job
    as a user would time it, from starting MediaPipe's process (it loads MediaPipe and the model) to the last
    answer, as ``track``'s own rate counts its start-up; ``cpu_ms_per_frame`` is its process's CPU
    time (the loop's figure counts both processes); ``max_over_median`` is its slowest frame after the warm-up
    over its median, beside the loop's."""
    models_dir = resolve_models_dir(models_dir)
    frames = iter_frames(str(source))
    first = next(frames, None)
    if first is None:
        raise UserError(f"{source} holds no frame")
    width, height = frame_size or first.image.shape[1::-1]
    detections: list[Detection] = []
    job_started = time.perf_counter()
    with DetectionProcess(LandmarkerConfig(find_face_landmarker(models_dir)), (height, width)) as detector:
        cpu_started, started = detector.cpu_seconds(), time.perf_counter()
        for frame in itertools.chain([first], frames):
            if frame.index >= max_frames:
                break
            if detector.in_flight == IN_FLIGHT:
                detections.append(_collected(detector))
            detector.submit(frame.image, frame.index * 40, resize=True)  # VIDEO mode only needs rising timestamps
        while detector.in_flight:
            detections.append(_collected(detector))
        finished = time.perf_counter()
        elapsed, job_seconds = finished - started, finished - job_started
        cpu_ms_per_frame = (detector.cpu_seconds() - cpu_started) * 1e3 / max(len(detections), 1)
    frames.close()
    mediapipe_ms = np.array([detection.mediapipe_ms for detection in detections])
    warm = mediapipe_ms[WARM_UP_FRAMES:] if len(mediapipe_ms) > WARM_UP_FRAMES else mediapipe_ms
    idle_ms = sum(detection.idle_ms for detection in detections[WARM_UP_FRAMES:])
    return {
        "frames": len(detections), "median_ms": float(np.median(mediapipe_ms)), "fps": len(detections) / elapsed,
        "job_fps": len(detections) / job_seconds,
        "cpu_ms_per_frame": cpu_ms_per_frame, "max_over_median": float(warm.max() / np.median(warm)),
        "idle_share": idle_ms / (idle_ms + float(warm.sum())),
    }  # fmt: skip


def _collected(detector: DetectionProcess) -> Detection:
    detection = detector.collect()
    assert detection is not None  # collect without a timeout waits for the answer
    return detection


def cpu_seconds() -> float:
    """CPU time used so far by this process and by its child processes that have ended (MediaPipe's process
    counts once closed), user and system."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def resident_mb(pid: int | str = "self") -> float:
    """A process's resident memory (VmRSS), in MB; 0 for a process that has ended."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except FileNotFoundError:
        return 0.0
    return 0.0  # a zombie has no VmRSS line


def child_pids() -> list[int]:
    """This process's child processes (MediaPipe's among them while the live loop runs)."""
    children = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            children += [int(pid) for pid in (task / "children").read_text().split()]
    return children


def resident_with_children_mb() -> float:
    """Resident memory of this process and its child processes together, in MB."""
    return resident_mb() + sum(resident_mb(pid) for pid in child_pids())


@dataclass
class _Counter:
    received: int = 0
    rejected: int = 0
    reconnects: int = 0
    first_seq: int = -1
    last_seq: int = -1
    gaps: int = 0
    done: threading.Event = field(default_factory=threading.Event)


def _receive(address: str, counter: _Counter) -> None:
    with Subscriber(address, topics=[TOPIC_FRAME], timeout_s=None) as subscriber:
        while True:
            received = subscriber.receive(timeout_s=0.2)
            if received is None:
                if counter.done.is_set():  # stopped, and everything in flight has been read
                    break
                continue
            seq = received[1]["seq"]
            if counter.first_seq < 0:
                counter.first_seq = seq
            counter.gaps += int(counter.last_seq >= 0 and seq != counter.last_seq + 1)
            counter.last_seq = seq
            counter.received += 1
        counter.rejected, counter.reconnects = subscriber.rejected, subscriber.reconnects


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_soak(
    video: str | Path, seconds: float, flame: str | None = "demo", models_dir: Path | None = None, device: str = "cpu"
) -> dict[str, Any]:
    """Run the live loop on ``video`` (repeated, at its own rate) for ``seconds``; return delivery counts and
    memory figures."""
    return _run_repeated(video, flame, models_dir, device, seconds=seconds)


def run_memory_check(
    video: str | Path, frames: int, flame: str | None = "demo", models_dir: Path | None = None, device: str = "cpu",
    frame_size: tuple[int, int] | None = (640, 480),
) -> dict[str, Any]:
    """Run the live loop flat out on ``video`` (repeated, resized to ``frame_size`` as the speed runs are) for
    ``frames`` frames; return delivery counts and memory figures, among them the growth per 10,000 frames after
    the warm-up."""
    return _run_repeated(video, flame, models_dir, device, frames=frames, frame_size=frame_size)


def _run_repeated(
    video: str | Path, flame: str | None, models_dir: Path | None, device: str, seconds: float | None = None,
    frames: int | None = None, frame_size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The live loop on a repeating video with a subscriber: for ``seconds`` at the video's rate, or for
    ``frames`` frames as fast as possible; frames resized to ``frame_size`` (None: the video's own size)."""
    address = f"tcp://127.0.0.1:{_free_port()}"
    options = LiveOptions(
        source=str(video), realtime=frames is None, flame=flame, models_dir=models_dir, tracker=live_tracker_config(device),
        source_options=SourceOptions(repeat=True),
        subscriber_wait_s=10.0,
        publishers=PublisherOptions(zmq=address), loop=LiveConfig(show_status=False, max_frames=frames, frame_size=frame_size),
    )  # fmt: skip
    counter = _Counter()
    receiver = threading.Thread(target=_receive, args=(address, counter), name="soak subscriber", daemon=True)
    receiver.start()
    stop = threading.Event()
    outcome: dict[str, Any] = {}
    live = threading.Thread(target=lambda: outcome.update(summary=run_live(options, stop)), name="soak live loop")
    started = time.monotonic()
    live.start()
    samples: list[tuple[float, int, float]] = []  # (seconds, frames received, MB)
    while live.is_alive() and (seconds is None or time.monotonic() - started < seconds):
        if child_pids():  # MediaPipe's process is running: the loop has started and not yet closed
            samples.append((time.monotonic() - started, counter.received, resident_with_children_mb()))
        live.join(timeout=SAMPLE_INTERVAL_S)
    stop.set()
    live.join()
    counter.done.set()
    receiver.join(timeout=10)
    summary = outcome["summary"]
    duration = time.monotonic() - started
    warm_up = min(WARM_UP_MAX_S, WARM_UP_FRACTION * duration)
    judged = [sample for sample in samples if sample[0] >= warm_up] or samples[-1:]
    times, received, memory = (np.array(column, dtype=float) for column in zip(*judged, strict=True))
    enough = len(judged) >= 3 and np.ptp(received) > 0
    return {
        "video": str(video),
        "paced": frames is None,
        "seconds": round(duration, 1),
        "frames_processed": summary.frames,
        "frames_received": counter.received,
        "first_seq_received": counter.first_seq,
        "last_seq_received": counter.last_seq,
        "sequence_gaps": counter.gaps,
        "rejected": counter.rejected,
        "subscriber_reconnects": counter.reconnects,
        "capture_dropped": summary.dropped_frames,
        "publisher_dropped": summary.publisher_dropped,
        "fps": summary.fps,
        "rss_start_mb": samples[0][2] if samples else float("nan"),
        "rss_after_warm_up_mb": float(memory[0]),
        "rss_end_mb": float(memory[-1]),
        "rss_growth_after_warm_up_mb": float(memory[-1] - memory[0]),
        "rss_slope_mb_per_hour": float(np.polyfit(times, memory, 1)[0] * 3600.0) if enough else float("nan"),
        "rss_growth_per_10k_frames_mb": float(np.polyfit(received, memory, 1)[0] * 1e4) if enough else float("nan"),
        "frames_after_warm_up": int(received[-1] - received[0]),
        "frame_size": list(frame_size) if frame_size else None,
        "warm_up_s": round(warm_up, 1),
        "rss_includes": "this process and MediaPipe's",
    }

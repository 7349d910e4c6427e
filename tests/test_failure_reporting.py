"""Failures that used to look like success: a stream lost for good, a file cut short, a replay's first message.

Real clips from ../shared/data/clips, a real TCP stream server and real ZeroMQ sockets on 127.0.0.1.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from flame_client import Subscriber
from flame_client.messages import TOPIC_FRAME, frame_message
from realtime.publishers import ZmqPublisher
from realtime.recorder import SessionRecorder
from realtime.replay import replay_session
from realtime.session import SessionReader
from realtime.sources import iter_frames

REPO_ROOT = Path(__file__).resolve().parents[1]
GRID_CLIP = "bbaf2n.mpg"  # 75 frames, 360x288, MPEG-PS


# ----------------------------------------------------------------------------------------- a lost stream


def _serve_once(listener: socket.socket, data: bytes) -> None:
    """Send ``data`` to the first client, then close the connection and stop listening: the stream is gone."""
    connection, _ = listener.accept()
    with connection:
        connection.sendall(data)
    listener.close()


def test_live_ends_with_a_failure_status_when_the_stream_is_lost_for_good(
    shared_clips: Path, landmarker_task: Path
) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    server = threading.Thread(target=_serve_once, args=(listener, (shared_clips / GRID_CLIP).read_bytes()), daemon=True)
    server.start()
    command = [
        sys.executable, str(REPO_ROOT / "run_stream.py"), "live", "--flame", "demo", "--models", str(landmarker_task.parent),
        "--source", f"tcp://127.0.0.1:{port}", "--no-zmq", "--reconnect-attempts", "1",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    server.join(timeout=5)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "lost for good after 1 reconnect attempts" in result.stderr and "Traceback" not in result.stderr
    assert "processed" in result.stdout and "stopped early" in result.stdout


# ----------------------------------------------------------------------------------------- a file cut short


def _transcode(source: Path, target: Path, container_format: str) -> None:
    """The clip re-encoded as H.264 in the given container, frame times intact."""
    with av.open(str(source)) as clip, av.open(str(target), "w", format=container_format) as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 360, 288, "yuv420p"
        for index, frame in enumerate(clip.decode(video=0)):
            image = frame.reformat(format="yuv420p")
            image.pts, image.time_base = index, Fraction(1, 25)
            for packet in stream.encode(image):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.mark.parametrize("container_format,suffix", [("matroska", ".mkv"), ("mpegts", ".ts"), (None, ".mpg")])
def test_a_file_that_ends_early_is_reported_for_every_container(
    shared_clips: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, container_format: str | None, suffix: str
) -> None:
    whole = tmp_path / f"whole{suffix}"
    if container_format is None:
        whole.write_bytes((shared_clips / GRID_CLIP).read_bytes())
    else:
        _transcode(shared_clips / GRID_CLIP, whole, container_format)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.6)])
    with caplog.at_level(logging.WARNING, logger="realtime.sources"):
        assert sum(1 for _ in iter_frames(str(whole))) == 75
        assert not caplog.records, "a complete file must not be reported"
        read = sum(1 for _ in iter_frames(str(cut)))
    assert 0 < read < 75
    assert [r.getMessage() for r in caplog.records] == [
        caplog.records[0].getMessage()
    ] and f"the file ends early or is damaged after {read} frames" in caplog.records[0].getMessage()


# ----------------------------------------------------------------------------------------------- replay


def _session_with_frames(folder: Path, count: int) -> Path:
    with SessionRecorder(folder, None, None, {}) as recorder:
        for seq in range(count):
            message = frame_message(
                seq=seq, t_capture=time.time(), valid=True, exp=np.zeros(10), jaw_pose=np.zeros(3),
                eye_pose=np.zeros(6), neck_pose=np.zeros(3), head_rot=[np.pi, 0.0, 0.0], head_trans=[0, 0, 0.6],
                fov_deg=50.0, blendshapes=np.zeros(52),
            )  # fmt: skip
            recorder.write(None, TOPIC_FRAME, message)
    return folder


def _free_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def test_replay_loses_no_message_to_a_client_that_was_waiting(tmp_path: Path) -> None:
    reader = SessionReader(_session_with_frames(tmp_path / "session", 20))
    address = _free_address()
    with Subscriber(address, topics=[TOPIC_FRAME], timeout_s=2) as subscriber:  # started first, as users do
        with ZmqPublisher(address, send_hwm=1000) as publisher:
            summary = replay_session(reader, [publisher], speed=50.0)
            received = [message["seq"] for _topic, message in subscriber]
    assert received == list(range(20))
    assert summary.frames == 20 and summary.not_sent == 0 and not summary.unheard


def test_replay_says_when_no_client_was_listening(tmp_path: Path) -> None:
    reader = SessionReader(_session_with_frames(tmp_path / "session", 3))
    with ZmqPublisher(_free_address()) as publisher:
        summary = replay_session(reader, [publisher], speed=50.0, subscriber_wait_s=0.2)
    assert summary.unheard and "no ZeroMQ subscriber was connected" in summary.describe()


# ----------------------------------------------------------------------------------------- a 1x1 frame


def test_recording_a_1x1_source_names_the_real_cause(landmarker_task: Path, tmp_path: Path) -> None:
    import cv2

    cv2.imwrite(str(tmp_path / "one_pixel.png"), np.zeros((1, 1, 3), np.uint8))
    command = [
        sys.executable, str(REPO_ROOT / "run_stream.py"), "live", "--flame", "demo", "--models", str(landmarker_task.parent),
        "--source", str(tmp_path / "one_pixel.png"), "--no-zmq", "--record", str(tmp_path / "session"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: frames of 1x1 pixels are too small to record: the video needs at least 2x2; "
                      "record a camera or a video of a real size"]  # fmt: skip
    assert "Traceback" not in result.stderr and not (tmp_path / "session").exists()

"""Session recording and reading on real clips, real files and a real process killed with SIGKILL."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest

from engine.errors import UserError
from realtime.recorder import SessionRecorder
from realtime.session import MESSAGES_FILE, SESSION_FILE, VIDEO_FILE, SessionReader
from realtime.sources import Frame, iter_frames

REPO_ROOT = Path(__file__).resolve().parents[1]
GRID_CLIP = "bbaf2n.mpg"
FRAME_INTERVAL_S = 0.04


def clip_frames(shared_clips: Path, count: int) -> list[Frame]:
    """The clip's first frames, stamped as a 25 fps camera would stamp them."""
    start = time.time()
    frames = []
    for frame in iter_frames(str(shared_clips / GRID_CLIP)):
        if frame.index == count:
            break
        t_capture = start + frame.index * FRAME_INTERVAL_S
        frames.append(Frame(frame.image, frame.index, t_capture, frame.t_monotonic, frame.source_pts))
    return frames


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255**2 / mse)


def params_message(index: int) -> dict:
    return {"schema": 1, "frame": index, "expression": [index * 0.25, -1.5, float("nan")], "ok": True, "name": "ä"}


def test_recorded_session_reads_back_identical(shared_clips, tmp_path):
    frames = clip_frames(shared_clips, 20)
    written = []
    with SessionRecorder(tmp_path / "session", 25.0, (360, 288), {"camera": {"fov_deg": 60.0}}) as recorder:
        recorder.write(None, "status", {"state": "calibrating"})
        written.append(("status", {"state": "calibrating"}, None))
        for frame in frames:
            recorder.write(frame, "params", params_message(frame.index))
            written.append(("params", params_message(frame.index), frame))
            if frame.index % 5 == 0:  # a second topic about the same frame adds no video frame
                recorder.write(frame, "blendshapes", {"frame": frame.index, "weights": [0.1] * 52})
                written.append(("blendshapes", {"frame": frame.index, "weights": [0.1] * 52}, frame))
            if frame.index == 10:
                recorder.update_metadata({"calibration": {"shape": np.arange(3, dtype=np.float32)}})

    reader = SessionReader(tmp_path / "session")
    assert reader.closed_cleanly
    assert reader.metadata == {"camera": {"fov_deg": 60.0}, "calibration": {"shape": [0.0, 1.0, 2.0]}}
    assert reader.frame_size == (360, 288) and reader.fps == 25.0

    messages = list(reader.messages())
    assert len(messages) == len(written)
    for recorded, (topic, message, frame) in zip(messages, written):
        assert recorded.topic == topic
        assert json.dumps(recorded.message) == json.dumps(message), "NaN and unicode survive too"
        if frame is None:
            assert recorded.video_frame is None
        else:
            assert recorded.t_capture == frame.t_capture
            assert recorded.video_frame == frame.index

    video = list(reader.video_frames())
    assert [f.index for f in video] == list(range(len(frames)))
    for decoded, original in zip(video, frames):
        assert decoded.image.shape == original.image.shape
        assert psnr(decoded.image, original.image) > 35
        assert decoded.t_capture == pytest.approx(original.t_capture, abs=1e-3)


def test_session_without_video_and_with_odd_frame_size(tmp_path):
    with SessionRecorder(tmp_path / "no_video", None, None, {}) as recorder:
        recorder.write(None, "params", {"a": 1})
    reader = SessionReader(tmp_path / "no_video")
    assert [m.message for m in reader.messages()] == [{"a": 1}]
    assert not (tmp_path / "no_video" / VIDEO_FILE).exists()
    with pytest.raises(UserError, match="without video"):
        next(reader.video_frames())

    image = np.random.default_rng(0).integers(0, 255, (25, 33, 3), dtype=np.uint8)
    with SessionRecorder(tmp_path / "odd", 10.0, (33, 25), {}) as recorder:
        recorder.write(Frame(image, 0, time.time(), time.monotonic()), "params", {})
        with pytest.raises(UserError, match="frame 1 is 32x24 but the recording is 33x25"):
            recorder.write(Frame(image[:24, :32], 1, time.time(), time.monotonic()), "params", {})
    (decoded,) = SessionReader(tmp_path / "odd").video_frames()
    assert decoded.image.shape == (24, 32, 3), "4:2:0 video keeps the even part; pixel coordinates unchanged"

    with SessionRecorder(tmp_path / "no_frames", 10.0, (32, 24), {}) as recorder:
        recorder.write(None, "status", {"state": "no face"})
    assert list(SessionReader(tmp_path / "no_frames").video_frames()) == []


def test_existing_session_is_kept_unless_overwrite_is_asked(tmp_path):
    with SessionRecorder(tmp_path, None, None, {"take": 1}) as recorder:
        recorder.write(None, "params", {"a": 1})
    (tmp_path / "notes.txt").write_text("the user's own file")
    with pytest.raises(UserError, match="already holds a recorded session") as raised:
        SessionRecorder(tmp_path, None, None, {"take": 2})
    assert "\n" not in str(raised.value)
    with SessionRecorder(tmp_path, None, None, {"take": 2}, overwrite=True):
        pass
    reader = SessionReader(tmp_path)
    assert reader.metadata == {"take": 2} and list(reader.messages()) == []
    assert (tmp_path / "notes.txt").exists(), "overwriting removes only the session's own files"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames.msgpack", "notes.txt", "session.json"]


def test_truncated_last_record_is_skipped(tmp_path):
    with SessionRecorder(tmp_path, None, None, {}) as recorder:
        for index in range(5):
            recorder.write(None, "params", {"frame": index, "values": list(range(50))})
    messages_path = tmp_path / MESSAGES_FILE
    data = messages_path.read_bytes()
    messages_path.write_bytes(data[: len(data) - 40])
    assert [m.message["frame"] for m in SessionReader(tmp_path).messages()] == [0, 1, 2, 3]


def test_damaged_record_stops_reading_there(tmp_path):
    with SessionRecorder(tmp_path, None, None, {}) as recorder:
        recorder.write(None, "params", {"frame": 0})
    with (tmp_path / MESSAGES_FILE).open("ab") as stream:
        stream.write(msgpack.packb({"topic": 3}))
        stream.write(msgpack.packb({"t": 1.0, "tw": 1.0, "topic": "params", "v": None, "msg": {"frame": 2}}))
    assert [m.message for m in SessionReader(tmp_path).messages()] == [{"frame": 0}]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / SESSION_FILE).unlink(), "session.json is missing"),
        (lambda d: (d / MESSAGES_FILE).unlink(), "incomplete: frames.msgpack is missing"),
        (lambda d: (d / VIDEO_FILE).unlink(), "incomplete: video.mkv is missing"),
        (lambda d: (d / SESSION_FILE).write_text('{"format": "flame-live-sess'), "session.json is damaged"),
        (lambda d: (d / SESSION_FILE).write_text('{"format": "other"}'), "not a flame-live session file"),
        (
            lambda d: (d / SESSION_FILE).write_text('{"format": "flame-live-session", "format_version": 99}'),
            "update flame-live",
        ),
    ],
)
def test_incomplete_or_corrupt_session_raises_a_user_error(tmp_path, damage, message):
    with SessionRecorder(tmp_path, 25.0, (32, 24), {}) as recorder:
        recorder.write(Frame(np.zeros((24, 32, 3), np.uint8), 0, time.time(), time.monotonic()), "params", {})
    damage(tmp_path)
    with pytest.raises(UserError, match=message) as raised:
        SessionReader(tmp_path)
    assert "\n" not in str(raised.value)


def test_a_session_killed_before_its_video_file_existed_reads_as_holding_no_frame(tmp_path):
    """kill -9 between saving the first frame's time and the encoder creating video.mkv: not damage, no frame."""
    recorder = SessionRecorder(tmp_path, 25.0, (32, 24), {})
    recorder.write(Frame(np.zeros((24, 32, 3), np.uint8), 0, time.time(), time.monotonic()), "params", {"frame": 0})
    recorder.close()
    info = json.loads((tmp_path / SESSION_FILE).read_text())
    info["closed"] = False
    (tmp_path / SESSION_FILE).write_text(json.dumps(info))
    (tmp_path / VIDEO_FILE).unlink()
    reader = SessionReader(tmp_path)
    assert not reader.closed_cleanly and reader.info["video"]["t_origin"] is not None
    assert reader.video_frame_count() == 0 and list(reader.video_frames()) == []
    assert [m.message for m in reader.messages()] == [{"frame": 0}]


def test_missing_folder_raises_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        SessionReader(tmp_path / "nothing")


def test_iter_timed_reproduces_the_recorded_spacing(tmp_path):
    with SessionRecorder(tmp_path, None, None, {}) as recorder:
        for index in range(4):
            recorder.write(None, "params", {"frame": index})
            time.sleep(0.1)
    reader = SessionReader(tmp_path)
    recorded_span = list(reader.messages())[-1].t_written - list(reader.messages())[0].t_written

    started = time.monotonic()
    replayed = [m.message["frame"] for m in reader.iter_timed(speed=1.0)]
    assert replayed == [0, 1, 2, 3]
    assert time.monotonic() - started >= recorded_span * 0.99, "replay may not run ahead of the recording"
    assert [m.message["frame"] for m in reader.iter_timed(speed=math.inf)] == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        next(reader.iter_timed(speed=0))


RECORDING_SCRIPT = """
import sys
from realtime.recorder import SessionRecorder
from realtime.sources import open_source

clip, folder = sys.argv[1], sys.argv[2]
with open_source(clip, realtime=True) as source:
    with SessionRecorder(folder, source.fps, source.size, {"clip": clip}) as recorder:
        for frame in source.frames():
            recorder.write(frame, "params", {"frame": frame.index, "values": [frame.index * 0.5] * 10})
            print(frame.index, flush=True)
"""


def test_session_survives_kill_9_of_the_recording_process(shared_clips, tmp_path):
    folder = tmp_path / "session"
    process = subprocess.Popen(
        [sys.executable, "-c", RECORDING_SCRIPT, str(shared_clips / GRID_CLIP), str(folder)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    written_before_kill = []
    try:
        for line in process.stdout:  # 25 fps: 40 frames is 1.6 s into the recording
            written_before_kill.append(int(line))
            if len(written_before_kill) == 40:
                process.send_signal(signal.SIGKILL)
                break
    finally:
        process.kill()
        process.wait(10)
    assert process.returncode == -signal.SIGKILL
    assert len(written_before_kill) == 40, "the recording ended before it could be killed"

    reader = SessionReader(folder)
    assert not reader.closed_cleanly
    messages = list(reader.messages())
    frames_in_video = sum(1 for _ in reader.video_frames())
    one_second = 25
    assert len(messages) >= len(written_before_kill) - one_second
    assert frames_in_video >= len(written_before_kill) - one_second
    assert [m.message["frame"] for m in messages] == written_before_kill[: len(messages)]
    assert all(m.message["values"] == [m.message["frame"] * 0.5] * 10 for m in messages)
    assert [m.video_frame for m in messages] == list(range(len(messages)))

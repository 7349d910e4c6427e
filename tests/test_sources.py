"""Frame sources on real clips, real image files and real sockets on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from engine.cpu_priority import BACKGROUND_NICENESS
from engine.errors import UserError
from realtime.sources import (
    Frame,
    SourceLostError,
    SourceOptions,
    format_camera_list,
    iter_frames,
    list_cameras,
    open_source,
    read_ahead,
)

GRID_CLIP = "bbaf2n.mpg"
GIF_CLIP = "head-pose-face-detection-female.gif"
MP4_CLIP = "cap13_edit2.mp4"


def decode_with_pyav(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def count_with_pyav(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def make_frame(index: int) -> Frame:
    return Frame(np.full((2, 2, 3), index, np.uint8), index, time.time(), time.monotonic())


@pytest.mark.parametrize("clip", [GRID_CLIP, GIF_CLIP])
def test_offline_source_delivers_every_frame_in_order(shared_clips, clip):
    path = shared_clips / clip
    expected = decode_with_pyav(path)
    with open_source(str(path), realtime=False) as source:
        assert source.size == (expected[0].shape[1], expected[0].shape[0])
        assert source.fps and source.fps > 0
        frames = []
        for frame in source.frames():
            frames.append(frame)
            time.sleep(0.002)  # a consumer slower than decoding must still miss nothing
    assert [f.index for f in frames] == list(range(len(expected)))
    assert source.dropped == 0 and source.ended
    for frame, reference in zip(frames, expected):
        assert frame.image.dtype == np.uint8 and frame.image.shape == reference.shape
        np.testing.assert_array_equal(frame.image, reference)
    assert all(b.t_monotonic >= a.t_monotonic and b.t_capture >= a.t_capture for a, b in zip(frames, frames[1:]))
    assert all(b.source_pts > a.source_pts for a, b in zip(frames, frames[1:]))


def test_realtime_file_with_a_slow_consumer_drops_and_counts(shared_clips):
    path = shared_clips / GIF_CLIP
    total = count_with_pyav(path)
    with open_source(str(path), realtime=True) as source:
        received = []
        for frame in source.frames():
            received.append(frame)
            time.sleep(0.2)  # 5 frames/s against the GIF's 12.5
    indices = [f.index for f in received]
    assert source.dropped > 0
    assert len(received) + source.dropped == total, "every frame is either handed out or counted as dropped"
    assert indices == sorted(set(indices))
    assert indices[-1] == total - 1, "after the end the consumer gets the newest frame, the clip's last"
    assert all(b.t_monotonic > a.t_monotonic and b.t_capture > a.t_capture for a, b in zip(received, received[1:]))


def test_iter_frames_matches_pyav(shared_clips):
    path = shared_clips / GRID_CLIP
    frames = list(iter_frames(str(path)))
    assert len(frames) == count_with_pyav(path)
    assert [f.index for f in frames] == list(range(len(frames)))


def test_stop_ends_a_playing_source_promptly(shared_clips):
    source = open_source(str(shared_clips / MP4_CLIP), realtime=True).start()
    assert source.slot.get(timeout=5) is not None
    source.stop()
    assert source.ended


def write_numbered_pngs(folder: Path, count: int) -> None:
    folder.mkdir()
    for number in range(1, count + 1):
        bgr = np.zeros((24, 32, 3), np.uint8)
        bgr[..., 2] = 255  # red in OpenCV's BGR order
        bgr[..., 1] = number
        assert cv2.imwrite(str(folder / f"frame{number}.png"), bgr)
    (folder / "notes.txt").write_text("not an image")


def test_image_folder_plays_in_natural_order_as_rgb(tmp_path):
    folder = tmp_path / "images"
    write_numbered_pngs(folder, 12)
    frames = list(iter_frames(str(folder)))
    assert [int(f.image[0, 0, 1]) for f in frames] == list(range(1, 13)), "frame10 sorts after frame9"
    assert all((f.image[..., 0] == 255).all() and (f.image[..., 2] == 0).all() for f in frames), "RGB order"
    with open_source(str(folder), realtime=False) as source:
        assert source.size == (32, 24)
        assert len(list(source.frames())) == 12


def test_read_ahead_gives_the_same_frames_then_the_reading_error(tmp_path):
    folder = tmp_path / "images"
    write_numbered_pngs(folder, 12)
    for background in (False, True):  # in the background it decodes in bursts of 5: two, then 2 left over
        ahead = [f.image[0, 0, 1] for f in read_ahead(iter_frames(str(folder)), depth=10, background=background)]
        assert ahead == list(range(1, 13))

        def failing():
            yield from iter_frames(str(folder))
            raise OSError("disk gone")

        seen = []
        with pytest.raises(OSError, match="disk gone"):
            for frame in read_ahead(failing(), depth=10, background=background):
                seen.append(frame.index)
        assert seen == list(range(12)), "the frames before the error arrive first, a burst's last ones too"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="threads have their own nice value on Linux only")
def test_read_ahead_in_the_background_decodes_at_a_lower_priority(tmp_path):
    folder = tmp_path / "images"
    write_numbered_pngs(folder, 3)
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def frames_with(priorities):  # run by the reading thread: notes its priority at each frame
        for frame in iter_frames(str(folder)):
            priorities.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
            yield frame

    background: list[int] = []
    foreground: list[int] = []
    assert len(list(read_ahead(frames_with(background), background=True))) == 3
    assert len(list(read_ahead(frames_with(foreground)))) == 3
    assert background == [min(own + BACKGROUND_NICENESS, 19)] * 3 and foreground == [own] * 3
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own, "the caller's thread keeps its priority"


def test_single_image_is_a_one_frame_source(tmp_path):
    folder = tmp_path / "images"
    write_numbered_pngs(folder, 1)
    (frame,) = iter_frames(str(folder / "frame1.png"))
    assert frame.image.shape == (24, 32, 3)


@pytest.mark.parametrize(
    ("make_spec", "message"),
    [
        (lambda tmp: (tmp / "fake.mp4").write_text("hello") and str(tmp / "fake.mp4"), "not a readable video"),
        (lambda tmp: str(tmp / "missing.mp4"), "not found"),
        (lambda tmp: (tmp / "empty").mkdir() or str(tmp / "empty"), "holds no images"),
        (lambda tmp: (tmp / "broken.png").write_bytes(b"\x89PNG junk") and str(tmp / "broken.png"), "read as an image"),
        (lambda tmp: "7", "camera 7 could not be opened; list cameras with --list-cameras"),
    ],
)
def test_bad_sources_raise_one_line_user_errors(tmp_path, make_spec, message):
    spec = make_spec(tmp_path)
    if spec == "7" and any(camera.index == 7 for camera in list_cameras(8)):
        pytest.skip("this machine has a camera 7")
    with pytest.raises(UserError, match=message) as raised:
        open_source(spec)
    assert "\n" not in str(raised.value)


def test_camera_listing_says_so_when_there_is_none():
    cameras = list_cameras()
    text = format_camera_list(cameras)
    if not cameras:
        assert text == "no working camera found (tried indices 0 to 9)"
    else:
        assert text.startswith(f"camera {cameras[0].index}: ")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_rtsp_fails_with_a_user_error():
    with pytest.raises(UserError, match="could not open stream") as raised:
        open_source(f"rtsp://127.0.0.1:{free_port()}/x", options=SourceOptions(open_timeout_s=1.0))
    assert "\n" not in str(raised.value)


def test_silent_rtsp_server_times_out_with_a_user_error():
    # A listening socket that never answers: the kernel accepts the connection, nobody replies.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"rtsp://user:secret@127.0.0.1:{silent.getsockname()[1]}/x"
        started = time.monotonic()
        with pytest.raises(UserError, match=r"no video from rtsp://\*\*\*@127\.0\.0\.1:\d+/x within 1 s") as raised:
            open_source(url, options=SourceOptions(open_timeout_s=1.0))
    assert time.monotonic() - started < 10, "the open timeout must bound the wait"
    assert "secret" not in str(raised.value), "credentials stay out of messages"


def remux_to_mpegts(source: Path, destination: Path) -> None:
    with av.open(str(source)) as reader, av.open(str(destination), "w", format="mpegts") as writer:
        video_in = reader.streams.video[0]
        video_out = writer.add_stream_from_template(video_in)
        for packet in reader.demux(video_in):
            if packet.dts is None:  # the demuxer's final flush packet
                continue
            packet.stream = video_out
            writer.mux(packet)


class OneClientStreamServer:
    """Serves a byte stream over TCP on 127.0.0.1 to one client, then closes and stops listening."""

    def __init__(self, payload: bytes, port: int = 0) -> None:
        self._listener = socket.create_server(("127.0.0.1", port))
        self._listener.settimeout(10)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, args=(payload,), daemon=True)
        self._thread.start()

    def _serve(self, payload: bytes) -> None:
        try:
            connection, _ = self._listener.accept()
        except TimeoutError:
            return
        finally:
            self._listener.close()
        with connection:
            chunk = 188 * 7
            for offset in range(0, len(payload), chunk):
                connection.sendall(payload[offset : offset + chunk])
                time.sleep(0.001)  # a live stream trickles in

    def join(self) -> None:
        self._thread.join(10)


def collect_live_frames(source) -> list[Frame]:
    with source:
        return list(source.frames())


def collect_until_lost(source) -> tuple[list[Frame], str | None]:
    """The frames of a live source until it ends, and why it was lost (None when it simply ended)."""
    frames: list[Frame] = []
    with source:
        try:
            frames.extend(source.frames())
        except SourceLostError as error:
            return frames, str(error)
    return frames, None


def test_network_stream_reconnects_after_the_server_stops_then_ends(shared_clips, tmp_path, caplog):
    clip_ts = tmp_path / "clip.ts"
    remux_to_mpegts(shared_clips / GRID_CLIP, clip_ts)
    payload = clip_ts.read_bytes()
    first_part = payload[: len(payload) // 2]
    (tmp_path / "first_part.ts").write_bytes(first_part)
    expected_total = count_with_pyav(tmp_path / "first_part.ts") + count_with_pyav(clip_ts)

    caplog.set_level(logging.INFO, logger="realtime.sources")
    first_server = OneClientStreamServer(first_part)
    options = SourceOptions(reconnect_attempts=4, reconnect_initial_delay_s=0.1, reconnect_max_delay_s=0.4)
    source = open_source(f"tcp://127.0.0.1:{first_server.port}", options=options)
    result: list[tuple[list[Frame], str | None]] = []
    consumer = threading.Thread(target=lambda: result.append(collect_until_lost(source)))
    consumer.start()

    # The server is gone mid-clip; once a reconnect attempt has failed, bring it back with the whole clip.
    first_server.join()
    deadline = time.monotonic() + 10
    while not any("reconnect attempt 1 failed" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "no reconnect attempt was made"
        time.sleep(0.02)
    second_server = OneClientStreamServer(payload, port=first_server.port)
    consumer.join(20)
    second_server.join()

    assert not consumer.is_alive(), "the source must end after its bounded reconnect attempts"
    frames, lost = result[0]
    assert len(frames) + source.dropped == expected_total
    assert [f.index for f in frames] == sorted({f.index for f in frames})
    restarts = sum(1 for a, b in zip(frames, frames[1:]) if b.source_pts < a.source_pts)
    assert restarts == 1, "the second connection starts the clip again"
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.endswith("reconnected") for m in messages)
    assert lost is not None and "lost for good after 4 reconnect attempts" in lost
    assert source.ended


@pytest.mark.parametrize("clip", [GRID_CLIP, MP4_CLIP])
def test_truncated_file_plays_what_is_readable_then_ends(shared_clips, tmp_path, clip):
    original = shared_clips / clip
    truncated = tmp_path / f"truncated{original.suffix}"
    data = original.read_bytes()
    truncated.write_bytes(data[: int(len(data) * 0.6)])
    full_count = count_with_pyav(original)

    with open_source(str(truncated), realtime=False) as source:
        indices = [f.index for f in source.frames()]
    assert 0.3 * full_count < len(indices) < full_count
    assert indices == list(range(len(indices)))
    assert source.ended


def test_a_repeated_file_plays_again_with_its_clock_running_on(shared_clips):
    frames = []
    for frame in iter_frames(str(shared_clips / GRID_CLIP), SourceOptions(repeat=True)):
        frames.append(frame)
        if len(frames) == 160:  # the clip has 75 frames: two passes and a bit
            break
    times = [frame.source_pts for frame in frames]
    assert all(b > a for a, b in zip(times, times[1:])), "time must not jump back when the file starts again"
    np.testing.assert_array_equal(frames[75].image, frames[0].image)

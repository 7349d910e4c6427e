"""Session recording: the input video and every published message, streamed to disk and crash-safe.

write() only packs the message and queues it; a writer thread encodes and writes, so the live loop does
not wait for the disk or the encoder. The queue holds at most `max_pending_s` of frames (write() blocks
beyond that), and each file reaches the operating system at least every `flush_interval_s`, so a
`kill -9` loses under a second. The video is Matroska in short clusters (an MP4 without its closing
index is unreadable), encoded without look-ahead so each frame leaves the encoder at once.
See realtime/session.py for the layout and for reading a session back.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import msgpack
import numpy as np

from engine.atomic import write_json_atomic
from engine.errors import UserError
from engine.versions import software_versions
from realtime.session import (
    MESSAGE_RECORD_FIELDS,
    MESSAGES_FILE,
    SESSION_FILE,
    SESSION_FORMAT,
    SESSION_FORMAT_VERSION,
    VIDEO_FILE,
    VIDEO_TIME_BASE,
)
from realtime.sources import Frame

log = logging.getLogger(__name__)

_STOP = object()


@dataclass(frozen=True)
class RecorderOptions:
    codec: str = "libx264"
    codec_options: dict[str, str] = field(
        # ultrafast keeps encoding cheap beside the tracker; zerolatency drops the look-ahead that would
        # hold frames in the encoder (and lose them in a crash).
        default_factory=lambda: {"preset": "ultrafast", "tune": "zerolatency", "crf": "18"}
    )
    cluster_ms: int = 200
    """Matroska cluster length: a crash loses at most the cluster being written."""
    max_pending_s: float = 0.5
    flush_interval_s: float = 0.5


def _prepare_directory(directory: Path, overwrite: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise UserError(f"cannot record into {directory}: it is a file; give a folder")
    if (directory / SESSION_FILE).exists():
        if not overwrite:
            raise UserError(f"{directory} already holds a recorded session; choose another folder or allow overwriting")
        # Only our own files go: the folder may hold other things of the user's.
        for name in (SESSION_FILE, MESSAGES_FILE, VIDEO_FILE):
            (directory / name).unlink(missing_ok=True)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the recording folder {directory} ({error.strerror})") from None


#: H.264 in 4:2:0 needs even sides, and the odd last row or column is cut: 2 pixels is the least that remains.
_MIN_VIDEO_SIDE = 2


class _VideoWriter:
    """H.264 in Matroska with millisecond timestamps, so a variable camera rate is kept as it was."""

    def __init__(self, path: Path, fps: float, frame_size: tuple[int, int], options: RecorderOptions) -> None:
        width, height = frame_size
        # 4:2:0 chroma needs even sides; the odd last row or column is cut, so pixel coordinates stay valid.
        self.size = (width - width % 2, height - height % 2)
        if not av.codecs_available & {options.codec}:
            raise UserError(f"this PyAV build has no {options.codec} encoder; reinstall PyAV from its official wheels")
        self._container = av.open(
            str(path),
            "w",
            format="matroska",
            container_options={"flush_packets": "1", "cluster_time_limit": str(options.cluster_ms)},
        )
        rate = Fraction(fps).limit_denominator(1001) if fps > 0 else Fraction(30)
        self._stream = self._container.add_stream(options.codec, rate=rate, options=dict(options.codec_options))
        self._stream.width, self._stream.height = self.size
        self._stream.pix_fmt = "yuv420p"
        self._stream.codec_context.time_base = VIDEO_TIME_BASE

    def write(self, image: np.ndarray, pts: int) -> None:
        width, height = self.size
        if image.shape[1] != width or image.shape[0] != height:
            image = np.ascontiguousarray(image[:height, :width])
        video_frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        video_frame.pts = pts
        video_frame.time_base = VIDEO_TIME_BASE
        self._container.mux(self._stream.encode(video_frame))

    def close(self) -> None:
        try:
            self._container.mux(self._stream.encode(None))
        finally:
            self._container.close()


class SessionRecorder:
    """Records a session into a folder; see the module docstring for its guarantees.

    The recorder keeps a reference to each frame's image until it is written: do not modify images in place.
    """

    def __init__(
        self,
        directory: str | Path,
        fps: float | None,
        frame_size: tuple[int, int] | None,
        metadata: dict[str, Any],
        *,
        overwrite: bool = False,
        options: RecorderOptions | None = None,
    ) -> None:
        """frame_size is the input's (width, height); None records messages only, without video."""
        self.directory = Path(directory)
        self._options = options or RecorderOptions()
        if frame_size is not None and min(frame_size) < _MIN_VIDEO_SIDE:
            raise UserError(
                f"frames of {frame_size[0]}x{frame_size[1]} pixels are too small to record: the video needs at "
                f"least {_MIN_VIDEO_SIDE}x{_MIN_VIDEO_SIDE}; record a camera or a video of a real size"
            )
        _prepare_directory(self.directory, overwrite)
        fps = fps or 30.0
        self._frame_size = frame_size
        self._video = (
            _VideoWriter(self.directory / VIDEO_FILE, fps, frame_size, self._options) if frame_size else None
        )
        self._info: dict[str, Any] = {
            "format": SESSION_FORMAT,
            "format_version": SESSION_FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "closed": False,
            "video": None,
            "messages": {"file": MESSAGES_FILE, "encoding": "msgpack", "record": MESSAGE_RECORD_FIELDS},
            "software": software_versions(),
            "metadata": dict(metadata),
        }
        if self._video is not None:
            self._info["video"] = {
                "file": VIDEO_FILE,
                "codec": self._options.codec,
                "width": self._video.size[0],
                "height": self._video.size[1],
                "fps": fps,
                "time_base": str(VIDEO_TIME_BASE),
                "t_origin": None,  # capture time of the first frame, set when it comes
            }
        self._info_lock = threading.Lock()
        self._save_info()
        self._messages_file = (self.directory / MESSAGES_FILE).open("wb")

        self._last_frame_key: tuple[int, float] | None = None
        self._video_frames = 0
        self._last_pts = -1
        self._message_count = 0
        self._closed = False
        self._failure: BaseException | None = None
        self._pending: queue.Queue = queue.Queue(maxsize=max(2, round(fps * self._options.max_pending_s)))
        self._writer = threading.Thread(target=self._write_pending, name="session recorder", daemon=True)
        self._writer.start()

    def write(self, frame: Frame | None, topic: str, message: dict[str, Any]) -> None:
        """Record a published message and, the first time it is seen, the frame it describes.

        message must be msgpack-able (plain dicts, lists, numbers, strings); a frame of another size
        than the recording's raises UserError. frame=None records a message that describes no frame.
        """
        self._raise_failure()
        if self._closed:
            raise RuntimeError("the recorder is closed")
        t_written = time.time()
        image, pts, video_frame = None, 0, None
        if frame is not None and self._video is not None:
            frame_key = (frame.index, frame.t_capture)
            if frame_key != self._last_frame_key:
                image, pts = self._admit_frame(frame), self._next_pts(frame)
                self._last_frame_key = frame_key
                self._video_frames += 1
            video_frame = self._video_frames - 1
        record = msgpack.packb(
            {
                "t": frame.t_capture if frame is not None else t_written,
                "tw": t_written,
                "topic": topic,
                "v": video_frame,
                "msg": message,
            },
            use_bin_type=True,
        )
        self._message_count += 1
        self._pending.put((image, pts, record))

    def update_metadata(self, changes: dict[str, Any]) -> None:
        """Merge changes (a new calibration or identity, say) into the metadata and rewrite session.json."""
        with self._info_lock:
            self._info["metadata"].update(changes)
        self._save_info()

    def close(self) -> None:
        """Write what is queued, finish the files and mark the session closed."""
        if self._closed:
            return
        self._closed = True
        self._pending.put(_STOP)
        self._writer.join()
        try:
            if self._video is not None:
                self._video.close()
            self._messages_file.flush()
            os.fsync(self._messages_file.fileno())
        except (OSError, av.error.FFmpegError) as error:
            self._failure = self._failure or error
        finally:
            self._messages_file.close()
        with self._info_lock:
            self._info["closed"] = True
            self._info["messages"]["count"] = self._message_count
            if self._info["video"] is not None:
                self._info["video"]["frames"] = self._video_frames
        self._save_info()
        self._raise_failure()

    def __enter__(self) -> SessionRecorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _save_info(self) -> None:
        with self._info_lock:
            write_json_atomic(self.directory / SESSION_FILE, self._info)

    def _admit_frame(self, frame: Frame) -> np.ndarray:
        height, width = frame.image.shape[:2]
        if (width, height) != self._frame_size:
            expected_width, expected_height = self._frame_size
            raise UserError(
                f"frame {frame.index} is {width}x{height} but the recording is {expected_width}x{expected_height}; "
                "a recording needs frames of one size"
            )
        return frame.image

    def _next_pts(self, frame: Frame) -> int:
        video_info = self._info["video"]
        if video_info["t_origin"] is None:
            with self._info_lock:
                video_info["t_origin"] = frame.t_capture
            self._save_info()
        pts = round((frame.t_capture - video_info["t_origin"]) / VIDEO_TIME_BASE)
        # The encoder needs strictly increasing timestamps; two frames within a millisecond share none.
        self._last_pts = max(pts, self._last_pts + 1)
        return self._last_pts

    def _write_pending(self) -> None:
        last_flush = time.monotonic()
        try:
            while (item := self._pending.get()) is not _STOP:
                image, pts, record = item
                if image is not None:
                    self._video.write(image, pts)
                self._messages_file.write(record)
                if self._pending.empty() or time.monotonic() - last_flush >= self._options.flush_interval_s:
                    self._messages_file.flush()
                    last_flush = time.monotonic()
        except Exception as error:  # a full disk, a failing encoder: reported by the next write() or close()
            self._failure = error
            # Keep taking items so that a write() blocked on the full queue returns and sees the failure.
            while self._pending.get() is not _STOP:
                pass

    def _raise_failure(self) -> None:
        if self._failure is None:
            return
        reason = getattr(self._failure, "strerror", None) or str(self._failure)
        raise UserError(f"recording into {self.directory} failed ({reason}); check the disk and the folder")

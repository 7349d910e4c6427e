"""A recorded session on disk: its layout, and reading it back (messages, timing, video).

A session folder holds three files:

- session.json: format version, video and message file descriptions, software versions, and the user
  metadata (calibration, camera, model). Replaced atomically whenever it changes.
- frames.msgpack: a stream of msgpack maps, one per published message, in publishing order:
  {"t": capture time (s since the epoch), "tw": time written (s since the epoch), "topic": str,
  "v": video frame number or None, "msg": the message exactly as published}.
- video.mkv: the input frames, H.264 in Matroska, timestamps in ms since video.t_origin.

The writer (realtime/recorder.py) keeps every file readable after a crash; the reader therefore
accepts a truncated last record or video cluster and reads everything before it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

import av
import msgpack

from engine.errors import UserError
from realtime.sources import Frame

log = logging.getLogger(__name__)

SESSION_FORMAT = "flame-live-session"
SESSION_FORMAT_VERSION = 1
SESSION_FILE = "session.json"
MESSAGES_FILE = "frames.msgpack"
VIDEO_FILE = "video.mkv"
VIDEO_TIME_BASE = Fraction(1, 1000)

MESSAGE_RECORD_FIELDS = {
    "t": "capture time of the frame the message describes, seconds since the epoch",
    "tw": "time the message was recorded, seconds since the epoch",
    "topic": "the topic the message was published on",
    "v": "number of the video frame the message describes, or null",
    "msg": "the message exactly as published",
}


class RecordedMessage(NamedTuple):
    topic: str
    message: dict[str, Any]
    t_capture: float
    video_frame: int | None
    t_written: float


def _is_valid_record(record: object) -> bool:
    return (
        isinstance(record, dict)
        and isinstance(record.get("t"), int | float)
        and isinstance(record.get("tw"), int | float)
        and isinstance(record.get("topic"), str)
        and isinstance(record.get("msg"), dict)
        and (record.get("v") is None or isinstance(record.get("v"), int))
    )


class SessionReader:
    """Reads a session folder written by SessionRecorder, including one cut short by a crash."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise UserError(f"recording folder {self.directory} does not exist")
        session_path = self.directory / SESSION_FILE
        if not session_path.is_file():
            raise UserError(f"{self.directory} is not a recorded session: {SESSION_FILE} is missing")
        try:
            self.info: dict[str, Any] = json.loads(session_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise UserError(f"{session_path} is damaged ({error}); the session cannot be read") from None
        if not isinstance(self.info, dict) or self.info.get("format") != SESSION_FORMAT:
            raise UserError(f"{session_path} is not a flame-live session file")
        version = self.info.get("format_version")
        if not isinstance(version, int) or version > SESSION_FORMAT_VERSION:
            raise UserError(
                f"{session_path} has session format {version!r}, newer than this flame-live reads "
                f"({SESSION_FORMAT_VERSION}); update flame-live"
            )
        self.messages_path = self.directory / MESSAGES_FILE
        if not self.messages_path.is_file():
            raise UserError(f"session {self.directory} is incomplete: {MESSAGES_FILE} is missing")
        self.video_path = self.directory / VIDEO_FILE if self.info.get("video") else None
        self._video_frame_count: int | None = None
        if not self.closed_cleanly:
            log.info("%s was not closed (the recorder was interrupted); reading what was saved", self.directory)
        elif self._has_video_frames and not self.video_path.is_file():
            raise UserError(f"session {self.directory} is incomplete: {VIDEO_FILE} is missing")

    @property
    def metadata(self) -> dict[str, Any]:
        """What the recorder was given: calibration, camera, model, and so on."""
        return self.info.get("metadata", {})

    @property
    def _has_video_frames(self) -> bool:
        # The encoder creates its file with the first frame, whose capture time becomes the video's origin.
        return self.video_path is not None and self.info["video"].get("t_origin") is not None

    @property
    def closed_cleanly(self) -> bool:
        return bool(self.info.get("closed"))

    @property
    def fps(self) -> float | None:
        video = self.info.get("video") or {}
        return video.get("fps")

    @property
    def frame_size(self) -> tuple[int, int] | None:
        """(width, height) of the recorded video, or None for a session without video."""
        video = self.info.get("video")
        return (video["width"], video["height"]) if video else None

    def messages(self) -> Iterator[RecordedMessage]:
        """Every complete message record, in the order it was published."""
        count = 0
        with self.messages_path.open("rb") as stream:
            unpacker = msgpack.Unpacker(stream, raw=False)
            try:
                for record in unpacker:
                    if not _is_valid_record(record):
                        log.warning("%s: record %d is damaged; reading stops there", self.messages_path, count)
                        return
                    count += 1
                    yield RecordedMessage(record["topic"], record["msg"], record["t"], record["v"], record["tw"])
            except (msgpack.UnpackException, ValueError) as error:
                log.warning("%s: record %d is damaged (%s); reading stops there", self.messages_path, count, error)
                return
            if unpacker.tell() < self.messages_path.stat().st_size:
                log.info("%s: ignored an incomplete last record (the recording was cut short)", self.messages_path)

    def tracking_messages(self) -> Iterator[RecordedMessage]:
        """The recorded ``flame.frame`` and ``flame.shape`` messages, each validated against the wire schema
        (as returned by ``flame_client.validate``); UserError at the first invalid one."""
        from flame_client.messages import TOPIC_FRAME, TOPIC_SHAPE, MessageError, validate

        for record in self.messages():
            if record.topic not in (TOPIC_FRAME, TOPIC_SHAPE):
                continue
            try:
                message = validate(record.topic, record.message)
            except MessageError as error:
                raise UserError(f"{self.directory}: a recorded message is invalid ({error})") from None
            yield record._replace(message=message)

    def iter_timed(self, speed: float = 1.0) -> Iterator[RecordedMessage]:
        """The messages, each handed out when it was originally recorded (scaled by 1/speed).

        speed=2 replays twice as fast; speed=math.inf does not wait at all.
        """
        if not speed > 0:
            raise ValueError(f"speed must be positive, not {speed}")
        start: tuple[float, float] | None = None
        for record in self.messages():
            if start is None:
                start = (time.monotonic(), record.t_written)
            elif not math.isinf(speed):
                due = start[0] + (record.t_written - start[1]) / speed
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            yield record

    def video_frame_count(self) -> int:
        """How many frames the video really holds: every frame that decodes (0 for a session without video).

        An interrupted recording's messages can refer to a few frames more, which the encoder still buffered
        when the process died; :meth:`frames_with_video` leaves those out.
        """
        if self._video_frame_count is None:
            self._video_frame_count = 0
            if self.video_path is not None:
                for _ in self.video_frames():
                    self._video_frame_count += 1
        return self._video_frame_count

    def frames_with_video(self, by_frame: dict[int, Any]) -> dict[int, Any]:
        """``by_frame`` (video frame number -> anything) without the frames the video does not hold; says how
        many were left out, since only an interrupted recording has such frames."""
        held = self.video_frame_count()
        missing = sorted(index for index in by_frame if index >= held)
        if missing:
            log.warning(
                "%s: %d recorded frame(s) (%d to %d) have no video, the recording was cut short: skipped",
                self.directory, len(missing), missing[0], missing[-1],
            )
        return {index: value for index, value in by_frame.items() if index < held}

    def video_frames(self) -> Iterator[Frame]:
        """The recorded input frames (RGB), numbered as in the messages' `video_frame`.

        t_capture is the original capture time (to the millisecond); t_monotonic and source_pts are
        seconds since the first recorded frame.
        """
        if self.video_path is None:
            raise UserError(f"session {self.directory} was recorded without video")
        if not self._has_video_frames or not self.video_path.is_file() or self.video_path.stat().st_size == 0:
            # No frame was recorded, or the recorder was interrupted before the encoder created its file (the
            # first frame's time is saved first) or wrote a frame.
            return
        t_origin = self.info["video"]["t_origin"]
        try:
            container = av.open(str(self.video_path))
        except av.error.FFmpegError as error:
            if not self.closed_cleanly:  # killed before the encoder wrote the first cluster
                log.warning("%s holds no readable frame: the recording was cut short (%s)", self.video_path, error.strerror)
                return
            raise UserError(
                f"{self.video_path} cannot be read ({error.strerror}); the recorded video is damaged"
            ) from None
        with container:
            index = 0
            try:
                for video_frame in container.decode(video=0):
                    seconds = float(video_frame.time)
                    image = video_frame.to_ndarray(format="rgb24")
                    yield Frame(image, index, t_origin + seconds, seconds, seconds)
                    index += 1
            except av.error.FFmpegError as error:
                log.warning("%s: stopped after %d frames, the rest is unreadable (%s)", self.video_path, index, error)

"""Frame sources: webcams, network streams, video files and image folders, each frame stamped on capture.

A `FrameSource` runs one capture thread that hands frames to a one-frame slot (`realtime.handoff`). In live
use the capture thread never waits for the consumer: a newer frame replaces an untaken one, and the slot
counts the replaced frames as dropped, so nothing queues and the engine always works on the newest image.
For offline work (`realtime=False` on a file or folder) the hand-off blocks instead, so that every frame
arrives in order. `iter_frames` reads a source in the calling thread, without a capture thread.

Images are RGB (MediaPipe's order), HxWx3 uint8.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import av
import cv2
import numpy as np

from engine.cpu_priority import lower_thread_priority
from engine.errors import UserError
from realtime.handoff import DropOldestQueue

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"})
_URL_PATTERN = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@]+@")
_STOP_TIMEOUT_S = 10.0

class SourceLostError(UserError):
    """A camera or stream that was delivering frames stopped for good (reconnecting did not bring it back)."""


RawFrame = tuple[np.ndarray, float | None]
"""An RGB image and its presentation time in the source (seconds), when the source has one."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One captured image and when it was captured."""

    image: np.ndarray
    """HxWx3 uint8, RGB."""
    index: int
    """Frame number in the source, counting frames that were dropped."""
    t_capture: float
    """Wall-clock seconds (time.time()) when the frame was captured, comparable across machines."""
    t_monotonic: float
    """time.monotonic() at capture, for measuring latency within this process."""
    source_pts: float | None = None
    """Presentation time in the source's own clock (seconds), when the source has one."""


@dataclass(frozen=True)
class SourceOptions:
    """How sources open, pace and recover. The defaults suit a live webcam or IP camera."""

    open_timeout_s: float = 5.0
    read_timeout_s: float = 5.0
    reconnect_attempts: int = 5
    """How many times a network stream is reopened after it drops, before the source ends."""
    reconnect_initial_delay_s: float = 0.5
    reconnect_max_delay_s: float = 8.0
    image_fps: float = 10.0
    """Pace of an image folder in realtime mode (images carry no timing of their own)."""
    camera_resolution: tuple[int, int] | None = None
    """(width, height) to request from a webcam; None keeps the camera's default."""
    stream_options: dict[str, str] = field(default_factory=dict)
    """FFmpeg options for network streams, e.g. {"rtsp_transport": "tcp"}."""
    repeat: bool = False
    """Play a video file again from its start whenever it ends, with time running on (long soak runs)."""


class _Reader(Protocol):
    """One kind of source, opened: it knows its size and rate and yields raw frames."""

    description: str
    fps: float | None
    size: tuple[int, int]
    live: bool
    """True when the world sets the pace (camera, network); False for files, which we pace ourselves."""

    def frames(self, stop: threading.Event) -> Iterator[RawFrame]: ...

    def close(self) -> None: ...


class FrameSource:
    """A source with its capture thread. Use as a context manager, or call start() and stop()."""

    def __init__(self, reader: _Reader, realtime: bool = True) -> None:
        self._reader = reader
        # Live sources cannot wait for the consumer: the camera or server keeps sending, so waiting
        # would only serve ever staler frames. Only files and folders can deliver every frame.
        self.delivers_every_frame = not realtime and not reader.live
        self.slot: DropOldestQueue[Frame] = DropOldestQueue(1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reader_closed = False

    @property
    def description(self) -> str:
        return self._reader.description

    @property
    def fps(self) -> float | None:
        """The source's nominal frame rate, when it declares one."""
        return self._reader.fps

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the frames."""
        return self._reader.size

    @property
    def dropped(self) -> int:
        return self.slot.dropped

    def frame_time(self, frame: Frame) -> float:
        """Seconds on the clock `frame` was shot on: media time when every frame of a file is read (possibly
        faster than real time), else the capture clock."""
        if not self.delivers_every_frame:
            return frame.t_monotonic
        if frame.source_pts is not None:
            return frame.source_pts
        return frame.index / (self.fps or 25.0)

    @property
    def ended(self) -> bool:
        return self.slot.ended

    def start(self) -> FrameSource:
        if self._thread is not None:
            raise RuntimeError("the source is already started")
        self._thread = threading.Thread(target=self._capture, name=f"capture {self.description}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop capturing and release the device or file."""
        self._stop.set()
        self.slot.close()
        if self._thread is None:
            self._close_reader()
            return
        # A network read can block for up to its read timeout before the thread sees the stop.
        self._thread.join(timeout=_STOP_TIMEOUT_S)
        if self._thread.is_alive():
            log.warning("%s: the capture thread did not stop within %g s", self.description, _STOP_TIMEOUT_S)

    def frames(self) -> Iterator[Frame]:
        """The frames this consumer gets (the newest each time), until the stream ends."""
        while (frame := self.slot.get()) is not None:
            yield frame

    def __enter__(self) -> FrameSource:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _close_reader(self) -> None:
        if not self._reader_closed:
            self._reader_closed = True
            self._reader.close()

    def _capture(self) -> None:
        deliver: Callable[[Frame], bool] = self.slot.hand_over if self.delivers_every_frame else self.slot.offer
        pacer = None if self._reader.live or self.delivers_every_frame else _Pacer(self._reader.fps)
        raw_frames = self._reader.frames(self._stop)
        error: BaseException | None = None
        try:
            for index, (image, pts) in enumerate(raw_frames):
                if self._stop.wait(pacer.delay(index, pts) if pacer else 0.0):
                    break
                if not deliver(Frame(image, index, time.time(), time.monotonic(), pts)):
                    break
                if pacer:
                    if self._stop.wait(pacer.until_next_decode()):
                        break
                    pacer.decoding()
        except Exception as exc:  # handed to the consumer, whose next get() raises it
            error = exc
        finally:
            raw_frames.close()
            self._close_reader()
            self.slot.close(error)


class _Pacer:
    """Plays a file at its own rate: how long to wait before handing out each frame, and before decoding it.

    Like a camera, whose frames arrive decoded when they are due, the next frame is decoded shortly before it is
    due (half a frame interval, or twice the last frame's decoding time when that is longer), not as soon as the
    one before went out: decoding at once competed for the cores and the interpreter lock with the loop's work
    on that frame (measured on a busy machine, median of 300 paced frames: the loop took a frame from the slot
    0.3 to 0.4 ms after its capture and resized and submitted it in 0.6 to 0.85 ms; decoded shortly before,
    0.07 to 0.11 and 0.5 to 0.56 ms).
    """

    def __init__(self, fps: float | None) -> None:
        self._frame_interval = 1.0 / fps if fps else 0.0
        self._start: float | None = None
        self._first_pts: float | None = None
        self._last_due = 0.0
        self._decode_started: float | None = None
        self._decode_s = 0.0

    def delay(self, index: int, pts: float | None) -> float:
        """Seconds to wait before handing out frame ``index``, just decoded."""
        now = time.monotonic()
        if self._decode_started is not None:
            self._decode_s = now - self._decode_started
        if self._start is None:
            self._start, self._first_pts = now, pts
        if pts is not None and self._first_pts is not None:
            offset = pts - self._first_pts
        else:
            offset = index * self._frame_interval
        self._last_due = self._start + offset
        return max(0.0, self._last_due - now)

    def until_next_decode(self) -> float:
        """Seconds to wait, after handing out a frame, before decoding the next one."""
        lead = min(self._frame_interval, max(0.5 * self._frame_interval, 2.0 * self._decode_s))
        return max(0.0, self._last_due + self._frame_interval - lead - time.monotonic())

    def decoding(self) -> None:
        """The next frame's decoding starts now (its duration sets how early the one after is decoded)."""
        self._decode_started = time.monotonic()


def redact_url(url: str) -> str:
    """The URL without user name and password, for logs and messages."""
    return _URL_CREDENTIALS.sub("***@", url)


@contextlib.contextmanager
def _quiet_opencv() -> Iterator[None]:
    """OpenCV prints several warnings for every camera index it cannot open; the user needs none."""
    previous = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(previous)


class _CameraReader:
    live = True

    def __init__(self, index: int, resolution: tuple[int, int] | None) -> None:
        self.description = f"camera {index}"
        with _quiet_opencv():
            self._capture = cv2.VideoCapture(index)
            if not self._capture.isOpened():
                raise UserError(f"camera {index} could not be opened; list cameras with --list-cameras, or track a file with --source VIDEO")
            if resolution is not None:
                self._capture.set(cv2.CAP_PROP_FRAME_WIDTH, resolution[0])
                self._capture.set(cv2.CAP_PROP_FRAME_HEIGHT, resolution[1])
            # A one-frame driver buffer keeps the camera from serving stale frames.
            self._capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)
            ok, self._first_bgr = self._capture.read()
        if not ok:
            self._capture.release()
            raise UserError(
                f"camera {index} opened but gave no image (is another program using it?); "
                "list cameras with --list-cameras, or track a file with --source VIDEO"
            )
        height, width = self._first_bgr.shape[:2]
        self.size = (width, height)
        self.fps = self._capture.get(cv2.CAP_PROP_FPS) or None

    def frames(self, stop: threading.Event) -> Iterator[RawFrame]:
        bgr = self._first_bgr
        while not stop.is_set():
            yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), None
            ok, bgr = self._capture.read()
            if not ok:
                raise SourceLostError(
                    f"{self.description} stopped delivering images; is it unplugged or taken by another program?"
                )

    def close(self) -> None:
        self._capture.release()


def _open_video_container(
    path_or_url: str, options: dict[str, str], timeout: tuple[float, float] | None
) -> av.container.InputContainer:
    container = av.open(path_or_url, options=options, timeout=timeout)
    if not container.streams.video:
        container.close()
        raise UserError(f"{redact_url(path_or_url)} has no video stream; give a video, an image or a stream URL")
    return container


def _decode_rgb(container: av.container.InputContainer) -> Iterator[RawFrame]:
    for video_frame in container.decode(container.streams.video[0]):
        yield video_frame.to_ndarray(format="rgb24"), video_frame.time


def _video_geometry(container: av.container.InputContainer) -> tuple[tuple[int, int], float | None]:
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    return (stream.codec_context.width, stream.codec_context.height), (float(rate) if rate else None)


class _VideoFileReader:
    """A video or animated GIF on disk, decoded by PyAV (FFmpeg)."""

    live = False

    def __init__(self, path: Path, repeat: bool = False) -> None:
        self.description = str(path)
        self._repeat = repeat
        try:
            self._container = _open_video_container(str(path), {}, None)
        except av.error.FFmpegError as error:
            raise UserError(
                f"{path} is not a readable video ({error.strerror}); give a video file, an image or a folder of images"
            ) from None
        self.size, self.fps = _video_geometry(self._container)

    def frames(self, stop: threading.Event) -> Iterator[RawFrame]:
        offset = 0.0  # with repeat, each pass continues the clock of the one before
        while True:
            first: float | None = None
            end: float | None = None
            for image, pts in self._play_once():
                first = pts if first is None else first
                end = pts
                yield image, None if pts is None else pts + offset
            if not self._repeat or stop.is_set() or end is None or first is None:
                return
            offset += end - first + (1.0 / self.fps if self.fps else 0.04)
            self._container.close()
            self._container = _open_video_container(self.description, {}, None)

    def _play_once(self) -> Iterator[RawFrame]:
        count = 0
        last_time: float | None = None
        # Most containers (Matroska, MPEG-TS/PS) end a truncated file without an error: FFmpeg only says so in
        # its log, and Matroska's header still states the full duration. Both are checked at the end.
        previous_level = av.logging.get_level()
        av.logging.set_level(av.logging.ERROR)
        try:
            with av.logging.Capture(local=False) as ffmpeg_log:  # decoder threads log too
                for raw in _decode_rgb(self._container):
                    count += 1
                    last_time = raw[1]
                    yield raw
        except av.error.FFmpegError as error:
            # A truncated or damaged file: what was readable has been played; end there.
            log.warning("%s: stopped after %d frames, the rest is unreadable (%s)", self.description, count, error)
            return
        finally:
            av.logging.set_level(previous_level)
        reason = self._early_end(last_time, [message for level, _name, message in ffmpeg_log if level <= av.logging.ERROR])
        if reason:
            log.warning("%s: the file ends early or is damaged after %d frames (%s)", self.description, count, reason)

    def _early_end(self, last_time: float | None, ffmpeg_errors: list[str]) -> str | None:
        """Why the file looks cut short, or None: FFmpeg's first error, or frames ending before the duration."""
        if ffmpeg_errors:
            return f"FFmpeg: {ffmpeg_errors[0].strip()}"
        duration = self._container.duration / 1e6 if self._container.duration else None
        tolerance = max(0.1, 2.0 / self.fps) if self.fps else 0.1
        if duration is not None and last_time is not None and last_time + tolerance < duration:
            return f"the frames end at {last_time:.2f} s of the {duration:.2f} s the file announces"
        return None

    def close(self) -> None:
        self._container.close()


class _StreamReader:
    """A network stream (RTSP, HTTP, UDP, TCP...), reopened with exponential backoff when it drops."""

    live = True

    def __init__(self, url: str, options: SourceOptions) -> None:
        self._url = url
        self._options = options
        self.description = redact_url(url)
        self._container = self._open()
        self.size, self.fps = _video_geometry(self._container)

    def _open(self) -> av.container.InputContainer:
        timeout = (self._options.open_timeout_s, self._options.read_timeout_s)
        started = time.monotonic()
        try:
            return _open_video_container(self._url, dict(self._options.stream_options), timeout)
        except av.error.FFmpegError as error:
            # Protocols report the interrupt that enforces the timeout in their own words (RTSP: "invalid
            # data"), so the elapsed time is what tells a timeout apart.
            if isinstance(error, av.error.ExitError) or time.monotonic() - started >= self._options.open_timeout_s:
                raise UserError(
                    f"no video from {self.description} within {self._options.open_timeout_s:g} s; "
                    "check the address and that the stream is running, or raise the open timeout"
                ) from None
            raise UserError(
                f"could not open stream {self.description} ({error.strerror}); "
                "check the address and that the stream is running"
            ) from None

    def frames(self, stop: threading.Event) -> Iterator[RawFrame]:
        container = self._container
        failed_attempts = 0
        while not stop.is_set():
            if container is not None:
                try:
                    for raw in _decode_rgb(container):
                        failed_attempts = 0
                        yield raw
                    reason = "the stream ended"
                except av.error.FFmpegError as error:
                    reason = error.strerror or str(error)
                finally:
                    container.close()
                    container = self._container = None
                log.warning("%s: connection lost (%s)", self.description, reason)
            if failed_attempts >= self._options.reconnect_attempts:
                raise SourceLostError(
                    f"{self.description}: lost for good after {failed_attempts} reconnect attempts; check that the "
                    "stream is running (--reconnect-attempts sets how often to retry)"
                )
            delay = min(
                self._options.reconnect_initial_delay_s * 2**failed_attempts, self._options.reconnect_max_delay_s
            )
            failed_attempts += 1
            log.warning(
                "%s: reconnecting in %.1f s (attempt %d of %d)",
                self.description,
                delay,
                failed_attempts,
                self._options.reconnect_attempts,
            )
            if stop.wait(delay):
                return
            try:
                container = self._container = self._open()
            except UserError as error:
                log.warning("%s: reconnect attempt %d failed: %s", self.description, failed_attempts, error)
                continue
            log.info("%s: reconnected", self.description)

    def close(self) -> None:
        if self._container is not None:
            self._container.close()


def _read_rgb_image(path: Path) -> np.ndarray | None:
    # imdecode over fromfile, because imread cannot open non-ASCII paths on Windows.
    bgr = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _natural_key(path: Path) -> list[int | str]:
    """Sorts frame2.png before frame10.png."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


class _ImageFilesReader:
    """One image, or every image of a folder in natural name order."""

    live = False

    def __init__(self, description: str, paths: list[Path], fps: float) -> None:
        self.description = description
        self._paths = paths
        self.fps = fps
        first = _read_rgb_image(paths[0])
        if first is None:
            raise UserError(f"{paths[0]} could not be read as an image; is the file damaged?")
        self._first = first
        self.size = (first.shape[1], first.shape[0])

    def frames(self, stop: threading.Event) -> Iterator[RawFrame]:
        yield self._first, None
        for path in self._paths[1:]:
            if stop.is_set():
                return
            image = _read_rgb_image(path)
            if image is None:
                log.warning("skipping %s: not a readable image", path)
                continue
            yield image, None

    def close(self) -> None:
        """Each image file is closed as soon as it is read; nothing stays open."""


def _open_reader(spec: str, options: SourceOptions) -> _Reader:
    if spec.isdigit():
        return _CameraReader(int(spec), options.camera_resolution)
    if spec.startswith("file://"):
        spec = spec.removeprefix("file://")
    elif _URL_PATTERN.match(spec):
        return _StreamReader(spec, options)
    path = Path(spec).expanduser()
    if path.is_dir():
        images = sorted(
            (p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()), key=_natural_key
        )
        if not images:
            raise UserError(
                f"folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                "give a folder of images or a video file"
            )
        return _ImageFilesReader(f"folder {path}", images, options.image_fps)
    if not path.is_file():
        raise UserError(
            f"source {spec!r} not found; give a camera index (0), a stream URL (rtsp://...), "
            "a video or image file, or a folder of images"
        )
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _ImageFilesReader(str(path), [path], options.image_fps)
    return _VideoFileReader(path, options.repeat)


def open_source(spec: str | int, realtime: bool = True, options: SourceOptions | None = None) -> FrameSource:
    """Open a camera index ("0"), a stream URL, a video/GIF file, an image, or a folder of images.

    Raises UserError when the source cannot be opened. With realtime=True a file plays at its own rate
    and frames the consumer is too slow for are dropped, as with a camera; with realtime=False a file or
    folder delivers every frame in order, as fast as the consumer takes them. Live sources always drop.
    The source is opened here (size and fps are known) and starts capturing on start().
    """
    return FrameSource(_open_reader(str(spec), options or SourceOptions()), realtime)


def read_ahead(frames: Iterator[Frame], depth: int = 4, background: bool = False) -> Iterator[Frame]:
    """The same frames, decoded up to ``depth`` ahead in a thread of its own (decoding overlaps the caller's
    work on each frame); an error while reading is raised here, after the frames before it. A ``background``
    reader runs at a lower CPU priority and decodes in bursts of half of ``depth``: woken once per burst, its
    caches are cold once per burst, not once per frame, and the frames waiting cover its delays."""
    handoff: DropOldestQueue[Frame] = DropOldestQueue(depth)
    burst = max(depth // 2, 1) if background else 1

    def read() -> None:
        error: BaseException | None = None
        decoded: list[Frame] = []
        if background:
            lower_thread_priority()
        try:
            for frame in frames:
                decoded.append(frame)
                if len(decoded) == burst:
                    if not handoff.hand_over_all(decoded):
                        return  # the consumer stopped
                    decoded = []
        except BaseException as exc:  # noqa: BLE001 - raised in the consumer
            error = exc
        finally:
            if decoded:
                handoff.hand_over_all(decoded)
            handoff.close(error)
            close = getattr(frames, "close", None)
            if close is not None:
                close()  # a generator over a file releases it here, in the thread that ran it

    reader = threading.Thread(target=read, name="read ahead", daemon=True)
    reader.start()
    try:
        while (frame := handoff.get()) is not None:
            yield frame
    finally:
        handoff.close()
        reader.join(timeout=_STOP_TIMEOUT_S)


def iter_frames(spec: str | int, options: SourceOptions | None = None) -> Iterator[Frame]:
    """Every frame of a source in order, read in the calling thread, as fast as the caller takes them."""
    reader = _open_reader(str(spec), options or SourceOptions())
    never_stop = threading.Event()
    raw_frames = reader.frames(never_stop)
    try:
        for index, (image, pts) in enumerate(raw_frames):
            yield Frame(image, index, time.time(), time.monotonic(), pts)
    finally:
        raw_frames.close()
        reader.close()


@dataclass(frozen=True)
class CameraInfo:
    index: int
    width: int
    height: int
    fps: float | None


def list_cameras(max_index: int = 10) -> list[CameraInfo]:
    """The OpenCV camera indices below max_index that open and deliver an image."""
    cameras = []
    with _quiet_opencv():
        for index in range(max_index):
            capture = cv2.VideoCapture(index)
            try:
                ok, bgr = capture.read() if capture.isOpened() else (False, None)
                if ok:
                    cameras.append(
                        CameraInfo(index, bgr.shape[1], bgr.shape[0], capture.get(cv2.CAP_PROP_FPS) or None)
                    )
            finally:
                capture.release()
    return cameras


def format_camera_list(cameras: list[CameraInfo], max_index: int = 10) -> str:
    """What --list-cameras prints."""
    if not cameras:
        return f"no working camera found (tried indices 0 to {max_index - 1})"
    return "\n".join(
        f"camera {c.index}: {c.width}x{c.height}" + (f" at {c.fps:g} fps" if c.fps else "") for c in cameras
    )

"""flame-live's OSC stream as frames: a non-blocking UDP receiver that never waits for a packet.

flame-live's OSC publisher sends one bundle per frame (``/flame/frame`` seq, t_capture, t_publish, valid, then
``/flame/head`` 6 f, ``/flame/pose`` 12 f, ``/flame/exp`` N f, ...), a bundle with the identity every few
seconds and one with metrics once a second. :meth:`UdpReceiver.poll` reads every datagram that is waiting,
never waits for one, and returns the valid frames that arrived, oldest first: the last is the newest.
Packets of another protocol (VMC, another OSC tool, random bytes) are counted and ignored; frames that arrive
after a newer one are counted as late.
"""

from __future__ import annotations

import errno
import math
import socket
from dataclasses import dataclass, field

import numpy as np

from .osc import OscError, OscMessage, decode_packet

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9100
#: FLAME has 100 expression components; the wire schema allows up to 400.
MAX_EXPRESSION = 400
#: At most this many datagrams are read per poll, so that a flood cannot hold Blender's UI.
MAX_PACKETS_PER_POLL = 512


class StreamError(Exception):
    """The receiver cannot start (port in use, bad address); the message is one line for a Blender report."""


@dataclass(frozen=True)
class StreamFrame:
    """One tracked frame as flame-live publishes it (see the README's wire schema for the conventions)."""

    seq: int
    t_capture: float
    t_publish: float
    head_rot: np.ndarray  # (3,) axis-angle: x_cam = R(head_rot) x_model + head_trans, OpenCV camera space
    head_trans: np.ndarray  # (3,) metres
    neck_pose: np.ndarray  # (3,) axis-angle, FLAME joint rotations
    jaw_pose: np.ndarray  # (3,)
    eye_pose: np.ndarray  # (6,) left eye, then right eye
    exp: np.ndarray  # (N,) expression coefficients
    eyelids: np.ndarray | None = None  # (2,) left, right (0 open, 1 closed): only from a model with eyelids


class FrameError(ValueError):
    """A bundle in flame-live's address space whose content breaks the schema."""


def _floats(message: OscMessage, count: int | None) -> np.ndarray:
    values = message.arguments
    if count is not None and len(values) != count:
        raise FrameError(f"{message.address} has {len(values)} arguments, expected {count}")
    if not all(isinstance(value, float) for value in values):
        raise FrameError(f"{message.address} must carry 32-bit floats only")
    array = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise FrameError(f"{message.address} holds NaN or infinite values")
    return array


def frame_from_messages(messages: list[OscMessage]) -> StreamFrame | None:
    """The valid frame a flame-live frame bundle describes, or None for an invalid (no face) frame.

    Raises FrameError when the bundle lacks ``/flame/frame`` or its parts break the schema.
    """
    by_address = {message.address: message for message in messages}
    header = by_address.get("/flame/frame")
    if header is None:
        raise FrameError("bundle without /flame/frame")
    arguments = header.arguments
    if (
        len(arguments) != 4
        or not isinstance(arguments[0], int)
        or not all(isinstance(value, float) and math.isfinite(value) for value in arguments[1:3])
        or arguments[3] not in (0, 1)
        or isinstance(arguments[3], float)
    ):
        raise FrameError("/flame/frame must carry seq (i), t_capture (d), t_publish (d), valid (i 0/1)")
    seq, t_capture, t_publish, valid = arguments
    if not valid:
        return None
    missing = [address for address in ("/flame/head", "/flame/pose", "/flame/exp") if address not in by_address]
    if missing:
        raise FrameError(f"valid frame {seq} lacks {', '.join(missing)}")
    head = _floats(by_address["/flame/head"], 6)
    pose = _floats(by_address["/flame/pose"], 12)
    exp = _floats(by_address["/flame/exp"], None)
    if not 0 < len(exp) <= MAX_EXPRESSION:
        raise FrameError(f"/flame/exp has {len(exp)} values, expected 1 to {MAX_EXPRESSION}")
    eyelids = _floats(by_address["/flame/eyelids"], 2) if "/flame/eyelids" in by_address else None
    return StreamFrame(seq, t_capture, t_publish, head[:3], head[3:], pose[:3], pose[3:6], pose[6:], exp, eyelids)


@dataclass
class ReceiverCounts:
    """What the receiver has seen since it started; shown in the panel."""

    packets: int = 0
    frames: int = 0
    no_face: int = 0
    late: int = 0
    other_flame: int = 0  # identity and metrics bundles: ours, but not frames
    foreign: int = 0  # not OSC, or OSC outside /flame/
    invalid: int = 0  # /flame/ frames that break the schema
    last_problem: str = field(default="")


class UdpReceiver:
    """Listens on host:port (UDP, non-blocking) for flame-live's OSC frames."""

    def __init__(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
        """Port 0 picks a free port (tests); ``self.port`` says which."""
        if not 0 <= port < 65536:
            raise StreamError(f"port {port} is not between 1 and 65535")
        try:
            family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        except socket.gaierror as error:
            raise StreamError(f"cannot resolve the address {host!r} ({error.strerror}); give an IP address") from None
        self._socket = socket.socket(family, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        try:
            self._socket.bind(address)
        except OSError as error:
            self._socket.close()
            if error.errno == errno.EADDRINUSE:
                raise StreamError(
                    f"port {port} is already in use (another receiver running?); choose another port"
                ) from None
            raise StreamError(f"cannot listen on {host}:{port} ({error.strerror})") from None
        self.host, self.port = host, self._socket.getsockname()[1]
        self.counts = ReceiverCounts()
        self._newest: StreamFrame | None = None

    def poll(self) -> list[StreamFrame]:
        """Read what is waiting; the valid frames among it in arrival order (late ones left out)."""
        arrived: list[StreamFrame] = []
        for _ in range(MAX_PACKETS_PER_POLL):
            try:
                packet = self._socket.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as error:  # e.g. an ICMP error reported on the socket: not a reason to stop
                self._problem("foreign", f"socket error {error.strerror}")
                continue
            self.counts.packets += 1
            frame = self._accept(packet)
            if frame is not None:
                arrived.append(frame)
        return arrived

    def _accept(self, packet: bytes) -> StreamFrame | None:
        try:
            messages = decode_packet(packet)
        except OscError as error:
            self._problem("foreign", f"not OSC: {error}")
            return None
        if not messages or not all(message.address.startswith("/flame/") for message in messages):
            self._problem("foreign", f"OSC outside /flame/: {messages[0].address if messages else 'empty bundle'}")
            return None
        if not any(message.address == "/flame/frame" for message in messages):
            self.counts.other_flame += 1
            return None
        try:
            frame = frame_from_messages(messages)
        except FrameError as error:
            self._problem("invalid", str(error))
            return None
        if frame is None:
            self.counts.no_face += 1
            return None
        newest = self._newest
        # Late: an older frame of the same run. A restarted sender has smaller seq but a newer publish time.
        if newest is not None and frame.seq < newest.seq and frame.t_publish <= newest.t_publish:
            self.counts.late += 1
            return None
        self.counts.frames += 1
        self._newest = frame
        return frame

    def _problem(self, kind: str, reason: str) -> None:
        setattr(self.counts, kind, getattr(self.counts, kind) + 1)
        self.counts.last_problem = reason

    def close(self) -> None:
        self._socket.close()

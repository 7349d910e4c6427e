"""Publishers: ZeroMQ (the full schema), native OSC (``/flame/...``), VMC (avatars in VSeeFace, Unity, Blender) and
Live Link Face (Unreal's ARKit face Live Link).

Each takes the message dicts built by ``flame_client.messages`` through ``publish_frame``, ``publish_shape`` and
``publish_metrics``, and never makes the caller wait for a receiver: ZeroMQ drops at a small high-water mark,
UDP drops when the socket buffer is full, and both count what they drop.

Native OSC address space (one bundle per frame; floats are 32-bit, times 64-bit doubles):

=============================  =========  =====================================================================
address                        types      content
=============================  =========  =====================================================================
``/flame/frame``               i d d i    seq, t_capture, t_publish, valid (1/0); alone in the bundle when 0
``/flame/head``                f x 6      head_rot (axis-angle, camera space), head_trans (metres)
``/flame/pose``                f x 12     neck_pose, jaw_pose, eye_pose (left, right): FLAME's joint order
``/flame/exp``                 f x N      expression coefficients
``/flame/eyelids``             f x 2      eyelid weights, left then right (0 open, 1 closed): only from a model
                                          with eyelid blendshapes
``/flame/blendshapes``         f x 52     MediaPipe scores in ``BLENDSHAPE_NAMES`` order
``/flame/blendshape/<name>``   f          one per MediaPipe name, only with ``blendshape_addresses=True``
``/flame/fov``                 f          vertical field of view, degrees
``/flame/model``               s s        model name, model checksum           (shape bundle: on change and
``/flame/shape``               f x N      identity coefficients                 every 2 s, for late joiners)
``/flame/tex``, ``/flame/light``  f x N   optional albedo and lighting coefficients
``/flame/metrics/<name>``      f          one per metric (``t_publish`` as d), about once a second
=============================  =========  =====================================================================

The OSC encoding is written here rather than built with python-osc's message builder because the builder
re-parses every message it builds: about 1.5 ms per VMC frame against a few tens of microseconds.
"""

from __future__ import annotations

import logging
import math
import re
import socket
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Annotated, Any, Protocol, TypeVar

import zmq

from engine.config import ANY_NUMBER, Range
from engine.errors import UserError
from flame_client.messages import (
    BLENDSHAPE_NAMES,
    DEFAULT_ZMQ_ADDRESS,
    TOPIC_FRAME,
    TOPIC_METRICS,
    TOPIC_SHAPE,
    blendshapes_with_eyelids,
    encode,
)
from realtime.livelink import DEFAULT_LIVELINK_PORT, DEFAULT_SUBJECT, LiveLinkFaceEncoder
from realtime.vmc import PerfectSyncMapping, unity_neck_and_head

logger = logging.getLogger(__name__)

DEFAULT_OSC_PORT = 9100
DEFAULT_VMC_PORT = 39539
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
_SHAPE_REPEAT_S = 2.0
#: New ZeroMQ subscribers get the identity at most this often, however many subscriptions arrive: one reply
#: serves every subscriber that joined in between, and a flood of subscriptions cannot stall the live loop.
GREETING_INTERVAL_S = 0.5
#: Subscription notices read per published message; the rest wait for the next one.
_NOTICES_PER_PUBLISH = 256

_Self = TypeVar("_Self", bound="_Closing")


class Publisher(Protocol):
    """What the live loop and the replayer drive; every publisher below satisfies it."""

    def publish_frame(self, frame_msg: Mapping[str, Any]) -> None: ...

    def publish_shape(self, shape_msg: Mapping[str, Any]) -> None: ...

    def publish_metrics(self, metrics_msg: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class _Closing:
    """``with Publisher(...) as publisher:`` closes it on the way out."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------------
# ZeroMQ


class ZmqPublisher(_Closing):
    """The full schema on a ZeroMQ publisher socket, bound to 127.0.0.1 unless the address says otherwise.

    The socket is an XPUB so that it sees each new subscription and sends the current ``flame.shape``: a client
    that starts after the identity was published still gets it, within GREETING_INTERVAL_S.
    """

    def __init__(self, address: str = DEFAULT_ZMQ_ADDRESS, *, send_hwm: int = 4) -> None:
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.XPUB)
        self._socket.setsockopt(zmq.SNDHWM, send_hwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.XPUB_VERBOSE, 1)
        try:
            self._socket.bind(address)
        except zmq.ZMQError as error:
            self.close()
            raise _bind_error(address, error) from None
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.dropped = 0
        self.identity_sends = 0
        self.subscribed = False
        self._last_shape: list[bytes] | None = None
        self._greeting_due = False
        self._last_greeting = -math.inf
        if _host_of(address) not in _LOOPBACK_HOSTS and not address.startswith(("ipc://", "inproc://")):
            logger.warning("publishing on %s: other machines can read this stream, unauthenticated", self.endpoint)
        logger.info("ZeroMQ publisher on %s", self.endpoint)

    def publish_frame(self, frame_msg: Mapping[str, Any]) -> None:
        self._publish(encode(TOPIC_FRAME, frame_msg))

    def publish_shape(self, shape_msg: Mapping[str, Any]) -> None:
        self._last_shape = encode(TOPIC_SHAPE, shape_msg)
        self._read_notices()
        self._greeting_due = False  # every subscriber so far gets this very message
        self._send(self._last_shape)

    def publish_metrics(self, metrics_msg: Mapping[str, Any]) -> None:
        self._publish(encode(TOPIC_METRICS, metrics_msg))

    def close(self) -> None:
        if not self._socket.closed:
            self._socket.close(linger=0)
            self._context.term()

    def _publish(self, frames: list[bytes]) -> None:
        self._greet_new_subscribers()
        self._send(frames)

    def _send(self, frames: list[bytes]) -> None:
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1

    def wait_for_subscriber(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a first subscription; True once any subscriber has subscribed.

        ZeroMQ drops what is published before a subscriber's subscription arrives, so a publisher that must not
        lose its first messages (a replay) waits here first.
        """
        deadline = time.monotonic() + timeout_s
        while not self.subscribed:
            remaining_ms = round(1000 * (deadline - time.monotonic()))
            if remaining_ms <= 0 or not self._socket.poll(remaining_ms):
                break
            self._read_notices()
        return self.subscribed

    def _read_notices(self) -> None:
        """Subscription notices (a bounded number per call): note subscribers and who wants the identity."""
        for _ in range(_NOTICES_PER_PUBLISH):
            if not self._socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                break
            notice = self._socket.recv(zmq.NOBLOCK)
            if notice[:1] == b"\x01":
                self.subscribed = True
                if TOPIC_SHAPE.encode().startswith(notice[1:]):
                    self._greeting_due = True

    def _greet_new_subscribers(self) -> None:
        """Send the identity once for all the subscriptions to it since the last greeting, at most every
        GREETING_INTERVAL_S (a subscriber that floods subscriptions gets no more than one that subscribes once)."""
        self._read_notices()
        now = time.monotonic()
        if self._greeting_due and self._last_shape is not None and now - self._last_greeting >= GREETING_INTERVAL_S:
            self._greeting_due = False
            self._last_greeting = now
            self.identity_sends += 1
            self._send(self._last_shape)


def _host_of(address: str) -> str:
    match = re.fullmatch(r"tcp://(\[[^\]]*\]|[^:]*):(.*)", address)
    return match.group(1) if match else ""


def _bind_error(address: str, error: zmq.ZMQError) -> UserError:
    if error.errno == zmq.EADDRINUSE:
        port = address.rsplit(":", 1)[-1]
        return UserError(
            f"port {port} is already in use (another flame-live running?); "
            f"choose another port with --zmq tcp://127.0.0.1:PORT"
        )
    return UserError(
        f"cannot publish on {address!r} ({error.strerror}); give --zmq as tcp://HOST:PORT, e.g. {DEFAULT_ZMQ_ADDRESS}"
    )


# ---------------------------------------------------------------------------------------------------------------
# OSC encoding (OSC 1.0: big-endian, 4-byte aligned, NUL-terminated strings)

_INT32 = struct.Struct(">i")
_FLOAT32 = struct.Struct(">f")
_FLOAT64 = struct.Struct(">d")
#: "#bundle", then the time tag 1, which OSC defines as "immediately".
_BUNDLE_HEADER = b"#bundle\x00" + struct.pack(">Q", 1)


def _osc_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return data + b"\x00" * (4 - len(data) % 4)


_OSC_ARGUMENT_ENCODERS = {"s": _osc_string, "i": _INT32.pack, "f": _FLOAT32.pack, "d": _FLOAT64.pack}


def osc_message(address: str, type_tags: str, *arguments: Any) -> bytes:
    """One OSC message; ``type_tags`` has one of s, i, f, d per argument."""
    parts = [_osc_string(address), _osc_string("," + type_tags)]
    parts.extend(_OSC_ARGUMENT_ENCODERS[tag](value) for tag, value in zip(type_tags, arguments, strict=True))
    return b"".join(parts)


def osc_float_array(address: str, values: Sequence[float]) -> bytes:
    """One OSC message carrying ``len(values)`` 32-bit floats."""
    count = len(values)
    return _osc_string(address) + _osc_string("," + "f" * count) + struct.pack(f">{count}f", *values)


def osc_bundle(messages: Sequence[bytes]) -> bytes:
    """An OSC bundle for immediate execution holding the given encoded messages in order."""
    return _BUNDLE_HEADER + b"".join(_INT32.pack(len(message)) + message for message in messages)


class _OneFloatMessages:
    """Many messages that differ only in one trailing float: their bytes before it are encoded once."""

    def __init__(self, address_and_leading: Sequence[tuple[str, str, tuple[Any, ...]]]) -> None:
        self._prefixes = []
        for address, leading_tags, leading_arguments in address_and_leading:
            message = osc_message(address, leading_tags + "f", *leading_arguments, 0.0)
            self._prefixes.append(message[: -_FLOAT32.size])

    def encode(self, values: Sequence[float]) -> list[bytes]:
        return [prefix + _FLOAT32.pack(value) for prefix, value in zip(self._prefixes, values, strict=True)]


class _UdpSender(_Closing):
    """A non-blocking UDP socket aimed at one receiver; what cannot be sent at once is dropped and counted.

    A receiver on this machine is reached from the loopback address, so nothing leaves through a network interface,
    and the socket is bound there (or to the interface that reaches a remote receiver), never to every interface.
    """

    def __init__(self, host: str, port: int, what: str) -> None:
        if not 0 < port < 65536:
            raise UserError(f"{what} port {port} is not between 1 and 65535")
        try:
            family, _, _, _, self._target = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        except socket.gaierror as error:
            raise UserError(f"cannot resolve the {what} host {host!r} ({error.strerror}); give an IP address") from None
        self._what = what
        self._socket = socket.socket(family, socket.SOCK_DGRAM)
        # Bound to the address that reaches the receiver (127.0.0.1 for a local one), not to every interface:
        # nobody else can send to it, and the little that is sent to it has almost no room to queue.
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        self._socket.bind((_source_address(family, self._target), 0))
        self._socket.setblocking(False)
        self.dropped = 0
        logger.info("%s to %s:%d from %s", what, host, port, self.local_address[0])

    @property
    def local_address(self) -> tuple[str, int]:
        """(address, port) this sender's socket is bound to."""
        return self._socket.getsockname()[:2]

    def close(self) -> None:
        self._socket.close()

    def _send(self, datagram: bytes) -> None:
        try:
            self._socket.sendto(datagram, self._target)
        except OSError as error:
            self.dropped += 1
            if self.dropped == 1:
                logger.warning("%s: dropping a packet (%s); later drops are only counted", self._what, error)


def _source_address(family: socket.AddressFamily, target: tuple) -> str:
    """The local address the kernel would send from to reach ``target``: loopback for a local receiver, else
    the interface on the route; the wildcard address only when there is no route yet."""
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(target)  # UDP: picks the route and source address, sends nothing
        except OSError:
            return "::" if family == socket.AF_INET6 else "0.0.0.0"
        return probe.getsockname()[0]


# ---------------------------------------------------------------------------------------------------------------
# Native OSC


class OscPublisher(_UdpSender):
    """Our parameters under ``/flame/...`` for OSC tools (TouchDesigner, Max, Pure Data, Blender add-ons)."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = DEFAULT_OSC_PORT, *, blendshape_addresses: bool = False
    ) -> None:
        super().__init__(host, port, "OSC")
        self._named_blendshapes = (
            _OneFloatMessages([(f"/flame/blendshape/{name}", "", ()) for name in BLENDSHAPE_NAMES])
            if blendshape_addresses
            else None
        )
        self._last_shape: bytes | None = None
        self._last_shape_sent = 0.0

    def publish_frame(self, frame_msg: Mapping[str, Any]) -> None:
        header = osc_message(
            "/flame/frame",
            "iddi",
            frame_msg["seq"],
            frame_msg["t_capture"],
            frame_msg["t_publish"],
            int(frame_msg["valid"]),
        )
        messages = [header]
        if frame_msg["valid"]:
            blendshapes = frame_msg["blendshapes"]
            messages += [
                osc_float_array("/flame/head", frame_msg["head_rot"] + frame_msg["head_trans"]),
                osc_float_array("/flame/pose", frame_msg["neck_pose"] + frame_msg["jaw_pose"] + frame_msg["eye_pose"]),
                osc_float_array("/flame/exp", frame_msg["exp"]),
                osc_float_array("/flame/blendshapes", blendshapes),
                osc_message("/flame/fov", "f", frame_msg["fov_deg"]),
            ]
            if frame_msg.get("eyelids") is not None:
                messages.append(osc_float_array("/flame/eyelids", frame_msg["eyelids"]))
            if self._named_blendshapes is not None:
                messages += self._named_blendshapes.encode(blendshapes)
        self._send(osc_bundle(messages))
        if self._last_shape is not None and time.monotonic() - self._last_shape_sent > _SHAPE_REPEAT_S:
            self._send_shape()

    def publish_shape(self, shape_msg: Mapping[str, Any]) -> None:
        messages = [
            osc_message("/flame/model", "ss", shape_msg["model"], shape_msg["model_checksum"]),
            osc_float_array("/flame/shape", shape_msg["shape"]),
        ]
        messages += [osc_float_array(f"/flame/{key}", shape_msg[key]) for key in ("tex", "light") if key in shape_msg]
        self._last_shape = osc_bundle(messages)
        self._send_shape()

    def publish_metrics(self, metrics_msg: Mapping[str, Any]) -> None:
        messages = [
            osc_message(f"/flame/metrics/{name}", "d" if name == "t_publish" else "f", value)
            for name, value in metrics_msg.items()
            if name != "v"
        ]
        self._send(osc_bundle(messages))

    def _send_shape(self) -> None:
        assert self._last_shape is not None
        self._send(self._last_shape)
        self._last_shape_sent = time.monotonic()


# ---------------------------------------------------------------------------------------------------------------
# VMC


@dataclass(frozen=True)
class VmcOptions:
    """How our fit drives a VMC avatar (see ``realtime.vmc`` for the conventions)."""

    #: Move like the user's mirror image (the VTuber convention); False makes a puppet that copies the user.
    mirror: bool = True
    #: Fraction of the head's rotation given to the Neck bone; the rest goes to the Head bone.
    neck_share: Annotated[float, Range(0, 1)] = 0.5
    #: Local bone positions sent with the rotations (metres, Unity axes). VMC carries positions and EVMC4U
    #: applies them by default, so zeros would collapse the head onto the neck; these are typical VRoid values.
    neck_position: Annotated[tuple[float, float, float], ANY_NUMBER] = (0.0, 0.1, 0.0)
    head_position: Annotated[tuple[float, float, float], ANY_NUMBER] = (0.0, 0.08, 0.0)


class VmcPublisher(_UdpSender):
    """VMC protocol "Performer": Perfect Sync blendshapes and Neck/Head bones, ready for VSeeFace, EVMC4U, VMC4B.

    Per frame, two bundles: status and pose (``/VMC/Ext/OK``, ``/VMC/Ext/T``, ``/VMC/Ext/Root/Pos``,
    ``/VMC/Ext/Bone/Pos`` Neck and Head), then the 52 ``/VMC/Ext/Blend/Val`` followed by ``/VMC/Ext/Blend/Apply``
    (MediaPipe's scores; EyeBlinkLeft/Right from the fitted eyelids when the model has eyelid blendshapes).
    Without a face only the status goes out (tracking status 0) and the avatar holds its last pose.
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int = DEFAULT_VMC_PORT, options: VmcOptions = VmcOptions()
    ) -> None:
        if not 0.0 <= options.neck_share <= 1.0:
            raise UserError(f"VMC neck share {options.neck_share} must be between 0 and 1")
        super().__init__(host, port, "VMC")
        self.options = options
        self._perfect_sync = PerfectSyncMapping(options.mirror)
        self._blend_values = _OneFloatMessages(
            [("/VMC/Ext/Blend/Val", "s", (name,)) for name in self._perfect_sync.names]
        )
        self._blend_apply = osc_message("/VMC/Ext/Blend/Apply", "")
        self._root = osc_message("/VMC/Ext/Root/Pos", "sfffffff", "root", 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
        self._started = time.monotonic()

    def publish_frame(self, frame_msg: Mapping[str, Any]) -> None:
        valid = bool(frame_msg["valid"])
        # OK carries, since VMC v2.7: loaded, calibration state (3 = calibrated), calibration mode, tracking.
        status = [
            osc_message("/VMC/Ext/OK", "iiii", 1, 3, 0, int(valid)),
            osc_message("/VMC/Ext/T", "f", time.monotonic() - self._started),
        ]
        if not valid:
            self._send(osc_bundle(status))
            return
        neck, head = unity_neck_and_head(
            frame_msg["head_rot"], frame_msg["neck_pose"], self.options.mirror, self.options.neck_share
        )
        pose = [
            self._root,
            osc_message("/VMC/Ext/Bone/Pos", "sfffffff", "Neck", *self.options.neck_position, *neck),
            osc_message("/VMC/Ext/Bone/Pos", "sfffffff", "Head", *self.options.head_position, *head),
        ]
        self._send(osc_bundle(status + pose))
        blend_values = self._blend_values.encode(self._perfect_sync.values(blendshapes_with_eyelids(frame_msg)))
        self._send(osc_bundle(blend_values + [self._blend_apply]))

    def publish_shape(self, shape_msg: Mapping[str, Any]) -> None:
        """VMC has no notion of identity; nothing to send."""

    def publish_metrics(self, metrics_msg: Mapping[str, Any]) -> None:
        """VMC has no place for metrics; nothing to send."""


# ---------------------------------------------------------------------------------------------------------------
# Live Link Face


class LiveLinkPublisher(_UdpSender):
    """Live Link Face packets for Unreal's stock "Apple ARKit Face Support" Live Link source (``realtime.livelink``).

    One packet per tracked frame: MediaPipe's ARKit blendshapes (the blinks from the fitted eyelids when the
    model has them) with our fit's head and eye angles. Without a
    face nothing is sent, and Unreal holds the subject's last pose.
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int = DEFAULT_LIVELINK_PORT, subject: str = DEFAULT_SUBJECT
    ) -> None:
        try:
            self._encoder = LiveLinkFaceEncoder(subject)
        except ValueError as error:
            raise UserError(f"Live Link subject {subject!r}: {error}") from None
        super().__init__(host, port, "Live Link Face")
        logger.info("Live Link subject %r, device id %s", subject, self._encoder.device_id)

    def publish_frame(self, frame_msg: Mapping[str, Any]) -> None:
        if frame_msg["valid"]:
            self._send(self._encoder.encode(frame_msg))

    def publish_shape(self, shape_msg: Mapping[str, Any]) -> None:
        """Live Link Face has no notion of identity; nothing to send."""

    def publish_metrics(self, metrics_msg: Mapping[str, Any]) -> None:
        """Live Link Face has no place for metrics; nothing to send."""

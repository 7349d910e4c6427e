"""Wire schema v1: the messages flame-live publishes, built, encoded, decoded and validated in one place.

The publishers, the recorder and every client use this module, so it imports only numpy and msgpack.

Transport (ZeroMQ): PUB socket, default ``tcp://127.0.0.1:5555``, multipart ``[topic, payload]`` where the topic
is ASCII and the payload a MessagePack map of plain types (ints, floats, bools, strings, arrays), readable by any
MessagePack library without extension types. Every payload carries ``v``, the schema version.

``flame.frame`` (every frame)
    ``seq`` frame counter; ``t_capture`` / ``t_publish`` wall-clock seconds (``time.time()``) when the image
    was captured / the message was built; ``valid`` false when no face was tracked (then the parameters repeat
    the last fit and should not drive anything); ``exp`` FLAME expression coefficients; ``jaw_pose`` (3),
    ``eye_pose`` (6: left eye then right eye) and ``neck_pose`` (3), FLAME joint rotations, axis-angle radians;
    ``head_rot`` (3) axis-angle and ``head_trans`` (3, metres) placing the model in OpenCV camera space
    (x right, y down, z forward): ``x_cam = R(head_rot) @ x_model + head_trans``, so a head looking straight into
    the camera has ``head_rot`` close to (pi, 0, 0) (see ``flame_client.rotations``); ``fov_deg`` the camera's
    vertical field of view; ``blendshapes`` (52) MediaPipe's scores in :data:`BLENDSHAPE_NAMES` order, where
    "Left" is the person's own left; optional ``landmarks`` (x0, y0, x1, y1, ...) in pixels of the input image,
    NaN where not observed; optional ``image_size`` (width, height) in pixels; optional ``eyelids`` (2: the
    person's left eyelid then right, 0 open, 1 closed), only from a model with metrical-tracker's eyelid
    blendshapes, which act like two further expression components after ``exp``.
``flame.shape`` (whenever the identity changes, and again to each new subscriber)
    ``t_publish``; ``shape`` FLAME identity coefficients; ``model`` the head model's name ("FLAME 2020",
    "FLAME 2023", "demo head (not FLAME)"); ``model_checksum`` identifying its files; optional ``tex`` albedo
    coefficients and ``light`` spherical-harmonics lighting (RGB triples, 27 values for 9 bands).
``flame.metrics`` (about once a second)
    ``t_publish``, ``fps``, ``latency_p50_ms``, ``latency_p95_ms`` (capture to publish), ``dropped_frames``,
    ``mediapipe_ms``, ``tracker_ms``, plus any further numeric counters under lower_snake_case names.

Readers ignore frame and shape keys they do not know (and :func:`validate` drops them); ``v`` changes only when
a change would break an existing reader.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgpack
import numpy as np

SCHEMA_VERSION = 1
DEFAULT_ZMQ_ADDRESS = "tcp://127.0.0.1:5555"

TOPIC_FRAME = "flame.frame"
TOPIC_SHAPE = "flame.shape"
TOPIC_METRICS = "flame.metrics"
TOPICS: tuple[str, ...] = (TOPIC_FRAME, TOPIC_SHAPE, TOPIC_METRICS)

#: Largest payload accepted. A frame with 478 landmarks is about 10 KB; anything near this limit is not ours.
MAX_MESSAGE_BYTES = 256 * 1024
#: FLAME has 300 identity and 100 expression components; the limit leaves room without allowing abuse.
MAX_COEFFICIENTS = 400
#: ``tex`` holds texture-space coefficients, or the fallback albedo map (64 x 64 RGB) when there is no texture space.
MAX_TEXTURE_VALUES = 16384
MAX_LANDMARKS = 478
MAX_NAME_LENGTH = 100
MAX_EXTRA_METRICS = 32

#: MediaPipe Face Landmarker's 52 blendshape categories in output order: ``_neutral`` then 51 ARKit names in
#: lowerCamelCase (ARKit's ``tongueOut`` is missing). Checked against face_landmarker.task v1.
BLENDSHAPE_NAMES: tuple[str, ...] = (
    "_neutral", "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight",
    "cheekPuff", "cheekSquintLeft", "cheekSquintRight", "eyeBlinkLeft", "eyeBlinkRight", "eyeLookDownLeft",
    "eyeLookDownRight", "eyeLookInLeft", "eyeLookInRight", "eyeLookOutLeft", "eyeLookOutRight", "eyeLookUpLeft",
    "eyeLookUpRight", "eyeSquintLeft", "eyeSquintRight", "eyeWideLeft", "eyeWideRight", "jawForward", "jawLeft",
    "jawOpen", "jawRight", "mouthClose", "mouthDimpleLeft", "mouthDimpleRight", "mouthFrownLeft",
    "mouthFrownRight", "mouthFunnel", "mouthLeft", "mouthLowerDownLeft", "mouthLowerDownRight", "mouthPressLeft",
    "mouthPressRight", "mouthPucker", "mouthRight", "mouthRollLower", "mouthRollUpper", "mouthShrugLower",
    "mouthShrugUpper", "mouthSmileLeft", "mouthSmileRight", "mouthStretchLeft", "mouthStretchRight",
    "mouthUpperUpLeft", "mouthUpperUpRight", "noseSneerLeft", "noseSneerRight",
)  # fmt: skip

#: Where the blink scores sit in ``blendshapes``: the person's left eye, then right (as ``eyelids``).
EYE_BLINK_INDICES: tuple[int, int] = (BLENDSHAPE_NAMES.index("eyeBlinkLeft"), BLENDSHAPE_NAMES.index("eyeBlinkRight"))

METRICS_FIELDS: tuple[str, ...] = (
    "fps", "latency_p50_ms", "latency_p95_ms", "dropped_frames", "mediapipe_ms", "tracker_ms",
)  # fmt: skip


class MessageError(ValueError):
    """A message that breaks the schema. ``str(error)`` is a one-line reason, safe to log or show."""


# ---------------------------------------------------------------------------------------------------------------
# Building messages (numpy in, plain Python out)


def frame_message(
    seq: int,
    t_capture: float,
    valid: bool,
    exp: np.ndarray,
    jaw_pose: np.ndarray,
    eye_pose: np.ndarray,
    neck_pose: np.ndarray,
    head_rot: np.ndarray,
    head_trans: np.ndarray,
    fov_deg: float,
    blendshapes: np.ndarray,
    landmarks: np.ndarray | None = None,
    image_size: tuple[int, int] | None = None,
    t_publish: float | None = None,
    eyelids: np.ndarray | None = None,
) -> dict[str, Any]:
    """A ``flame.frame`` message. Arrays may be any shape with the right number of values (landmarks (K, 2)).

    ``t_publish`` defaults to now. Raises :class:`MessageError` for a wrong count or a non-finite value.
    """
    message: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "seq": int(seq),
        "t_capture": float(t_capture),
        "t_publish": time.time() if t_publish is None else float(t_publish),
        "valid": bool(valid),
        "exp": _plain_floats("exp", exp),
        "jaw_pose": _plain_floats("jaw_pose", jaw_pose, 3),
        "eye_pose": _plain_floats("eye_pose", eye_pose, 6),
        "neck_pose": _plain_floats("neck_pose", neck_pose, 3),
        "head_rot": _plain_floats("head_rot", head_rot, 3),
        "head_trans": _plain_floats("head_trans", head_trans, 3),
        "fov_deg": float(fov_deg),
        "blendshapes": _plain_floats("blendshapes", blendshapes, len(BLENDSHAPE_NAMES)),
    }
    if landmarks is not None:
        message["landmarks"] = _plain_floats("landmarks", landmarks, allow_nan=True)
    if image_size is not None:
        message["image_size"] = [int(image_size[0]), int(image_size[1])]
    if eyelids is not None:
        message["eyelids"] = _plain_floats("eyelids", eyelids, 2)
    return message


def blendshapes_with_eyelids(frame: Mapping[str, Any]) -> list[float]:
    """A frame's ``blendshapes`` with ``eyeBlinkLeft``/``eyeBlinkRight`` taken from its fitted ``eyelids``
    (clamped to [0, 1]) when it has them: the lids of the fitted mesh rather than MediaPipe's classifier."""
    scores = list(frame["blendshapes"])
    eyelids = frame.get("eyelids")
    if eyelids is not None:
        for index, weight in zip(EYE_BLINK_INDICES, eyelids):
            scores[index] = min(1.0, max(0.0, float(weight)))
    return scores


def shape_message(
    shape: np.ndarray,
    model: str,
    model_checksum: str,
    tex: np.ndarray | None = None,
    light: np.ndarray | None = None,
    t_publish: float | None = None,
) -> dict[str, Any]:
    """A ``flame.shape`` message: the identity and the model it belongs to (``HeadModel.name``/``.checksum``)."""
    message: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "t_publish": time.time() if t_publish is None else float(t_publish),
        "shape": _plain_floats("shape", shape),
        "model": str(model),
        "model_checksum": str(model_checksum),
    }
    if tex is not None:
        message["tex"] = _plain_floats("tex", tex)
    if light is not None:
        message["light"] = _plain_floats("light", light)
    return message


def metrics_message(
    fps: float,
    latency_p50_ms: float,
    latency_p95_ms: float,
    dropped_frames: int,
    mediapipe_ms: float,
    tracker_ms: float,
    extra: Mapping[str, float] | None = None,
    t_publish: float | None = None,
) -> dict[str, Any]:
    """A ``flame.metrics`` message; ``extra`` adds further numeric counters (lower_snake_case names)."""
    message: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "t_publish": time.time() if t_publish is None else float(t_publish),
        "fps": float(fps),
        "latency_p50_ms": float(latency_p50_ms),
        "latency_p95_ms": float(latency_p95_ms),
        "dropped_frames": int(dropped_frames),
        "mediapipe_ms": float(mediapipe_ms),
        "tracker_ms": float(tracker_ms),
    }
    for name, value in (extra or {}).items():
        message[name] = float(value)
    return message


def _plain_floats(field: str, values: Any, count: int | None = None, allow_nan: bool = False) -> list[float]:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if count is not None and array.size != count:
        raise MessageError(f"'{field}' has {array.size} values, expected {count}")
    bad = np.isinf(array) if allow_nan else ~np.isfinite(array)
    if bad.any():
        raise MessageError(f"'{field}' contains a non-finite value at index {int(np.argmax(bad))}")
    return array.tolist()


# ---------------------------------------------------------------------------------------------------------------
# Encoding and decoding


def encode(topic: str, message: Mapping[str, Any]) -> list[bytes]:
    """ZeroMQ frames ``[topic, payload]`` for a message; validates it first so we never send what we would reject."""
    validate(topic, message)
    payload = msgpack.packb(message, use_bin_type=True)
    if len(payload) > MAX_MESSAGE_BYTES:
        raise MessageError(f"{topic}: message is {len(payload)} bytes, over the {MAX_MESSAGE_BYTES}-byte limit")
    return [topic.encode("ascii"), payload]


def decode(frames: list[bytes]) -> tuple[str, dict[str, Any]]:
    """Topic and validated message from received ZeroMQ frames; raises :class:`MessageError` with the reason."""
    if len(frames) != 2:
        raise MessageError(f"expected 2 frames [topic, payload], got {len(frames)}")
    raw_topic, payload = bytes(frames[0]), bytes(frames[1])
    topic = raw_topic.decode("ascii", errors="replace")
    if topic not in TOPICS:
        raise MessageError(f"unknown topic {topic[:40]!r} (known: {', '.join(TOPICS)})")
    if len(payload) > MAX_MESSAGE_BYTES:
        raise MessageError(f"{topic}: message is {len(payload)} bytes, over the {MAX_MESSAGE_BYTES}-byte limit")
    return topic, validate(topic, unpack_payload(payload))


def unpack_payload(payload: bytes) -> Any:
    """MessagePack to plain Python with hard limits, so a hostile payload cannot make us allocate much."""
    try:
        return msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_array_len=max(2 * MAX_LANDMARKS, MAX_TEXTURE_VALUES),
            max_map_len=64,
            max_str_len=4 * MAX_NAME_LENGTH,
            max_bin_len=0,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise MessageError(f"payload is not valid MessagePack for this schema: {reason}") from None


# ---------------------------------------------------------------------------------------------------------------
# Validation: one checker per field, shared by encode, decode and readers of recordings

_Checker = Callable[[str, Any], Any]
_METRIC_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")


def _number(field: str, value: Any) -> float:
    if type(value) not in (float, int):
        raise MessageError(f"'{field}' must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise MessageError(f"'{field}' must be finite, got {value}")
    return float(value)


def _count(field: str, value: Any) -> int:
    if type(value) is not int or value < 0:
        raise MessageError(f"'{field}' must be a non-negative integer, got {value!r:.40}")
    return value


def _flag(field: str, value: Any) -> bool:
    if type(value) is not bool:
        raise MessageError(f"'{field}' must be true or false, got {type(value).__name__}")
    return value


def _text(field: str, value: Any) -> str:
    if type(value) is not str or not 0 < len(value) <= MAX_NAME_LENGTH:
        raise MessageError(f"'{field}' must be a string of 1..{MAX_NAME_LENGTH} characters")
    return value


def _field_of_view(field: str, value: Any) -> float:
    degrees = _number(field, value)
    if not 0.0 < degrees < 180.0:
        raise MessageError(f"'{field}' must be between 0 and 180 degrees, got {degrees}")
    return degrees


def _image_size(field: str, value: Any) -> list[int]:
    if type(value) is not list or len(value) != 2 or any(type(v) is not int or v <= 0 for v in value):
        raise MessageError(f"'{field}' must be [width, height] in pixels")
    return value


def _floats(min_count: int, max_count: int, multiple_of: int = 1, allow_nan: bool = False) -> _Checker:
    """A checker for an array of numbers with a length in [min_count, max_count]."""

    def check(field: str, value: Any) -> list[float]:
        if type(value) is not list:
            raise MessageError(f"'{field}' must be an array of numbers, got {type(value).__name__}")
        count = len(value)
        if not min_count <= count <= max_count or count % multiple_of:
            expected = str(min_count) if min_count == max_count else f"{min_count}..{max_count}"
            raise MessageError(f"'{field}' has {count} values, expected {expected}")
        # Whole-array checks run at C speed; the slow scan only looks for the culprit to name it.
        kinds = set(map(type, value))
        if not kinds <= {float, int}:
            index = next(i for i, number in enumerate(value) if type(number) not in (float, int))
            raise MessageError(f"'{field}'[{index}] must be a number, got {type(value[index]).__name__}")
        if not all(map(math.isfinite, value)) and (not allow_nan or any(map(math.isinf, value))):
            index = next(i for i, x in enumerate(value) if math.isinf(x) or (not allow_nan and math.isnan(x)))
            raise MessageError(f"'{field}'[{index}] must be finite, got {value[index]}")
        return [float(number) for number in value] if int in kinds else value

    return check


_POSE3 = _floats(3, 3)

_FRAME_REQUIRED: dict[str, _Checker] = {
    "seq": _count,
    "t_capture": _number,
    "t_publish": _number,
    "valid": _flag,
    "exp": _floats(1, MAX_COEFFICIENTS),
    "jaw_pose": _POSE3,
    "eye_pose": _floats(6, 6),
    "neck_pose": _POSE3,
    "head_rot": _POSE3,
    "head_trans": _POSE3,
    "fov_deg": _field_of_view,
    "blendshapes": _floats(len(BLENDSHAPE_NAMES), len(BLENDSHAPE_NAMES)),
}
_FRAME_OPTIONAL: dict[str, _Checker] = {
    "landmarks": _floats(2, 2 * MAX_LANDMARKS, multiple_of=2, allow_nan=True),
    "image_size": _image_size,
    "eyelids": _floats(2, 2),
}
_SHAPE_REQUIRED: dict[str, _Checker] = {
    "t_publish": _number,
    "shape": _floats(1, MAX_COEFFICIENTS),
    "model": _text,
    "model_checksum": _text,
}
_SHAPE_OPTIONAL: dict[str, _Checker] = {
    "tex": _floats(1, MAX_TEXTURE_VALUES),
    "light": _floats(3, 48, multiple_of=3),
}
_METRICS_REQUIRED: dict[str, _Checker] = {
    "t_publish": _number,
    **{name: _number for name in METRICS_FIELDS},
    "dropped_frames": _count,
}

_SCHEMAS: dict[str, tuple[dict[str, _Checker], dict[str, _Checker]]] = {
    TOPIC_FRAME: (_FRAME_REQUIRED, _FRAME_OPTIONAL),
    TOPIC_SHAPE: (_SHAPE_REQUIRED, _SHAPE_OPTIONAL),
    TOPIC_METRICS: (_METRICS_REQUIRED, {}),
}


def validate(topic: str, message: Any) -> dict[str, Any]:
    """The message with every field checked (types, lengths, finite numbers) and unknown keys dropped.

    Metrics keep their extra counters, which must be lower_snake_case names with finite numbers.
    Raises :class:`MessageError` naming the topic and the first problem.
    """
    if topic not in _SCHEMAS:
        raise MessageError(f"unknown topic {topic[:40]!r} (known: {', '.join(TOPICS)})")
    if not isinstance(message, Mapping):
        raise MessageError(f"{topic}: payload must be a map, got {type(message).__name__}")
    version = message.get("v")
    if version != SCHEMA_VERSION or type(version) is not int:
        raise MessageError(
            f"{topic}: unsupported schema version {version!r:.20} (this reader understands v{SCHEMA_VERSION}); "
            "update the publisher or the client so both speak the same version"
        )
    required, optional = _SCHEMAS[topic]
    clean: dict[str, Any] = {"v": SCHEMA_VERSION}
    try:
        for field, check in required.items():
            if field not in message:
                raise MessageError(f"missing field '{field}'")
            clean[field] = check(field, message[field])
        for field, check in optional.items():
            if message.get(field) is not None:
                clean[field] = check(field, message[field])
        if topic == TOPIC_METRICS:
            clean.update(_extra_metrics(message))
    except MessageError as error:
        raise MessageError(f"{topic}: {error}") from None
    return clean


def _extra_metrics(message: Mapping[str, Any]) -> dict[str, float]:
    extra = {key: value for key, value in message.items() if key != "v" and key not in _METRICS_REQUIRED}
    if len(extra) > MAX_EXTRA_METRICS:
        raise MessageError(f"{len(extra)} extra counters, at most {MAX_EXTRA_METRICS} allowed")
    for key in extra:
        if type(key) is not str or not _METRIC_NAME.fullmatch(key):
            raise MessageError(f"extra counter name {key!r:.40} is not lower_snake_case")
    return {key: _number(key, value) for key, value in extra.items()}

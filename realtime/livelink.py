"""What our fit means to Unreal's Live Link: the Live Link Face UDP packet (ARKit curves, head and eye angles).

Unreal's stock "Apple ARKit Face Support" plugin listens for the packets Epic's Live Link Face iPhone app
sends (UDP, port 11111 by default) and turns each into a Live Link subject with the 61 ``EARFaceBlendShape``
curves that MetaHumans and other ARKit-rigged faces read. Nothing about this packet is documented by Epic; the
layout below is the one the engine reads, as three independent public readers of it agree:

- Epic's reader, ``AppleARKitLiveLinkSource.cpp`` in the Unreal Engine source
  (Engine/Plugins/Runtime/AR/AppleAR/AppleARKitFaceSupport/Source/AppleARKitFaceSupport/Private), whose
  ``BLEND_SHAPE_PACKET_VER`` history ends at 6 and which reads the packet with Unreal's big-endian network
  archive; the README of think-biq/LLV ("Frame layout") links the exact lines and ``src/llv/gesicht.py`` there
  reads and writes version 6 packets field by field;
- JimWest/PyLiveLinkFace, ``pylivelinkface/pylivelinkface.py`` (its ``FaceBlendShape`` enum and ``decode``).

Packet (version 6), every number big-endian:

=======================  ===========================================================================
``uint8``                packet version, 6
``int32`` + UTF-8        device id (its byte length, then the bytes; no terminator)
``int32`` + UTF-8        subject name, the same way (the Live Link subject Unreal shows)
``int32 float32``        frame time: frame number and sub-frame (Unreal's ``FFrameTime``)
``int32 int32``          frame rate: numerator and denominator (``FFrameRate``)
``uint8``                number of values, 61
``float32`` x 61         ``EARFaceBlendShape`` order: the 52 ARKit shapes (:data:`LIVE_LINK_FACE_NAMES`; MediaPipe's
                         scores, EyeBlinkLeft/Right from the fitted eyelids when the model has them),
                         then HeadYaw, HeadPitch, HeadRoll, LeftEyeYaw/Pitch/Roll, RightEyeYaw/Pitch/Roll
=======================  ===========================================================================

Angles. The phone's values come from ARKit's face anchor and eye transforms through Epic's
``ToBlendShapeMap`` (``AppleARKitConversion.h``): each transform is converted to Unreal axes, read as an
``FRotator`` (degrees) and divided by 180, so -1..1 spans -180..180 degrees. We build the same transforms from our
fit, so the head and eye angles are our FLAME fit's, not MediaPipe's matrix:

- ARKit's face anchor lives in ARKit's camera space (x right, y up, z toward the viewer) with the face's own
  axes x = the face's left, y = up, z = out of the face: exactly FLAME's model axes, and ARKit's camera space is
  our glTF world (``flame_client.rig``). Our ``head_rot`` places the model in OpenCV camera space (y down, z
  forward), so the anchor's rotation is ``diag(1,-1,-1) R(head_rot)``, the identity for a head looking straight
  into the camera.
- ARKit's eye transforms are relative to the face anchor, like FLAME's eye joints: ``R(eye_pose)``.
- Unreal's axes from ARKit's: X = -z, Y = x, Z = y (Epic's conversion); a rotator's X axis image gives yaw and
  pitch, its Y and Z axes give roll (``FMatrix::Rotator``).

Epic's "mirrored" branch passes these angles and the Left/Right names through unchanged, and so do we: "Left"
is the person's own left, as in MediaPipe's names and ARKit's. MediaPipe has no ``tongueOut``; it is sent as 0.
"""

from __future__ import annotations

import math
import struct
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flame_client.messages import BLENDSHAPE_NAMES, blendshapes_with_eyelids
from flame_client.rig import GLTF_FROM_CAMERA
from flame_client.rotations import matrix_from_axis_angle

PACKET_VERSION = 6
DEFAULT_LIVELINK_PORT = 11111
DEFAULT_SUBJECT = "flame-live"
#: The frame rate written into each packet's frame time; Unreal only uses it to label the sample's time.
FRAME_RATE = 60

#: Unreal's ``EARFaceBlendShape`` order, the order of the 61 values in every packet.
LIVE_LINK_FACE_NAMES: tuple[str, ...] = (
    "EyeBlinkLeft", "EyeLookDownLeft", "EyeLookInLeft", "EyeLookOutLeft", "EyeLookUpLeft", "EyeSquintLeft",
    "EyeWideLeft", "EyeBlinkRight", "EyeLookDownRight", "EyeLookInRight", "EyeLookOutRight", "EyeLookUpRight",
    "EyeSquintRight", "EyeWideRight", "JawForward", "JawLeft", "JawRight", "JawOpen", "MouthClose", "MouthFunnel",
    "MouthPucker", "MouthLeft", "MouthRight", "MouthSmileLeft", "MouthSmileRight", "MouthFrownLeft",
    "MouthFrownRight", "MouthDimpleLeft", "MouthDimpleRight", "MouthStretchLeft", "MouthStretchRight",
    "MouthRollLower", "MouthRollUpper", "MouthShrugLower", "MouthShrugUpper", "MouthPressLeft", "MouthPressRight",
    "MouthLowerDownLeft", "MouthLowerDownRight", "MouthUpperUpLeft", "MouthUpperUpRight", "BrowDownLeft",
    "BrowDownRight", "BrowInnerUp", "BrowOuterUpLeft", "BrowOuterUpRight", "CheekPuff", "CheekSquintLeft",
    "CheekSquintRight", "NoseSneerLeft", "NoseSneerRight", "TongueOut",
    "HeadYaw", "HeadPitch", "HeadRoll", "LeftEyeYaw", "LeftEyePitch", "LeftEyeRoll",
    "RightEyeYaw", "RightEyePitch", "RightEyeRoll",
)  # fmt: skip
ARKIT_SHAPE_COUNT = 52

_NO_SOURCE = -1
#: Rows: Unreal's X, Y, Z in ARKit coordinates (X = -z, Y = x, Z = y).
_ARKIT_TO_UNREAL = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def unreal_angles(arkit_rotation: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) divided by 180 degrees, as Epic's ``ToBlendShapeMap`` reads an ARKit rotation."""
    rotation = _ARKIT_TO_UNREAL @ np.asarray(arkit_rotation, dtype=np.float64) @ _ARKIT_TO_UNREAL.T
    x_axis, y_axis, z_axis = rotation[:, 0], rotation[:, 1], rotation[:, 2]
    yaw = math.atan2(x_axis[1], x_axis[0])
    pitch = math.atan2(x_axis[2], math.hypot(x_axis[0], x_axis[1]))
    roll = math.atan2(-y_axis[2], z_axis[2])
    return yaw / math.pi, pitch / math.pi, roll / math.pi


def head_angles(head_rot: Sequence[float]) -> tuple[float, float, float]:
    """HeadYaw, HeadPitch, HeadRoll for a fitted head pose (``x_cam = R(head_rot) x_model + t``, OpenCV camera)."""
    return unreal_angles(GLTF_FROM_CAMERA @ matrix_from_axis_angle(np.asarray(head_rot, dtype=np.float64)))


def eye_angles(eye_pose: Sequence[float]) -> tuple[float, ...]:
    """Left then right eye (yaw, pitch, roll) from FLAME's ``eye_pose`` (left eye, right eye axis-angles)."""
    eyes = np.asarray(eye_pose, dtype=np.float64).reshape(2, 3)
    return unreal_angles(matrix_from_axis_angle(eyes[0])) + unreal_angles(matrix_from_axis_angle(eyes[1]))


def frame_time(t_capture: float, rate: int = FRAME_RATE) -> tuple[int, float]:
    """Frame number and sub-frame of a wall-clock time at ``rate`` frames per second, counted from UTC midnight,
    the way a timecode clock counts (an int32 frame number would overflow counting from 1970)."""
    frames = (t_capture % 86400.0) * rate
    whole = math.floor(frames)
    return whole, frames - whole


def default_device_id() -> str:
    """A device id that stays the same across runs on this machine, so Unreal keeps seeing one device."""
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"flame-live.{uuid.getnode():012x}"))


def _length_prefixed(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack(">i", len(data)) + data


class LiveLinkFaceEncoder:
    """Builds Live Link Face packets (version 6) from our ``flame.frame`` messages."""

    _TAIL = struct.Struct(f">ifiiB{len(LIVE_LINK_FACE_NAMES)}f")

    def __init__(self, subject: str = DEFAULT_SUBJECT, device_id: str | None = None) -> None:
        if not subject or len(subject.encode("utf-8")) > 255:
            raise ValueError("the Live Link subject name must have 1..255 bytes")
        self.subject = subject
        self.device_id = device_id or default_device_id()
        self._header = struct.pack(">B", PACKET_VERSION) + _length_prefixed(self.device_id) + _length_prefixed(subject)
        source_index = {name: index for index, name in enumerate(BLENDSHAPE_NAMES)}
        arkit_names = LIVE_LINK_FACE_NAMES[:ARKIT_SHAPE_COUNT]
        self._sources = [source_index.get(name[0].lower() + name[1:], _NO_SOURCE) for name in arkit_names]

    def values(self, frame_msg: Mapping[str, Any]) -> list[float]:
        """The 61 values of one frame in :data:`LIVE_LINK_FACE_NAMES` order."""
        scores = blendshapes_with_eyelids(frame_msg)
        shapes = [0.0 if index == _NO_SOURCE else min(1.0, max(0.0, scores[index])) for index in self._sources]
        return shapes + list(head_angles(frame_msg["head_rot"])) + list(eye_angles(frame_msg["eye_pose"]))

    def encode(self, frame_msg: Mapping[str, Any]) -> bytes:
        """One packet for a valid frame (invalid frames are not sent: the subject holds its last pose)."""
        frame, subframe = frame_time(frame_msg["t_capture"])
        values = self.values(frame_msg)
        return self._header + self._TAIL.pack(frame, subframe, FRAME_RATE, 1, len(values), *values)

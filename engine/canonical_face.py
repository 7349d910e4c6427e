"""MediaPipe's canonical face mesh, read from the face-geometry metadata inside ``face_landmarker.task``.

The ``.task`` file is a zip; its member ``geometry_pipeline_metadata_landmarks.binarypb`` is a protobuf
``mediapipe.face_geometry.GeometryPipelineMetadata`` (mediapipe/modules/face_geometry/protos/):

    GeometryPipelineMetadata { optional Mesh3d canonical_mesh = 1; repeated WeightedLandmarkRef basis = 2;
                               optional InputSource input_source = 3; }
    Mesh3d { optional VertexType vertex_type = 1; optional PrimitiveType primitive_type = 2;
             repeated float vertex_buffer = 3;   // x, y, z, u, v per vertex; xyz in centimetres
             repeated uint32 index_buffer = 4; } // 3 per triangle

No protobuf package is a dependency, so this module carries a minimal wire-format reader for exactly these
fields. Vertex ``i`` of the mesh is MediaPipe landmark ``i`` (0..467; the iris points 468..477 are not in it).
"""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.head_model import ModelFileError

GEOMETRY_MEMBER = "geometry_pipeline_metadata_landmarks.binarypb"
N_VERTICES = 468
N_TRIANGLES = 898

_CANONICAL_MESH_FIELD = 1
_VERTEX_BUFFER_FIELD = 3
_INDEX_BUFFER_FIELD = 4
_FLOATS_PER_VERTEX = 5  # VERTEX_PT: position xyz + texture uv

_WIRE_VARINT, _WIRE_FIXED64, _WIRE_LENGTH, _WIRE_FIXED32 = 0, 1, 2, 5


@dataclass(frozen=True)
class CanonicalFace:
    """The canonical face: MediaPipe's model space (y up, z toward the viewer), centimetres as stored."""

    vertices: np.ndarray  # (468, 3) float64, cm
    uv: np.ndarray  # (468, 2) float64, texture coordinates in [0, 1]
    triangles: np.ndarray  # (898, 3) int64 vertex indices


class _WireFormatError(ValueError):
    """The bytes are not the protobuf message we expect."""


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _WireFormatError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes) -> list[tuple[int, int, int | bytes]]:
    """Split one message into (field number, wire type, value): ints for varint/fixed, bytes for length."""
    fields: list[tuple[int, int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        value: int | bytes
        if wire_type == _WIRE_VARINT:
            value, pos = _read_varint(data, pos)
        elif wire_type == _WIRE_FIXED32:
            if pos + 4 > len(data):
                raise _WireFormatError("truncated fixed32")
            value, pos = int.from_bytes(data[pos : pos + 4], "little"), pos + 4
        elif wire_type == _WIRE_FIXED64:
            if pos + 8 > len(data):
                raise _WireFormatError("truncated fixed64")
            value, pos = int.from_bytes(data[pos : pos + 8], "little"), pos + 8
        elif wire_type == _WIRE_LENGTH:
            length, pos = _read_varint(data, pos)
            if pos + length > len(data):
                raise _WireFormatError("truncated length-delimited field")
            value, pos = data[pos : pos + length], pos + length
        else:
            raise _WireFormatError(f"unsupported wire type {wire_type}")
        fields.append((number, wire_type, value))
    return fields


def _repeated_floats(fields: list[tuple[int, int, int | bytes]], number: int) -> list[float]:
    """A ``repeated float`` field, whether the writer packed it (one bytes blob) or not (fixed32 each)."""
    out: list[float] = []
    for field_number, wire_type, value in fields:
        if field_number != number:
            continue
        if wire_type == _WIRE_FIXED32:
            out.append(struct.unpack("<f", int(value).to_bytes(4, "little"))[0])
        elif wire_type == _WIRE_LENGTH and len(value) % 4 == 0:
            out.extend(struct.unpack(f"<{len(value) // 4}f", value))
        else:
            raise _WireFormatError(f"field {number} is not a repeated float")
    return out


def _repeated_uint32(fields: list[tuple[int, int, int | bytes]], number: int) -> list[int]:
    """A ``repeated uint32`` field, packed or not."""
    out: list[int] = []
    for field_number, wire_type, value in fields:
        if field_number != number:
            continue
        if wire_type == _WIRE_VARINT:
            out.append(int(value))
        elif wire_type == _WIRE_LENGTH:
            pos = 0
            while pos < len(value):
                item, pos = _read_varint(value, pos)
                out.append(item)
        else:
            raise _WireFormatError(f"field {number} is not a repeated uint32")
    return out


def parse_geometry_metadata(data: bytes) -> CanonicalFace:
    """Decode a GeometryPipelineMetadata message into the canonical face; ValueError if malformed."""
    meshes = [
        value for number, wire, value in _fields(data) if number == _CANONICAL_MESH_FIELD and wire == _WIRE_LENGTH
    ]
    if not meshes:
        raise _WireFormatError("no canonical_mesh field")
    mesh_fields = _fields(meshes[-1])
    vertex_buffer = np.asarray(_repeated_floats(mesh_fields, _VERTEX_BUFFER_FIELD), dtype=np.float64)
    index_buffer = np.asarray(_repeated_uint32(mesh_fields, _INDEX_BUFFER_FIELD), dtype=np.int64)
    if vertex_buffer.size != N_VERTICES * _FLOATS_PER_VERTEX:
        raise _WireFormatError(f"{vertex_buffer.size} vertex floats, expected {N_VERTICES * _FLOATS_PER_VERTEX}")
    if index_buffer.size != N_TRIANGLES * 3:
        raise _WireFormatError(f"{index_buffer.size} indices, expected {N_TRIANGLES * 3}")
    if index_buffer.max() >= N_VERTICES or not np.all(np.isfinite(vertex_buffer)):
        raise _WireFormatError("indices out of range or non-finite vertices")
    per_vertex = vertex_buffer.reshape(N_VERTICES, _FLOATS_PER_VERTEX)
    return CanonicalFace(
        vertices=per_vertex[:, :3].copy(),
        uv=per_vertex[:, 3:].copy(),
        triangles=index_buffer.reshape(N_TRIANGLES, 3),
    )


def load_canonical_face(task_path: Path) -> CanonicalFace:
    """Read the canonical face mesh from a MediaPipe ``face_landmarker.task`` file.

    Raises ModelFileError (one line) when the file is missing, not a zip, or lacks a valid mesh.
    """
    task_path = Path(task_path)
    hint = "download face_landmarker.task again (see models/README.md)"
    if not task_path.is_file():
        raise ModelFileError(f"{task_path} does not exist: {hint}")
    try:
        with zipfile.ZipFile(task_path) as archive:
            data = archive.read(GEOMETRY_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        reason = f"{task_path} is not a readable MediaPipe face landmarker bundle ({exc})"
        raise ModelFileError(f"{reason}: {hint}") from None
    try:
        return parse_geometry_metadata(data)
    except _WireFormatError as exc:
        raise ModelFileError(f"{task_path}: malformed {GEOMETRY_MEMBER} ({exc}): {hint}") from None

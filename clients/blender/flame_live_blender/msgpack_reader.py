"""A small MessagePack reader (the subset flame-live writes), so the add-on reads recorded sessions by itself.

Blender ships no msgpack module and the add-on installs nothing. A session's ``frames.msgpack`` is a stream
of maps of strings, numbers, booleans, nil and arrays (``realtime/session.py``); binary data is accepted too.
Extension types do not occur and are refused. A truncated last record (a recording cut short) ends the stream
quietly, as the project's own session reader does.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

MAX_DEPTH = 32


class MsgpackError(ValueError):
    """The bytes are not MessagePack of the kinds a session holds."""


class _Truncated(Exception):
    """The data ends inside an object."""


_FIXED = {
    0xCA: struct.Struct(">f"), 0xCB: struct.Struct(">d"),
    0xCC: struct.Struct(">B"), 0xCD: struct.Struct(">H"), 0xCE: struct.Struct(">I"), 0xCF: struct.Struct(">Q"),
    0xD0: struct.Struct(">b"), 0xD1: struct.Struct(">h"), 0xD2: struct.Struct(">i"), 0xD3: struct.Struct(">q"),
}  # fmt: skip
_LENGTH = {1: struct.Struct(">B"), 2: struct.Struct(">H"), 4: struct.Struct(">I")}
# code -> (kind, bytes of its length field)
_SIZED = {
    0xD9: ("str", 1), 0xDA: ("str", 2), 0xDB: ("str", 4), 0xC4: ("bin", 1), 0xC5: ("bin", 2), 0xC6: ("bin", 4),
    0xDC: ("array", 2), 0xDD: ("array", 4), 0xDE: ("map", 2), 0xDF: ("map", 4),
}  # fmt: skip


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def take(self, size: int) -> bytes:
        end = self.offset + size
        if end > len(self.data):
            raise _Truncated
        chunk = self.data[self.offset : end]
        self.offset = end
        return chunk

    def unpack(self, layout: struct.Struct) -> object:
        return layout.unpack(self.take(layout.size))[0]

    def object(self, depth: int = 0) -> object:
        if depth > MAX_DEPTH:
            raise MsgpackError(f"objects nested deeper than {MAX_DEPTH}")
        code = self.take(1)[0]
        if code <= 0x7F:
            return code
        if code >= 0xE0:
            return code - 0x100
        if 0x80 <= code <= 0x8F:
            return self.map(code & 0x0F, depth)
        if 0x90 <= code <= 0x9F:
            return self.array(code & 0x0F, depth)
        if 0xA0 <= code <= 0xBF:
            return self.string(code & 0x1F)
        if code == 0xC0:
            return None
        if code in (0xC2, 0xC3):
            return code == 0xC3
        if code in _FIXED:
            return self.unpack(_FIXED[code])
        if code in _SIZED:
            kind, width = _SIZED[code]
            length = int(self.unpack(_LENGTH[width]))  # type: ignore[call-overload]
            if kind == "str":
                return self.string(length)
            if kind == "bin":
                return self.take(length)
            return self.array(length, depth) if kind == "array" else self.map(length, depth)
        raise MsgpackError(f"unsupported MessagePack type 0x{code:02x} at byte {self.offset - 1}")

    def string(self, length: int) -> str:
        try:
            return self.take(length).decode("utf-8")
        except UnicodeDecodeError:
            raise MsgpackError(f"a string before byte {self.offset} is not UTF-8") from None

    def array(self, length: int, depth: int) -> list[object]:
        return [self.object(depth + 1) for _ in range(length)]

    def map(self, length: int, depth: int) -> dict[object, object]:
        result: dict[object, object] = {}
        for _ in range(length):
            key = self.object(depth + 1)
            if isinstance(key, list | dict):
                raise MsgpackError(f"a map key before byte {self.offset} is not a plain value")
            result[key] = self.object(depth + 1)
        return result


def iter_objects(data: bytes) -> Iterator[object]:
    """Each top-level object in turn; stops quietly at a truncated last object."""
    reader = _Reader(data)
    while reader.offset < len(data):
        start = reader.offset
        try:
            yield reader.object()
        except _Truncated:
            reader.offset = start
            return

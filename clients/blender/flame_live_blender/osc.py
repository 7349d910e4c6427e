"""Decoding OSC 1.0 packets (messages and bundles) with the standard library, validating every byte.

Blender's Python has no OSC library and the add-on installs nothing, so this reads exactly what flame-live's
OSC publisher (``realtime/publishers.py``) writes and what any OSC 1.0 sender may send: big-endian,
4-byte aligned, NUL-terminated strings, bundles nested to a small depth. Anything else raises
:class:`OscError` with a one-line reason; nothing here blocks or allocates more than the packet's size.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

BUNDLE_TAG = b"#bundle\x00"
#: A UDP datagram is at most 65507 bytes; a larger "packet" cannot have come over UDP.
MAX_PACKET_BYTES = 65507
MAX_BUNDLE_DEPTH = 4

_INT32 = struct.Struct(">i")
_FIXED_SIZE_ARGUMENTS = {"i": ">i", "f": ">f", "d": ">d", "h": ">q", "t": ">Q", "c": ">i", "r": ">I", "m": ">I"}
_NO_DATA_ARGUMENTS = {"T": True, "F": False, "N": None, "I": float("inf")}


class OscError(ValueError):
    """The bytes are not a well-formed OSC packet; the message says where and why, in one line."""


class OscMessage(NamedTuple):
    address: str
    arguments: tuple[object, ...]


def decode_packet(packet: bytes) -> list[OscMessage]:
    """Every message of an OSC packet (a message, or a bundle flattened in order)."""
    if len(packet) > MAX_PACKET_BYTES:
        raise OscError(f"packet of {len(packet)} bytes is larger than any UDP datagram")
    messages: list[OscMessage] = []
    _decode_element(memoryview(packet), 0, messages)
    return messages


def _decode_element(data: memoryview, depth: int, messages: list[OscMessage]) -> None:
    if len(data) == 0 or len(data) % 4:
        raise OscError(f"an OSC element is {len(data)} bytes long, not a positive multiple of 4")
    if data[:8] == BUNDLE_TAG:
        _decode_bundle(data, depth, messages)
    elif data[0] == ord("/"):
        messages.append(_decode_message(data))
    else:
        raise OscError("neither an OSC message (address starting with '/') nor a bundle ('#bundle')")


def _decode_bundle(data: memoryview, depth: int, messages: list[OscMessage]) -> None:
    if depth >= MAX_BUNDLE_DEPTH:
        raise OscError(f"bundles nested deeper than {MAX_BUNDLE_DEPTH}")
    if len(data) < 16:
        raise OscError("bundle shorter than its header")
    offset = 16  # "#bundle\0" and the 64-bit time tag, which receivers of live data treat as "now"
    while offset < len(data):
        if offset + 4 > len(data):
            raise OscError("bundle ends inside an element size")
        (size,) = _INT32.unpack_from(data, offset)
        offset += 4
        if size <= 0 or size % 4 or offset + size > len(data):
            raise OscError(f"bundle element size {size} does not fit the {len(data) - offset} bytes left")
        _decode_element(data[offset : offset + size], depth + 1, messages)
        offset += size


def _read_string(data: memoryview, offset: int, what: str) -> tuple[str, int]:
    end = bytes(data[offset:]).find(b"\x00")
    if end < 0:
        raise OscError(f"{what} is not NUL-terminated")
    try:
        text = bytes(data[offset : offset + end]).decode("utf-8")
    except UnicodeDecodeError:
        raise OscError(f"{what} is not UTF-8") from None
    padded_end = offset + (end // 4 + 1) * 4
    if padded_end > len(data) or any(data[offset + end : padded_end]):
        raise OscError(f"{what} is not padded with NULs to a multiple of 4 bytes")
    return text, padded_end


def _decode_message(data: memoryview) -> OscMessage:
    address, offset = _read_string(data, 0, "address")
    if offset == len(data):
        return OscMessage(address, ())  # OSC 1.0 allows a message without a type tag string
    tags, offset = _read_string(data, offset, f"{address}: type tags")
    if not tags.startswith(","):
        raise OscError(f"{address}: type tag string does not start with ','")
    arguments: list[object] = []
    index = 1
    while index < len(tags):
        tag = tags[index]
        # A run of one fixed-size type (flame-live's float arrays) is unpacked in one call.
        run = index
        while run < len(tags) and tags[run] == tag:
            run += 1
        count = run - index
        if tag in _FIXED_SIZE_ARGUMENTS:
            layout = struct.Struct(">" + _FIXED_SIZE_ARGUMENTS[tag][1] * count)
            if offset + layout.size > len(data):
                raise OscError(f"{address}: arguments end after {len(data)} bytes, before the type tags say")
            arguments.extend(layout.unpack_from(data, offset))
            offset += layout.size
        elif tag in _NO_DATA_ARGUMENTS:
            arguments.extend([_NO_DATA_ARGUMENTS[tag]] * count)
        elif tag in ("s", "S"):
            for _ in range(count):
                text, offset = _read_string(data, offset, f"{address}: string argument")
                arguments.append(text)
        elif tag == "b":
            for _ in range(count):
                if offset + 4 > len(data):
                    raise OscError(f"{address}: blob size missing")
                (size,) = _INT32.unpack_from(data, offset)
                padded = offset + 4 + (size + 3) // 4 * 4
                if size < 0 or padded > len(data):
                    raise OscError(f"{address}: blob of {size} bytes does not fit the message")
                arguments.append(bytes(data[offset + 4 : offset + 4 + size]))
                offset = padded
        else:
            raise OscError(f"{address}: unsupported OSC type tag {tag!r}")
        index = run
    if offset != len(data):
        raise OscError(f"{address}: {len(data) - offset} bytes left over after the arguments")
    return OscMessage(address, tuple(arguments))

"""Which publishers a command drives: the --zmq, --osc and --vmc choices, parsed and opened together."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

from engine.errors import UserError
from flame_client.messages import DEFAULT_ZMQ_ADDRESS
from realtime.publishers import DEFAULT_OSC_PORT, DEFAULT_VMC_PORT, OscPublisher, Publisher, VmcPublisher, ZmqPublisher

DEFAULT_HOST = "127.0.0.1"
_HOST_PORT = re.compile(r"(?:\[(?P<ipv6>[^\]]+)\]|(?P<host>[^:\[\]]*))(?::(?P<port>[^:]*))?")


@dataclass(frozen=True)
class PublisherOptions:
    """Where to publish; None turns an output off. ZeroMQ is on by default, OSC and VMC are off."""

    zmq: str | None = DEFAULT_ZMQ_ADDRESS
    osc: tuple[str, int] | None = None
    vmc: tuple[str, int] | None = None


def parse_host_port(text: str, default_port: int, option: str) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST``, ``:PORT`` or ``[IPv6]:PORT``; a missing host is 127.0.0.1, a missing port the default."""
    match = _HOST_PORT.fullmatch(text.strip())
    port_text = match.group("port") if match else None
    if match is None or (port_text is not None and not port_text.isdigit()):
        raise UserError(f"{option} {text!r}: expected HOST:PORT, e.g. {DEFAULT_HOST}:{default_port}")
    host = match.group("ipv6") or match.group("host") or DEFAULT_HOST
    port = int(port_text) if port_text else default_port
    if not 0 < port < 65536:
        raise UserError(f"{option} {text!r}: the port must be between 1 and 65535")
    return host, port


def publisher_options(zmq: str | None, osc: str | None, vmc: str | None) -> PublisherOptions:
    """Options from the command line's strings; None turns an output off, "" (bare --vmc) means its default."""
    return PublisherOptions(
        zmq=zmq,
        osc=None if osc is None else parse_host_port(osc, DEFAULT_OSC_PORT, "--osc"),
        vmc=None if vmc is None else parse_host_port(vmc, DEFAULT_VMC_PORT, "--vmc"),
    )


def open_publishers(options: PublisherOptions) -> list[Publisher]:
    """Open every requested publisher (the caller closes them); if one fails, those already open are closed."""
    with contextlib.ExitStack() as opened:
        publishers: list[Publisher] = []
        if options.zmq is not None:
            publishers.append(opened.enter_context(ZmqPublisher(options.zmq)))
        if options.osc is not None:
            publishers.append(opened.enter_context(OscPublisher(*options.osc)))
        if options.vmc is not None:
            publishers.append(opened.enter_context(VmcPublisher(*options.vmc)))
        opened.pop_all()
        return publishers


def close_all(publishers: list[Publisher]) -> None:
    for publisher in publishers:
        publisher.close()


def dropped_messages(publishers: list[Publisher]) -> int:
    """Messages the publishers could not send at once and dropped (a slow subscriber, a full UDP buffer)."""
    return sum(getattr(publisher, "dropped", 0) for publisher in publishers)

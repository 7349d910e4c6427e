"""Which publishers a command drives: the --zmq, --osc, --vmc and --livelink choices, parsed and opened together."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.errors import UserError
from flame_client.messages import DEFAULT_ZMQ_ADDRESS
from realtime.livelink import DEFAULT_LIVELINK_PORT
from realtime.publishers import (
    DEFAULT_OSC_PORT,
    DEFAULT_VMC_PORT,
    LiveLinkPublisher,
    OscPublisher,
    Publisher,
    VmcOptions,
    VmcPublisher,
    ZmqPublisher,
)

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
_HOST_PORT = re.compile(r"(?:\[(?P<ipv6>[^\]]+)\]|(?P<host>[^:\[\]]*))(?::(?P<port>[^:]*))?")


@dataclass(frozen=True)
class PublisherOptions:
    """Where to publish; None turns an output off. ZeroMQ is on by default, OSC, VMC and Live Link are off."""

    zmq: str | None = DEFAULT_ZMQ_ADDRESS
    osc: tuple[str, int] | None = None
    vmc: tuple[str, int] | None = None
    livelink: tuple[str, int] | None = None
    vmc_avatar: VmcOptions = field(default_factory=VmcOptions)
    """How the fit drives a VMC avatar (with ``vmc``)."""


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


def publisher_options(
    zmq: str | None, osc: str | None, vmc: str | None, livelink: str | None = None
) -> PublisherOptions:
    """Options from the command line's strings; None turns an output off, "" (bare --vmc, --livelink) its default.

    Two UDP outputs aimed at one receiver port would interleave two protocols there: that is refused.
    """
    options = PublisherOptions(
        zmq=zmq,
        osc=None if osc is None else parse_host_port(osc, DEFAULT_OSC_PORT, "--osc"),
        vmc=None if vmc is None else parse_host_port(vmc, DEFAULT_VMC_PORT, "--vmc"),
        livelink=None if livelink is None else parse_host_port(livelink, DEFAULT_LIVELINK_PORT, "--livelink"),
    )
    check_distinct_ports(options)
    return options


def check_distinct_ports(options: PublisherOptions) -> None:
    """Refuse two UDP outputs aimed at one receiver port (they would interleave two protocols there)."""
    claimed: dict[tuple[str, int], str] = {}
    for option, target in (("--osc", options.osc), ("--vmc", options.vmc), ("--livelink", options.livelink)):
        if target is None:
            continue
        if target in claimed:
            raise UserError(
                f"{option}: port {target[1]} on {target[0]} is already in use by {claimed[target]}; "
                f"give each output its own port, e.g. {option} {target[0]}:{target[1] + 1}"
            )
        claimed[target] = option


def open_publishers(options: PublisherOptions) -> list[Publisher]:
    """Open every requested publisher (the caller closes them); if one fails, those already open are closed."""
    with contextlib.ExitStack() as opened:
        publishers: list[Publisher] = []
        if options.zmq is not None:
            publishers.append(opened.enter_context(ZmqPublisher(options.zmq)))
        if options.osc is not None:
            publishers.append(opened.enter_context(OscPublisher(*options.osc)))
        if options.vmc is not None:
            publishers.append(opened.enter_context(VmcPublisher(*options.vmc, options.vmc_avatar)))
        if options.livelink is not None:
            publishers.append(opened.enter_context(LiveLinkPublisher(*options.livelink)))
        opened.pop_all()
        return publishers


def close_all(publishers: list[Publisher]) -> None:
    for publisher in publishers:
        publisher.close()


def dropped_messages(publishers: list[Publisher]) -> int:
    """Messages the publishers could not send at once and dropped (a slow subscriber, a full UDP buffer)."""
    return sum(getattr(publisher, "dropped", 0) for publisher in publishers)


def wait_for_subscribers(publishers: Sequence[Publisher], wait_s: float, stop: threading.Event) -> bool:
    """Give ZeroMQ subscribers up to ``wait_s`` to subscribe, so the first message is not lost; False if none did.

    ZeroMQ drops what a PUB socket sends before a subscription has arrived ("slow joiner"): a replay, or a run
    that must account for every frame, waits here before its first message.
    """
    deadline = time.monotonic() + wait_s
    for publisher in publishers:
        if isinstance(publisher, ZmqPublisher):
            while not publisher.wait_for_subscriber(min(0.1, max(0.0, deadline - time.monotonic()))):
                if stop.is_set() or time.monotonic() >= deadline:
                    log.warning("no ZeroMQ subscriber on %s after %g s: publishing anyway", publisher.endpoint, wait_s)
                    return False
    return True

"""``flame-client``: subscribe to flame-live, validate every message, report rates and latency once a second.

    flame-client                                  listen on tcp://127.0.0.1:5555
    flame-client --address tcp://10.0.0.5:5555    another machine (the publisher must bind a reachable address)
    flame-client --plot                           also plot the parameters live
    flame-client --count 100 --timeout 5          stop after 100 messages; fail after 5 s of silence

Exit status: 0 after --count messages or Ctrl-C, 1 when --timeout passes without a valid message, 2 for a bad
argument.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from flame_client.messages import DEFAULT_ZMQ_ADDRESS, TOPIC_FRAME, TOPICS
from flame_client.plot import ParameterPlot
from flame_client.stats import ReceiveStats
from flame_client.subscriber import Subscriber, SubscriberError

_REPORT_INTERVAL_S = 1.0
_PLOT_INTERVAL_S = 0.1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flame-client",
        description="Subscribe to a flame-live stream, validate it and print rates and latency once a second.",
    )
    parser.add_argument(
        "--address", default=DEFAULT_ZMQ_ADDRESS, help=f"ZeroMQ address to subscribe to (default {DEFAULT_ZMQ_ADDRESS})"
    )
    parser.add_argument(
        "--topics", nargs="+", choices=TOPICS, default=list(TOPICS), metavar="TOPIC", help="topics (default: all)"
    )
    parser.add_argument("--count", type=int, default=None, metavar="N", help="exit after N valid messages")
    parser.add_argument(
        "--timeout", type=float, default=None, metavar="S", help="exit with status 1 after S seconds without a message"
    )
    parser.add_argument("--plot", action="store_true", help="plot head pose, expression and blendshapes live")
    parser.add_argument("--quiet", action="store_true", help="no per-second report, only the final summary")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every rejected message")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        subscriber = Subscriber(args.address, topics=args.topics, timeout_s=None)
    except SubscriberError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    stats = ReceiveStats(time.monotonic())
    try:
        return _receive(subscriber, stats, args)
    except KeyboardInterrupt:
        return 0
    finally:
        print(stats.summary(subscriber.rejected), flush=True)
        subscriber.close()


def _receive(subscriber: Subscriber, stats: ReceiveStats, args: argparse.Namespace) -> int:
    plot = ParameterPlot() if args.plot else None
    now = time.monotonic()
    last_message, next_report, next_plot = now, now + _REPORT_INTERVAL_S, now + _PLOT_INTERVAL_S
    received = 0
    while True:
        now = time.monotonic()
        if args.timeout is not None and now - last_message >= args.timeout:
            print(
                f"error: no valid message from {subscriber.address} for {args.timeout:g} s; is flame-live running "
                "and publishing there (its --zmq option)?",
                file=sys.stderr,
            )
            return 1
        wakeups = [next_report, next_plot if plot else next_report]
        if args.timeout is not None:
            wakeups.append(last_message + args.timeout)
        item = subscriber.receive(timeout_s=max(0.0, min(wakeups) - now))
        if item is not None:
            topic, message = item
            stats.add(topic, message, time.time())
            received += 1
            last_message = time.monotonic()
            if plot and topic == TOPIC_FRAME and message["valid"]:
                plot.add(message)
            if args.count is not None and received >= args.count:
                return 0
        now = time.monotonic()
        if now >= next_report:
            if not args.quiet:
                print(stats.report_line(now, subscriber.rejected), flush=True)
            next_report = now + _REPORT_INTERVAL_S
        if plot and now >= next_plot:
            if not plot.refresh():
                plot = None
            next_plot = now + _PLOT_INTERVAL_S


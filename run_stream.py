#!/usr/bin/env python3
"""flame-live: real-time FLAME head tracking.

    python run_stream.py [live] --source 0            track a webcam and stream parameters (default command)
    python run_stream.py track VIDEO --out DIR        track a recorded video, images or landmarks offline
    python run_stream.py refine SESSION_DIR           photometric refinement of a recorded session
    python run_stream.py replay SESSION_DIR           publish a recording again with its original timing
    python run_stream.py bench                        measure speed on this machine
    python run_stream.py models                       list the model files and where to get them
    python run_stream.py export --params F.npz ...    write a posed mesh as .obj or .ply

Each subcommand has its own --help. Heavy imports happen inside the handlers so that --help is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

COMMANDS = ("live", "track", "refine", "replay", "bench", "models", "export")


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--models",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder with the model files (default: $FLAME_LIVE_MODELS, else models/ beside run_stream.py)",
    )
    common.add_argument(
        "--flame",
        default=None,
        metavar="DIR|demo",
        help="FLAME model folder, or 'demo' for the demo head built from MediaPipe's canonical face "
        "(default: the models folder when it holds generic_model.pkl, else the demo head)",
    )
    common.add_argument("--device", default="auto", help="torch device: auto (CUDA when present), cpu, cuda, cuda:1")
    common.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_stream.py",
        description="Real-time FLAME head tracking: webcam/stream/video -> FLAME parameters -> ZeroMQ, OSC, VMC.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Without a subcommand, 'live' runs. See 'run_stream.py COMMAND --help'.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = _common_options()
    for add in (_add_live, _add_track, _add_refine, _add_replay, _add_bench, _add_models, _add_export):
        add(subparsers, common)
    return parser


def _add_live(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    live = subparsers.add_parser("live", parents=[common], help="track a camera, stream or file live (default)")
    live.set_defaults(handler=_run_live)


def _run_live(args: argparse.Namespace) -> int:
    raise NotImplementedError


def _add_track(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    track = subparsers.add_parser("track", parents=[common], help="track a video, image(s) or landmarks file offline")
    track.set_defaults(handler=_run_track)


def _run_track(args: argparse.Namespace) -> int:
    raise NotImplementedError


def _add_refine(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    refine = subparsers.add_parser("refine", parents=[common], help="photometric refinement of a recorded session")
    refine.set_defaults(handler=_run_refine)


def _run_refine(args: argparse.Namespace) -> int:
    raise NotImplementedError


def _add_replay(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    replay = subparsers.add_parser("replay", parents=[common], help="publish a recording again with its timing")
    replay.set_defaults(handler=_run_replay)


def _run_replay(args: argparse.Namespace) -> int:
    raise NotImplementedError


def _add_bench(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    bench = subparsers.add_parser("bench", parents=[common], help="measure speed on this machine")
    bench.set_defaults(handler=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    raise NotImplementedError


def _add_models(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    models = subparsers.add_parser("models", parents=[common], help="list model files: found, missing, where to get")
    models.set_defaults(handler=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    raise NotImplementedError


def _add_export(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    export = subparsers.add_parser("export", parents=[common], help="write a posed mesh (.obj or .ply)")
    export.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    raise NotImplementedError


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "live")
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from engine.errors import UserError

    try:
        return int(args.handler(args) or 0)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

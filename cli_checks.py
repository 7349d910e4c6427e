"""Command-line argument checks for run_stream.py: every value and output path is checked while parsing.

Each check is an argparse ``type=`` function: it returns the converted value or raises
``argparse.ArgumentTypeError`` with a message that says what is wrong and what to give instead.
:class:`CommandLineParser` prints such errors (and argparse's own) as one line and exits with status 2,
before any model loads or any frame is read. Output paths are probed for writing here too, so a read-only
or misplaced target is reported at once instead of after minutes of work.

Usage: ``parser.add_argument("--frames", type=positive_int)``, ``parser.add_argument("--out", type=output_dir)``.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
ZMQ_TCP_PATTERN = re.compile(r"tcp://(?P<host>\[[^\]]+\]|[^:/\[\]]+):(?P<port>[^:/]*)")
ZMQ_TRANSPORTS = ("tcp://", "ipc://", "inproc://", "pgm://", "epgm://", "ws://", "wss://")


class CommandLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``error: ...``) on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def _integer(text: str, wanted: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give {wanted}") from None


def _number(text: str, wanted: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give {wanted}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; give {wanted}")
    return value


def positive_int(text: str) -> int:
    """A whole number of at least 1 (frames, components, window sizes)."""
    value = _integer(text, "a whole number of at least 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; give a whole number of at least 1")
    return value


def non_negative_int(text: str) -> int:
    """A whole number of at least 0 (iteration counts)."""
    value = _integer(text, "a whole number of at least 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; give a whole number of at least 0")
    return value


def int_between(low: int, high: int) -> Callable[[str], int]:
    """A whole number in [low, high], e.g. ``type=int_between(32, 1024)`` for a crop size in pixels."""

    def check(text: str) -> int:
        value = _integer(text, f"a whole number from {low} to {high}")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range; give a whole number from {low} to {high}")
        return value

    check.__name__ = f"whole number {low}..{high}"  # argparse names the type in some messages
    return check


def positive_float(text: str) -> float:
    """A finite number above 0 (seconds, speed factors)."""
    value = _number(text, "a number above 0")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value:g} is not allowed; give a number above 0")
    return value


def float_between(low: float, high: float) -> Callable[[str], float]:
    """A finite number in [low, high], e.g. ``type=float_between(5, 150)`` for a field of view in degrees."""

    def check(text: str) -> float:
        value = _number(text, f"a number from {low:g} to {high:g}")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value:g} is out of range; give a number from {low:g} to {high:g}")
        return value

    check.__name__ = f"number {low:g}..{high:g}"
    return check


def fov_degrees(text: str) -> float:
    """A vertical field of view in degrees, in the range ``engine.camera.check_fov`` allows (the one check)."""
    from engine.camera import check_fov  # here, not at the top: --help stays instant without torch
    from engine.errors import UserError

    value = _number(text, "a field of view in degrees")
    try:
        return check_fov(value, "--fov")
    except UserError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def shard(text: str) -> tuple[int, int]:
    """``I/N`` with 0 <= I < N: this process's share of a job array (Slurm's task id and count)."""
    index, slash, count = text.partition("/")
    if not (slash and index.strip().isdigit() and count.strip().isdigit() and int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"{text!r}: give I/N with 0 <= I < N, e.g. 0/4 for the first of four shards")
    return int(index), int(count)


def port(text: str) -> int:
    """A TCP/UDP port, 1..65535."""
    value = _integer(text, "a port from 1 to 65535")
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port {value} does not exist; give a port from 1 to 65535")
    return value


def device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; a CUDA device must exist (checked only when asked for)."""
    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; give auto, cpu, cuda, cuda:N or mps")
    if text.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: PyTorch sees no CUDA GPU here; use --device cpu (or auto)")
        index = int(text.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    elif text == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError("mps: PyTorch sees no Apple GPU here; use --device cpu (or auto)")
    return text


def zmq_address(text: str) -> str:
    """A ZeroMQ bind address; ``tcp://HOST:PORT`` must name a real port (1..65535) or ``*`` for any free one."""
    if not text.startswith(ZMQ_TRANSPORTS):
        raise argparse.ArgumentTypeError(f"{text!r} is not a ZeroMQ address; give e.g. tcp://127.0.0.1:5555")
    if text.startswith("tcp://"):
        match = ZMQ_TCP_PATTERN.fullmatch(text)
        if match is None:
            raise argparse.ArgumentTypeError(f"{text!r}: expected tcp://HOST:PORT, e.g. tcp://127.0.0.1:5555")
        if match["port"] != "*":
            port(match["port"])
    return text


def flame_model(text: str) -> str:
    """``demo``, or a FLAME model file or folder that exists. What it holds is checked when it loads, before any
    frame is read; ``models --flame DIR`` lists what a folder lacks."""
    if text == "demo":
        return text
    if not Path(text).expanduser().exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or folder; give the folder holding generic_model.pkl, or 'demo'")
    return text


def existing_file(text: str) -> Path:
    """A file that exists (an input)."""
    path = Path(text).expanduser()
    if not path.is_file():
        what = "a folder, not a file" if path.is_dir() else "does not exist"
        raise argparse.ArgumentTypeError(f"{text} {what}")
    return path


def existing_path(text: str) -> Path:
    """A file or folder that exists (an input that may be either, such as a tracked sequence)."""
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    return path


def _check_writable_under(path: Path, text: str) -> None:
    """The nearest existing folder at or above ``path`` must be a folder we can create files in."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {existing} is a file, so nothing can be created under it")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise argparse.ArgumentTypeError(f"{text}: cannot write in {existing} ({reason}); choose a writable place") from None


def output_dir(text: str) -> Path:
    """A folder to write into: it may exist (as a folder) or will be created; it must be writable."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder (new or existing) for the results")
    _check_writable_under(path.absolute(), text)
    return path


def output_file(text: str) -> Path:
    """A file to write (replaced if it exists); its folder must be writable or creatable."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    absolute = path.absolute()
    _check_writable_under(absolute.parent, text)
    if absolute.exists():
        try:
            with absolute.open("r+b"):
                pass
        except OSError as error:
            raise argparse.ArgumentTypeError(f"{text} cannot be replaced ({error.strerror}); choose another file") from None
    return path


def output_file_with_suffix(*suffixes: str) -> Callable[[str], Path]:
    """:func:`output_file` whose extension must be one of ``suffixes`` (the format is chosen by it)."""

    def check(text: str) -> Path:
        if Path(text).suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(f"{text}: the format is chosen by the extension; give a name ending in {' or '.join(suffixes)}")
        return output_file(text)

    check.__name__ = "output file"
    return check

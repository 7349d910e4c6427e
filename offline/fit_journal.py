"""The per-frame fits of a running ``track`` job, kept on disk as they are made, so an interruption loses nothing.

``track`` writes each frame's file once, at the end (smoothed over the whole sequence); until then the
per-frame fits are appended to this journal: a few frames per chunk file ``fits-{first:06d}-{end:06d}.npz``
(frames ``first`` to ``end - 1``, the reference arrays stacked),
each written atomically with its fsync on :class:`FrameWriter`'s threads beside the tracking. A chunk is
handed over every :data:`CHUNK_FRAMES` frames or :data:`CHUNK_SECONDS` seconds, whichever comes first, and
leaving the ``with`` block (also on Ctrl-C) hands over the last partial one and waits for every write, so an
interrupted job keeps every frame it tracked. Reading takes the gap-free run of chunks from frame 0 (after a
crash a later chunk may exist without an earlier one).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np

from engine.frames import stack_reference, unstack_reference
from offline.frame_files import FrameWriter

CHUNK_FRAMES = 32
CHUNK_SECONDS = 0.5
_CHUNK_FILE = re.compile(r"fits-(\d{6})-(\d{6})\.npz")


def chunk_path(out_dir: Path, first: int, end: int) -> Path:
    return Path(out_dir) / f"fits-{first:06d}-{end:06d}.npz"


def is_chunk_file(name: str) -> bool:
    return _CHUNK_FILE.fullmatch(name) is not None


def _chunks(out_dir: Path) -> list[tuple[int, int, Path]]:
    """The gap-free run of chunk files from frame 0, as (first, end, path)."""
    found = {}
    if Path(out_dir).is_dir():
        for path in Path(out_dir).iterdir():
            match = _CHUNK_FILE.fullmatch(path.name)
            if match:
                found[int(match[1])] = (int(match[1]), int(match[2]), path)
    run, end = [], 0
    while end in found and found[end][1] > end:
        run.append(found[end])
        end = found[end][1]
    return run


def journaled_frames(out_dir: Path) -> int:
    """How many frames the journal in ``out_dir`` keeps (from frame 0, without a gap)."""
    chunks = _chunks(out_dir)
    return chunks[-1][1] if chunks else 0


def read_journal(out_dir: Path) -> list[dict[str, np.ndarray]]:
    """The journaled frames' reference arrays, from frame 0."""
    frames: list[dict[str, np.ndarray]] = []
    for _, _, path in _chunks(out_dir):
        with np.load(path, allow_pickle=False) as saved:
            frames += unstack_reference({key: saved[key] for key in saved.files})
    return frames


def discard_journal(out_dir: Path) -> None:
    """Delete the chunk files (once what they hold is written elsewhere, durably)."""
    for path in Path(out_dir).iterdir():
        if _CHUNK_FILE.fullmatch(path.name):
            path.unlink()


class FitJournal:
    """Appends tracked frames, from frame ``start`` on, to the journal in ``out_dir`` (a ``with`` block)."""

    def __init__(self, out_dir: Path, start: int) -> None:
        self._out_dir = Path(out_dir)
        self._first = start
        self._frames: list[dict[str, np.ndarray]] = []
        self._started = time.monotonic()
        self._writer = FrameWriter(threads=2, depth=8)

    def add(self, arrays: dict[str, np.ndarray]) -> None:
        """The next frame's reference arrays."""
        self._frames.append(arrays)
        if len(self._frames) >= CHUNK_FRAMES or time.monotonic() - self._started >= CHUNK_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Hand over the frames added since the last chunk."""
        if not self._frames:
            return
        end = self._first + len(self._frames)
        self._writer.write(chunk_path(self._out_dir, self._first, end), stack_reference(self._frames))
        self._first, self._frames, self._started = end, [], time.monotonic()

    def __enter__(self) -> FitJournal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.flush()
        finally:
            self._writer.__exit__(*exc_info)

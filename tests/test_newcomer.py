"""Issue 15, the first hour of a new user: each mistake is one clear line, exit status 2, before any work."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from newcomer_pass import MISTAKES, Mistake, prepare, run_mistake, run_stream


@pytest.fixture(scope="module")
def mistake_paths(tmp_path_factory: pytest.TempPathFactory, shared_clips: Path, landmarker_task: Path) -> Iterator[tuple[dict[str, str], Path]]:
    workdir = tmp_path_factory.mktemp("newcomer")
    yield prepare(workdir), workdir
    (workdir / "read-only").chmod(0o755)  # so that pytest can remove it


@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.name for m in MISTAKES])
def test_each_mistake_is_one_clear_line(mistake: Mistake, mistake_paths: tuple[dict[str, str], Path]) -> None:
    paths, workdir = mistake_paths
    outcome = run_mistake(mistake, paths, workdir)
    assert outcome.problems(mistake.expected) == [], outcome.stderr[-3000:]


def test_long_waits_say_what_is_happening(shared_clips: Path, landmarker_task: Path, tmp_path: Path) -> None:
    """live --refine logs each refinement; refine shows its identity fit's progress."""
    models = ("--flame", "demo", "--models", str(landmarker_task.parent))
    session = tmp_path / "session"
    # 90 frames: calibration after 2 s of video (50 frames), then keyframes for the refiner.
    live = run_stream("live", "--source", str(shared_clips / "cap13_edit2.mp4"), "--as-fast-as-possible", "--max-frames", "90",
                      "--no-zmq", "--refine", "--record", str(session), *models)  # fmt: skip
    assert live.returncode == 0, live.stderr[-3000:]
    assert "photometric refinement started" in live.stderr, live.stderr[-3000:]
    # Each finished refinement says what became of it: adopted (#N), or kept out because it fits worse.
    assert "refined identity #1 from" in live.stderr or "refined identity not adopted" in live.stderr, live.stderr[-3000:]
    refine = run_stream("refine", str(session), "--size", "64", "--iterations", "0", *models)
    assert refine.returncode == 0, refine.stderr[-3000:]
    assert "identity: " in refine.stderr, "the identity fit has a progress bar"


def test_bench_says_what_it_measures_before_it_fails(mistake_paths: tuple[dict[str, str], Path]) -> None:
    paths, workdir = mistake_paths
    faceless = next(m for m in MISTAKES if m.name == "bench --clip without a face")
    outcome = run_mistake(faceless, paths, workdir)
    assert f"bench: MediaPipe landmarks of {paths['FACELESS']} ..." in outcome.stderr

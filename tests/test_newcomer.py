"""Issue 15, the first hour of a new user: each mistake is one clear line, exit status 2, before any work."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from newcomer_pass import MISTAKES, Mistake, prepare, run_mistake


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

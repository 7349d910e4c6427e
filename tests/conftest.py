"""Shared test fixtures: where the real data lives, and skipping clearly when it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


def _shared_path(relative: str) -> Path:
    path = SHARED_DIR / relative
    if not path.exists():
        pytest.skip(f"needs {path} (the shared data folder beside the repo); absent in a fresh clone")
    return path


@pytest.fixture(scope="session")
def landmarker_task() -> Path:
    """Google's official face_landmarker.task from ../shared/models."""
    return _shared_path("models/face_landmarker.task")


@pytest.fixture(scope="session")
def shared_clips() -> Path:
    return _shared_path("data/clips")


@pytest.fixture(scope="session")
def shared_landmarks68() -> Path:
    return _shared_path("data/landmarks68")

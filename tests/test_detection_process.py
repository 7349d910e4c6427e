"""MediaPipe in its own process: the same landmarks as in this process, frames in flight in order, and clean
ends: a worker that dies is reported, a parent that dies (kill -9) or is interrupted (Ctrl-C) leaves no
worker process and no shared memory behind. Real MediaPipe on a real clip, real processes and signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from engine.head_model import ModelFileError
from engine.landmarks import FaceLandmarker, LandmarkerConfig
from engine.cpu_priority import BACKGROUND_NICENESS
from realtime.detection_process import DetectionProcess, DetectionProcessError, resized
from realtime.sources import iter_frames

REPO_ROOT = Path(__file__).resolve().parents[1]
CLIP = "bbaf2n.mpg"  # 360x288, a frontal speaker
FRAMES = 12
WAIT_S = 60.0


@pytest.fixture(scope="module")
def frames(shared_clips: Path) -> list[np.ndarray]:
    images = []
    for frame in iter_frames(str(shared_clips / CLIP)):
        images.append(frame.image)
        if len(images) == FRAMES:
            return images
    raise AssertionError(f"{CLIP} has fewer than {FRAMES} frames")


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie of a parent that has not waited counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def _wait_until_gone(pid: int) -> bool:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.1)
    return False


def test_the_worker_finds_the_same_faces_with_frames_in_flight(frames: list[np.ndarray], landmarker_task: Path) -> None:
    config = LandmarkerConfig(landmarker_task)
    with FaceLandmarker(config) as landmarker:
        expected = [landmarker.detect(image, index * 40) for index, image in enumerate(frames)]
    height, width = frames[0].shape[:2]
    with DetectionProcess(config, (height, width), slots=3) as process:
        collected = []
        for index, image in enumerate(frames):
            if process.in_flight == process.slots:
                collected.append(process.collect())
            process.submit(image, index * 40)
        with pytest.raises(RuntimeError, match="in flight"):
            process.submit(frames[0], 10_000)  # every slot is taken
        while process.in_flight:
            collected.append(process.collect())
        single = process.detect(frames[-1], FRAMES * 40)
    assert all(e is not None for e in expected), "every frame of the clip shows a face"
    for want, got in zip(expected, collected, strict=True):
        assert got.observation is not None and got.mediapipe_ms > 0 and got.idle_ms >= 0
        np.testing.assert_array_equal(got.observation.points, want.points)
        np.testing.assert_array_equal(got.observation.depth, want.depth)
        np.testing.assert_array_equal(got.observation.blendshapes, want.blendshapes)
        np.testing.assert_array_equal(got.observation.transform, want.transform)
        assert got.observation.image_size == (height, width) and got.observation.timestamp_ms == want.timestamp_ms
    assert single is not None and single.image_size == (height, width)
    assert not Path("/dev/shm", process.memory_name).exists(), "closing frees the shared memory"


def test_a_frame_resized_into_the_ring_is_detected_as_the_resized_frame(frames: list[np.ndarray], landmarker_task: Path) -> None:
    config = LandmarkerConfig(landmarker_task, running_mode="image")
    with DetectionProcess(config, (480, 640)) as process:
        seen = process.submit(frames[0], resize=True)
        np.testing.assert_array_equal(seen, resized(frames[0], (640, 480)))  # the slot, as MediaPipe sees it
        in_place = process.collect()
        copied = process.detect(resized(frames[0], (640, 480)))
    assert in_place is not None and in_place.observation is not None and copied is not None
    np.testing.assert_array_equal(in_place.observation.points, copied.points)
    assert in_place.observation.image_size == (480, 640)


def test_a_background_worker_runs_at_a_lower_priority_and_still_detects(frames: list[np.ndarray], landmarker_task: Path) -> None:
    config = LandmarkerConfig(landmarker_task, running_mode="image")
    own = os.getpriority(os.PRIO_PROCESS, 0)
    with DetectionProcess(config, frames[0].shape[:2], background=True) as background, DetectionProcess(config, frames[0].shape[:2]) as foreground:
        assert os.getpriority(os.PRIO_PROCESS, background.pid) == min(own + BACKGROUND_NICENESS, 19)
        assert os.getpriority(os.PRIO_PROCESS, foreground.pid) == own
        found = background.detect(frames[0])
    assert found is not None and found.points.shape == (478, 2)


def test_the_worker_detects_without_loading_matplotlib_or_portaudio(frames: list[np.ndarray], landmarker_task: Path) -> None:
    """MediaPipe's drawing utilities import pyplot and OpenCV, its audio package sounddevice; the worker, which
    uses none of them (nor ZeroMQ), loads none of their compiled libraries (read from the worker's memory map)."""
    with DetectionProcess(LandmarkerConfig(landmarker_task, running_mode="image"), frames[0].shape[:2]) as detector:
        assert detector.detect(frames[0]) is not None
        mapped = Path(f"/proc/{detector.pid}/maps").read_text()
    assert "mediapipe" in mapped
    assert "matplotlib" not in mapped and "cv2" not in mapped and "_cffi_backend" not in mapped  # _cffi: sounddevice's
    assert "libzmq" not in mapped  # the worker needs the schema of flame_client, not its subscriber


def test_deferred_drawing_modules_load_on_first_use() -> None:
    """After :func:`defer_unused_imports`, MediaPipe imports without matplotlib or sounddevice, and pyplot
    still works through the name it was imported under (a fresh interpreter, real matplotlib)."""
    code = textwrap.dedent("""
        import sys
        from realtime.detection_process import defer_unused_imports
        defer_unused_imports()
        from mediapipe.tasks.python import vision
        from mediapipe.tasks.python.vision import drawing_utils
        print(type(sys.modules["matplotlib.pyplot"]).__name__, "matplotlib._path" in sys.modules, type(sys.modules["sounddevice"]).__name__)
        figure = drawing_utils.plt.figure()
        print(type(figure).__name__, type(sys.modules["matplotlib.pyplot"]).__name__, sys.modules["matplotlib"].__version__ > "")
    """)
    environment = {**os.environ, "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=WAIT_S)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["_DeferredModule", "False", "_DeferredModule", "Figure", "module", "True"]


def test_an_image_of_another_size_or_type_is_refused(frames: list[np.ndarray], landmarker_task: Path) -> None:
    with DetectionProcess(LandmarkerConfig(landmarker_task, running_mode="image"), (480, 640)) as process:
        with pytest.raises(ValueError, match="takes 640x480 images, not 360x288"):
            process.submit(frames[0])
        with pytest.raises(ValueError, match="uint8 RGB"):
            process.submit(np.zeros((480, 640), np.uint8))
        assert process.in_flight == 0 and process.detect(np.zeros((480, 640, 3), np.uint8)) is None


def test_a_worker_that_dies_is_reported_not_waited_for(frames: list[np.ndarray], landmarker_task: Path) -> None:
    process = DetectionProcess(LandmarkerConfig(landmarker_task), frames[0].shape[:2])
    try:
        assert process.detect(frames[0], 0) is not None
        os.kill(process.pid, signal.SIGKILL)
        assert _wait_until_gone(process.pid)
        with pytest.raises(DetectionProcessError, match="ended unexpectedly"):
            process.submit(frames[1], 40)
            process.collect()
    finally:
        process.close()
    assert not Path("/dev/shm", process.memory_name).exists()


def test_an_unusable_model_is_one_line_error(tmp_path: Path) -> None:
    broken = tmp_path / "face_landmarker.task"
    broken.write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="not a usable MediaPipe face landmarker model"):
        DetectionProcess(LandmarkerConfig(broken), (64, 64))


PARENT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from pathlib import Path
    from engine.landmarks import LandmarkerConfig
    from realtime.detection_process import DetectionProcess

    with DetectionProcess(LandmarkerConfig(Path(sys.argv[1])), (96, 128)) as process:
        print(process.pid, process.memory_name, flush=True)
        try:
            while True:
                process.detect(np.zeros((96, 128, 3), np.uint8))
                time.sleep(0.01)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
    """
)


@pytest.mark.parametrize("how", ["kill -9", "Ctrl-C"])
def test_the_worker_never_outlives_its_parent(how: str, landmarker_task: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(landmarker_task)], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        worker_pid, memory_name = parent.stdout.readline().split()
        worker_pid = int(worker_pid)
        assert not _gone(worker_pid) and Path("/dev/shm", memory_name).exists()
        time.sleep(0.5)  # a few detections in flight
        if how == "kill -9":
            parent.kill()
        else:
            os.killpg(parent.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the parent's whole process group
        stdout, stderr = parent.communicate(timeout=WAIT_S)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert _wait_until_gone(worker_pid), f"the detection worker outlived its parent ({how})"
    if how == "Ctrl-C":
        assert parent.returncode == 0 and "interrupted" in stdout and "Traceback" not in stderr
        assert not Path("/dev/shm", memory_name).exists(), "the parent freed the shared memory"
    else:  # Python's resource tracker frees what a killed parent left
        deadline = time.monotonic() + WAIT_S
        while Path("/dev/shm", memory_name).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path("/dev/shm", memory_name).exists(), "the killed parent's shared memory was freed"

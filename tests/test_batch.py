"""`batch` as a user runs it, with the local engines on landmark files: results equal to `track`, failures
isolated, shards, names, interruption and resumption, bad input in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.assets import load_flame
from engine.flame import FlameLayer
from engine.synthetic import SyntheticMotion, synthetic_sequence

REPO = Path(__file__).resolve().parents[1]
MODEL_OPTIONS = ("--n-shape", "20", "--n-exp", "10")


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "run_stream.py"), *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)


def write_landmarks(path: Path, layer: FlameLayer, frames: int, seed: int) -> Path:
    sequence = synthetic_sequence(layer, SyntheticMotion(frames=frames, seed=seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mp478=sequence.mp478, lmk68=sequence.lmk68, image_size=np.array([512, 512]), fps=25.0)
    return path


@pytest.fixture(scope="module")
def layer(flame_dir: Path) -> FlameLayer:
    return FlameLayer(load_flame(flame_dir, n_shape=20, n_exp=10), 20, 10)


@pytest.fixture(scope="module")
def inputs(layer: FlameLayer, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Five short landmark files, one of them corrupt."""
    folder = tmp_path_factory.mktemp("inputs")
    paths = [write_landmarks(folder / f"take{index}.npz", layer, frames=10, seed=index) for index in range(4)]
    corrupt = folder / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip archive")
    return [*paths[:2], corrupt, *paths[2:]]


def batch(flame_dir: Path, root: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_cli("batch", *args, "--out", str(root), "--flame", str(flame_dir), *MODEL_OPTIONS, timeout=timeout)


def frame_arrays(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    arrays = {}
    for path in sorted(folder.glob("*.npz")):
        with np.load(path) as data:
            arrays[path.name] = {key: data[key] for key in data.files}
    return arrays


def summary(root: Path) -> dict[str, dict]:
    return {line["name"]: line for line in json.loads((root / "summary.json").read_text())["inputs"]}


def test_batch_equals_track_and_a_corrupt_input_fails_alone(flame_dir: Path, inputs: list[Path], tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = batch(flame_dir, root, *map(str, inputs), "--jobs", "2")
    assert result.returncode == 1, result.stderr
    lines = summary(root)
    assert [lines[name]["status"] for name in ("take0", "take1", "corrupt", "take2", "take3")] == ["done", "done", "failed", "done", "done"]
    assert "corrupt.npz is not a readable .npz landmarks file" in lines["corrupt"]["reason"]
    assert lines["take0"]["frames"] == 10 and lines["take0"]["valid_fraction"] == 1.0
    assert "corrupt" in result.stdout and "4 done" in result.stdout and "1 failed" in result.stdout

    single = tmp_path / "single"
    tracked = run_cli("track", str(inputs[0]), "--out", str(single), "--flame", str(flame_dir), *MODEL_OPTIONS)
    assert tracked.returncode == 0, tracked.stderr
    assert sorted(p.name for p in (root / "take0").iterdir()) == sorted(p.name for p in single.iterdir())
    expected, got = frame_arrays(single), frame_arrays(root / "take0")
    assert expected.keys() == got.keys() and sum(name[:6].isdigit() for name in expected) == 10
    for name, arrays in expected.items():
        assert arrays.keys() == got[name].keys()
        for key, value in arrays.items():
            np.testing.assert_array_equal(got[name][key], value, err_msg=f"{name}: {key}")

    again = batch(flame_dir, root, *map(str, inputs), "--jobs", "1")
    assert again.returncode == 1
    assert "4 of 5 inputs are already complete and skipped" in again.stdout
    assert summary(root)["take0"]["status"] == "skipped" and summary(root)["corrupt"]["status"] == "failed"


def test_shards_together_cover_every_input_once(flame_dir: Path, inputs: list[Path], tmp_path: Path) -> None:
    root = tmp_path / "root"
    good = [str(path) for path in inputs if path.name != "corrupt.npz"]
    listing = tmp_path / "inputs.txt"
    listing.write_text("# the takes of the day\n" + "\n".join(good) + "\n\n")
    processed = []
    for index in range(2):
        result = batch(flame_dir, root, str(listing), "--shard", f"{index}/2", "--jobs", "1")
        assert result.returncode == 0, result.stderr
        rows = [line.split()[0] for line in result.stdout.splitlines() if " done " in line]
        processed.append(rows)
    assert sorted(processed[0] + processed[1]) == ["take0", "take1", "take2", "take3"]
    assert not set(processed[0]) & set(processed[1])
    assert {line["status"] for line in summary(root).values()} == {"done", "skipped"}  # the last shard sees them all
    finished = batch(flame_dir, root, str(listing), "--jobs", "1")
    assert finished.returncode == 0 and "all 4 inputs are already complete" in finished.stdout


def test_inputs_with_the_same_name_never_share_a_folder(flame_dir: Path, layer: FlameLayer, tmp_path: Path) -> None:
    first, second, third = (write_landmarks(tmp_path / folder / "take.npz", layer, frames=6, seed=seed) for seed, folder in enumerate("abc"))
    root = tmp_path / "root"
    result = batch(flame_dir, root, str(first), str(second), "--jobs", "1")
    assert result.returncode == 0, result.stderr
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != ".batch")
    assert len(folders) == 2 and folders[0] == "take" and folders[1].startswith("take-")
    assert summary(root)["take"]["source"] == str(first.resolve())
    before = (root / "take" / "tracking.npz").read_bytes()
    # A folder 'track' wrote for this very input is the batch's to continue or skip, under its plain name.
    tracked = run_cli("track", str(third), "--out", str(tmp_path / "own" / "take"), "--flame", str(flame_dir), *MODEL_OPTIONS)
    assert tracked.returncode == 0, tracked.stderr
    adopted = batch(flame_dir, tmp_path / "own", str(third), "--dry-run")
    assert adopted.returncode == 0 and adopted.stdout.startswith("take\t"), adopted.stdout
    # A later batch into the same root with another 'take' gets its own folder too.
    plan = batch(flame_dir, root, str(third), "--dry-run")
    assert plan.returncode == 0 and plan.stdout.startswith("take-"), plan.stdout
    assert (root / "take" / "tracking.npz").read_bytes() == before


def test_an_input_listed_twice_runs_once(flame_dir: Path, inputs: list[Path], tmp_path: Path) -> None:
    result = batch(flame_dir, tmp_path / "root", str(inputs[0]), str(inputs[0].parent / ".." / inputs[0].parent.name / inputs[0].name), "--dry-run")
    assert result.returncode == 0
    assert "listed more than once" in result.stderr and "1 of 1 inputs" in result.stdout


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["EMPTY_LIST"], "names no inputs"),
        (["/no/such/video.mp4"], "does not exist"),
        (["/no/such/*.mp4"], "matches nothing"),
        (["INPUT", "--out-is-a-file"], "is a file"),
        (["INPUT", "--shard", "2/2"], "0 <= I < N"),
        (["INPUT", "--jobs", "0"], "at least 1"),
    ],
)
def test_bad_input_is_one_line(flame_dir: Path, inputs: list[Path], tmp_path: Path, arguments: list[str], message: str) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n")
    root = tmp_path / "root"
    if "--out-is-a-file" in arguments:
        root.write_text("not a folder")
        arguments = [a for a in arguments if a != "--out-is-a-file"]
    arguments = [str(empty) if a == "EMPTY_LIST" else str(inputs[0]) if a == "INPUT" else a for a in arguments]
    result = batch(flame_dir, root, *arguments)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("stop", "jobs"), [(signal.SIGINT, "2"), (signal.SIGKILL, "1")], ids=["sigint-pool", "sigkill-inline"])
def test_an_interrupted_batch_resumes_and_leaves_no_half_written_file(
    flame_dir: Path, layer: FlameLayer, tmp_path: Path, stop: signal.Signals, jobs: str
) -> None:
    # The first input is short and the rest long, so that the two pool workers never finish together: the signal
    # lands while one input still runs and the last is still queued, however fast tracking is.
    lengths = {f"long{index}": frames for index, frames in enumerate((120, 480, 480, 480))}
    takes = [write_landmarks(tmp_path / "in" / f"{name}.npz", layer, frames=frames, seed=index)
             for index, (name, frames) in enumerate(lengths.items())]  # fmt: skip
    root = tmp_path / "root"
    command = [sys.executable, str(REPO / "run_stream.py"), "batch", *map(str, takes), "--out", str(root), "--flame", str(flame_dir), *MODEL_OPTIONS, "--jobs", jobs]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not any('"done"' in p.read_text() for p in (root / ".batch").glob("*.json") if p.is_file()):
        assert process.poll() is None and time.monotonic() < deadline, "the batch ended before it could be interrupted"
        time.sleep(0.05)
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == (130 if stop == signal.SIGINT else -signal.SIGKILL), stderr
    assert "Traceback" not in stderr
    done_first = {p.stem for p in (root / ".batch").glob("*.json") if '"done"' in p.read_text()}
    assert 1 <= len(done_first) < 4, "the interruption should have come mid-way"
    if stop == signal.SIGINT:
        assert {line["status"] for line in summary(root).values()} >= {"done", "pending"}
    for path in root.rglob("*.npz"):
        np.load(path).close()  # complete files only, under their final names
    for path in root.rglob("*.json"):
        json.loads(path.read_text())

    result = run_cli(*command[2:])
    assert result.returncode == 0, result.stderr
    lines = summary(root)
    assert {name for name, line in lines.items() if line["status"] == "skipped"} == done_first
    assert all(line["status"] in ("done", "skipped") and line["frames"] == lengths[name] for name, line in lines.items())


def test_a_recorded_session_is_tracked_as_its_video(shared_clips: Path, landmarker_task: Path, tmp_path: Path) -> None:
    from realtime.recorder import SessionRecorder
    from realtime.sources import iter_frames

    session = tmp_path / "take-monday"
    with SessionRecorder(session, 25.0, (360, 288), {"camera": {"fov_deg": 40.0}}) as recorder:
        for frame in iter_frames(str(shared_clips / "bbaf2n.mpg")):
            if frame.index == 12:
                break
            recorder.write(frame, "flame.status", {"index": frame.index})
    model = ("--flame", "demo", "--models", str(landmarker_task.parent))
    root = tmp_path / "root"
    result = run_cli("batch", str(session), "--out", str(root), *model, "--jobs", "1")
    assert result.returncode == 0, result.stderr
    single = tmp_path / "single"
    assert run_cli("track", str(session / "video.mkv"), "--out", str(single), *model).returncode == 0
    expected, got = frame_arrays(single), frame_arrays(root / "take-monday")
    assert expected.keys() == got.keys() and sum(name[:6].isdigit() for name in expected) == 12
    for name, arrays in expected.items():
        for key, value in arrays.items():
            np.testing.assert_array_equal(got[name][key], value, err_msg=f"{name}: {key}")


def test_refine_and_render_write_what_track_photometric_render_writes(shared_clips: Path, landmarker_task: Path, tmp_path: Path) -> None:
    import av
    import cv2

    from realtime.sources import iter_frames

    images = tmp_path / "stills"
    images.mkdir()
    for frame in iter_frames(str(shared_clips / "bbaf2n.mpg")):
        if frame.index == 10:
            break
        cv2.imwrite(str(images / f"{frame.index:03d}.png"), cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR))
    options = ("--flame", "demo", "--models", str(landmarker_task.parent), "--size", "64", "--iterations", "1", "--window", "4")
    root = tmp_path / "root"
    result = run_cli("batch", str(images), "--out", str(root), "--refine", "--render", *options, "--jobs", "1")
    assert result.returncode == 0, result.stderr
    single = tmp_path / "single"
    assert run_cli("track", str(images), "--out", str(single), "--photometric", "--render", *options).returncode == 0
    for folder in ("", "photometric"):
        assert sorted(p.name for p in (root / "stills" / folder).iterdir()) == sorted(p.name for p in (single / folder).iterdir())
        with av.open(str(root / "stills" / folder / "overlay.mp4")) as video:
            assert sum(1 for _ in video.decode(video=0)) == 10
        expected, got = frame_arrays(single / folder), frame_arrays(root / "stills" / folder)
        assert expected.keys() == got.keys() and sum(name[:6].isdigit() for name in expected) == 10
        for name, arrays in expected.items():
            for key, value in arrays.items():
                np.testing.assert_array_equal(got[name][key], value, err_msg=f"{folder}/{name}: {key}")
    again = run_cli("batch", str(images), "--out", str(root), "--refine", "--render", *options)
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_a_worker_that_dies_takes_no_input_down_with_it(flame_dir: Path, layer: FlameLayer, tmp_path: Path) -> None:
    """The OOM killer or a crash in a native library ends a pool worker mid-input: the batch still finishes."""
    takes = [write_landmarks(tmp_path / "in" / f"long{index}.npz", layer, frames=60, seed=index) for index in range(4)]
    root = tmp_path / "root"
    command = [sys.executable, str(REPO / "run_stream.py"), "batch", *map(str, takes), "--out", str(root), "--flame", str(flame_dir), *MODEL_OPTIONS, "--jobs", "2"]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not any('"running"' in p.read_text() for p in (root / ".batch").glob("*.json") if p.is_file()):
        assert process.poll() is None and time.monotonic() < deadline, "the batch ended before a worker could be killed"
        time.sleep(0.05)
    workers = [pid for pid in _children(process.pid) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert workers
    os.kill(workers[0], signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert "a worker process died" in stderr
    assert all(line["status"] == "done" and line["frames"] == 60 for line in summary(root).values())


def _children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children

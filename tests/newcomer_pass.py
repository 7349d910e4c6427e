"""The newcomer pass: the mistakes a new user made in their first hour (issue 15), each run as they ran it.

Every mistake must end in exactly one ``error: ...`` line on stderr that names the problem, exit status 2,
no traceback and no MediaPipe/TFLite start-up noise. ``tests/test_newcomer.py`` runs each one as a test;
run this file directly for the pass itself, one line per mistake::

    python tests/newcomer_pass.py          # exit status 1 when any mistake is not reported as it should be

Needs ``../shared`` (real clips and MediaPipe's model) beside the repository, as the tests do.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CLIP = SHARED / "data" / "clips" / "bbaf2n.mpg"
PORTRAITS = SHARED / "data" / "landmarks68"
#: What MediaPipe and TFLite print on the C-level stderr when they start, unless silenced.
NOISE = ("InitGoogle", "XNNPACK", "inference_feedback_manager", "face_landmarker_graph", "W0000", "I0000")


@dataclass(frozen=True)
class Mistake:
    name: str
    args: tuple[str, ...]  # run_stream.py arguments; UPPER-CASE words are replaced by paths from prepare()
    expected: str  # part of the one error line


MISTAKES: tuple[Mistake, ...] = (
    Mistake("negative --n-shape", ("track", "CLIP", "--out", "NEW", "--n-shape", "-5"), "--n-shape"),
    Mistake("bench --frames 0", ("bench", "--frames", "0"), "--frames"),
    Mistake("bench --frames -5", ("bench", "--frames", "-5"), "--frames"),
    Mistake("bench --clip without a face", ("bench", "--clip", "FACELESS", "--frames", "5", "--models", "MODELS"), "no face"),
    Mistake("--device banana", ("track", "CLIP", "--out", "NEW", "--device", "banana"), "--device"),
    Mistake("--device cuda without CUDA", ("track", "CLIP", "--out", "NEW", "--device", "cuda:99"), "--device"),
    Mistake("track --photometric --size 0", ("track", "CLIP", "--out", "NEW", "--photometric", "--size", "0"), "--size"),
    Mistake("--flame folder without FLAME", ("track", "CLIP", "--out", "NEW", "--flame", "EMPTY"), "no FLAME model in"),
    Mistake("--flame folder with a damaged model", ("track", "CLIP", "--out", "NEW", "--flame", "DAMAGED_FLAME"), "generic_model.pkl"),
    Mistake("--flame folder that does not exist", ("track", "CLIP", "--out", "NEW", "--flame", "MISSING"), "--flame"),
    # As `python run_stream.py` without a camera (camera 0); index 9 so that a machine with a webcam fails the same way.
    Mistake("live without a camera", ("--source", "9"), "--source VIDEO"),
    Mistake("--zmq port 99999", ("live", "--source", "CLIP", "--zmq", "tcp://127.0.0.1:99999"), "--zmq"),
    Mistake("track --out an existing file", ("track", "CLIP", "--out", "FILE"), "is a file"),
    Mistake("track --out read-only", ("track", "CLIP", "--out", "READ_ONLY/out"), "cannot write"),
    Mistake("refine --out read-only", ("refine", "EMPTY", "--out", "READ_ONLY/out"), "cannot write"),
    Mistake("refine --out an existing file", ("refine", "EMPTY", "--out", "FILE"), "is a file"),
    Mistake("export --out read-only", ("export", "--params", "FILE", "--out", "READ_ONLY/mesh.obj"), "cannot write"),
    Mistake("bench --json read-only", ("bench", "--json", "READ_ONLY/bench.json"), "cannot write"),
    Mistake("live --record read-only", ("live", "--source", "CLIP", "--record", "READ_ONLY/session"), "cannot write"),
    Mistake("track --out holding another input", ("track", "CLIP", "--out", "DEMO_RESULT", "--models", "MODELS"), "--overwrite"),
    Mistake("image folder of mixed sizes", ("track", "MIXED", "--out", "NEW", "--models", "MODELS"), "one camera"),
    Mistake("export with another model", ("export", "--params", "DEMO_RESULT/000000.npz", "--flame", "FLAME", "--out", "NEW.obj"), "another model"),
)


def read_only_folder(workdir: Path) -> Path:
    """A folder nobody can create files in: chmod 555, or /sys where that does not stop us (root)."""
    folder = workdir / "read-only"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            with tempfile.TemporaryFile(dir=candidate):
                pass
        except OSError:
            return candidate
    raise RuntimeError("no read-only folder available on this machine (root without /sys)")


def write_faceless_video(path: Path, frames: int = 10) -> Path:
    """A short grey H.264 video: a valid video in which no face can be found."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
        for _ in range(frames):
            image = av.VideoFrame.from_ndarray(np.full((96, 128, 3), 128, np.uint8), format="rgb24")
            container.mux(stream.encode(image))
        container.mux(stream.encode(None))
    return path


def write_mixed_size_folder(folder: Path) -> Path:
    """Two real portraits of different sizes in one image folder."""
    folder.mkdir(exist_ok=True)
    for name in ("takeo.ppm", "einstein.jpg"):
        image = cv2.imread(str(PORTRAITS / name))
        assert cv2.imwrite(str(folder / f"{Path(name).stem}.png"), image)
    return folder


def track_demo_result(out: Path) -> Path:
    """A real result of ``track`` with the demo head: one portrait."""
    result = run_stream("track", str(PORTRAITS / "takeo.ppm"), "--out", str(out), "--flame", "demo", "--models", str(SHARED / "models"))
    assert result.returncode == 0, result.stderr
    return out


def prepare(workdir: Path) -> dict[str, str]:
    """The files the mistakes refer to, created in ``workdir``."""
    from flame_fixtures import write_flame_folder

    (workdir / "empty").mkdir(exist_ok=True)
    (workdir / "existing.txt").write_text("an existing file\n")
    (workdir / "damaged-flame").mkdir(exist_ok=True)
    (workdir / "damaged-flame" / "generic_model.pkl").write_bytes(b"\x80\x02 cut off by a failed download")
    return {
        "FLAME": str(write_flame_folder(workdir / "flame")),
        "DEMO_RESULT": str(track_demo_result(workdir / "demo-result")),
        "CLIP": str(CLIP),
        "MODELS": str(SHARED / "models"),
        "NEW": str(workdir / "new-output"),
        "NEW.obj": str(workdir / "new-mesh.obj"),
        "EMPTY": str(workdir / "empty"),
        "MISSING": str(workdir / "no-such-folder"),
        "DAMAGED_FLAME": str(workdir / "damaged-flame"),
        "FILE": str(workdir / "existing.txt"),
        "READ_ONLY": str(read_only_folder(workdir)),
        "FACELESS": str(write_faceless_video(workdir / "faceless.mp4")),
        "MIXED": str(write_mixed_size_folder(workdir / "mixed")),
    }


@dataclass(frozen=True)
class Outcome:
    returncode: int
    error_lines: list[str]
    stderr: str

    def problems(self, expected: str) -> list[str]:
        """What is wrong with how the mistake was reported; empty when it was reported well."""
        found = []
        if self.returncode != 2:
            found.append(f"exit status {self.returncode}, expected 2")
        if "Traceback" in self.stderr:
            found.append("a traceback")
        if len(self.error_lines) != 1:
            found.append(f"{len(self.error_lines)} error lines")
        elif expected not in self.error_lines[0]:
            found.append(f"the error does not mention {expected!r}")
        noise = [marker for marker in NOISE if marker in self.stderr]
        if noise:
            found.append(f"start-up noise ({', '.join(noise)})")
        return found


def run_stream(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python run_stream.py ARGS`` as a user runs it."""
    env = {key: value for key, value in os.environ.items() if key not in ("DISPLAY", "WAYLAND_DISPLAY")}
    return subprocess.run([sys.executable, str(REPO / "run_stream.py"), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def run_mistake(mistake: Mistake, paths: dict[str, str], cwd: Path) -> Outcome:
    args = [paths.get(arg, arg) for arg in mistake.args]
    args = [paths[arg.split("/")[0]] + arg[arg.index("/"):] if "/" in arg and arg.split("/")[0] in paths else arg for arg in args]
    result = run_stream(*args, cwd=cwd)
    lines = result.stderr.replace("\r", "\n").splitlines()
    return Outcome(result.returncode, [line for line in lines if line.startswith("error:")], result.stderr)


def main() -> int:
    if not SHARED.is_dir():
        print(f"needs {SHARED} (the shared data folder beside the repo)")
        return 1
    failures = 0
    with tempfile.TemporaryDirectory() as temporary:
        workdir = Path(temporary)
        paths = prepare(workdir)
        for mistake in MISTAKES:
            outcome = run_mistake(mistake, paths, workdir)
            problems = outcome.problems(mistake.expected)
            failures += bool(problems)
            said = f"FAIL ({'; '.join(problems)})" if problems else outcome.error_lines[0]
            print(f"{mistake.name}: {said}")
        (workdir / "read-only").chmod(0o755)
    print(f"{len(MISTAKES) - failures}/{len(MISTAKES)} mistakes reported in one line")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

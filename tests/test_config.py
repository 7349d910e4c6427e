"""Configuration files as a user writes them: dump, edit, run with --config, read the result's record, run again.

Real TOML files and real command-line runs (the demo head on a synthetic landmarks file); the error cases must
end in one line naming the file and the key, exit status 2, before any output is made.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from command_configs import COMMAND_CONFIGS, LiveCommandConfig, TrackCommandConfig
from engine.config import apply, dump_toml, read_tree, resolve, to_tree
from engine.errors import UserError

REPO = Path(__file__).resolve().parents[1]
#: MediaPipe's model, which the demo head is built from (tests that use it skip through the landmarker_task fixture).
MODELS = REPO.parent / "shared" / "models"
FRAMES = 12


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "run_stream.py"), *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def landmarks(landmarker_task: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic landmarks file of the demo head (12 frames, 512x512)."""
    from engine.flame import FlameLayer
    from engine.model_selection import select_head_model
    from engine.synthetic import SyntheticMotion, synthetic_sequence

    head = select_head_model("demo", MODELS)
    sequence = synthetic_sequence(FlameLayer(head, head.n_shape, head.n_exp), SyntheticMotion(frames=FRAMES, seed=4))
    path = tmp_path_factory.mktemp("config") / "landmarks.npz"
    np.savez(path, mp478=sequence.mp478, image_size=np.array([512, 512]), fps=25.0)
    return path


def track(landmarks: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    return run_cli("track", str(landmarks), "--out", str(out), "--flame", "demo", "--models", str(MODELS), *options)


@pytest.mark.parametrize("command", sorted(COMMAND_CONFIGS))
def test_the_dumped_defaults_read_back_as_the_defaults(command: str, tmp_path: Path) -> None:
    result = run_cli("config", command)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "defaults.toml"
    path.write_text(result.stdout)
    default = COMMAND_CONFIGS[command]()
    assert resolve(default, path) == default
    assert tomllib.loads(result.stdout) == tomllib.loads(dump_toml(default))
    if command == "track":  # each key under the comment its source gives it
        lines = result.stdout.splitlines()
        assert lines[lines.index("fit_fov = true") - 1].startswith("# Estimate the field of view")


def test_a_file_sets_nested_values_and_the_command_line_overrides_it(tmp_path: Path) -> None:
    path = tmp_path / "my.toml"
    path.write_text(
        '[tracker]\nn_exp = 30\nfov_deg = 40.0\nwarm_start = "previous"\n'
        "[tracker.fit.priors]\njaw = [1.0, 100.0, 100.0]\n[tracker.fit.group_weights]\neyes = 4.0\n"
        '[tracker.output_filter]\nbeta = 0.1\n[smoothing]\nstrength = 5\n[refine.photometric]\nsize = 96\n'
    )  # fmt: skip
    config = resolve(TrackCommandConfig(), path, {"tracker.n_exp": 20, "tracker.n_shape": None})
    assert config.tracker.n_exp == 20 and config.tracker.n_shape == 100  # option over file; None: not given
    assert config.tracker.fov_deg == 40.0 and config.tracker.warm_start == "previous"
    assert config.tracker.fit.priors.jaw == (1.0, 100.0, 100.0) and config.tracker.fit.priors.shape == 1.0
    assert config.tracker.fit.group_weights == {"lmk68": 1.0, "mediapipe": 0.5, "eyes": 4.0}
    assert config.tracker.output_filter.beta == 0.1 and config.tracker.output_filter.min_cutoff == 1.5
    assert config.smoothing.strength == 5.0 and isinstance(config.smoothing.strength, float)
    assert config.refine.photometric.size == 96
    # "none" switches an optional value off; the live tree's filter is on by default.
    off = tmp_path / "off.toml"
    off.write_text('[tracker]\noutput_filter = "none"\n[publishers]\nzmq = "none"\nosc = ["127.0.0.1", 9100]\n')
    live = resolve(LiveCommandConfig(), off)
    assert live.tracker.output_filter is None and live.publishers.zmq is None and live.publishers.osc == ("127.0.0.1", 9100)
    assert apply(LiveCommandConfig(), to_tree(live), "tree") == live
    # Numbers are not negative unless their annotation allows it: a VMC bone may sit below its parent.
    avatar = tmp_path / "avatar.toml"
    avatar.write_text("[publishers.vmc_avatar]\nneck_position = [0.0, -0.05, 0.01]\n[live.refiner.photometric]\nsize = 256\n")
    live = resolve(LiveCommandConfig(), avatar)
    assert live.publishers.vmc_avatar.neck_position == (0.0, -0.05, 0.01) and live.live.refiner.photometric.size == 256
    avatar.write_text("[publishers.vmc_avatar]\nneck_share = 1.5\n")
    with pytest.raises(UserError, match="'publishers.vmc_avatar.neck_share' = 1.5 is out of range; give a number from 0 to 1"):
        resolve(LiveCommandConfig(), avatar)


@pytest.mark.parametrize(
    "content, message",
    [
        ("[tracker.fit.priors]\nexpp = 3\n", "unknown key 'tracker.fit.priors.expp' in [tracker.fit.priors]; the keys there are: shape, exp,"),
        ("[trackr]\nn_shape = 3\n", "unknown key 'trackr'; the keys there are: tracker, smoothing, refine"),
        ('[tracker]\nn_shape = "many"\n', "'tracker.n_shape' = \"many\" must be a whole number"),
        ("[tracker]\nn_shape = 2.5\n", "'tracker.n_shape' = 2.5 must be a whole number"),
        ("[tracker]\nfov_deg = 200\n", "'tracker.fov_deg' = 200 is out of range; give a number from 5 to 150"),
        ("[tracker.fit.temporal]\nexp = -1.0\n", "'tracker.fit.temporal.exp' = -1 is out of range; give a number of at least 0"),
        ("[tracker.fit.priors]\njaw = [1.0, 2.0]\n", "'tracker.fit.priors.jaw' has 2 values; give 3"),
        ('[tracker]\nwarm_start = "fast"\n', "'tracker.warm_start' = \"fast\": choose one of \"velocity\", \"previous\", \"none\""),
        ("[tracker]\nfit = 3\n", "'tracker.fit' is a table ([tracker.fit]), not a single value"),
        ("[tracker.n_shape]\nx = 1\n", "'tracker.n_shape' is a single value, not a table"),
        ("[tracker.fit]\nfit_neck = 1\n", "'tracker.fit.fit_neck' = 1 must be true or false"),
        ("[smoothing]\nstrength = nan\n", "'smoothing.strength' = nan must be a finite number"),
        ("[tracker]\ndtype = \"float64\"\n", "'tracker.dtype' cannot be set in a configuration file"),
        ("[tracker\n", "not valid TOML: Expected ']' at the end of a table declaration (at line 1, column 9)"),
    ],
)
def test_mistakes_are_one_line_naming_the_file_and_the_key(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(UserError) as raised:
        resolve(TrackCommandConfig(), path)
    assert str(raised.value).startswith(f"{path}: ") and message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_the_command_line_reports_a_bad_file_before_any_work(landmarks: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[tracker.fit.priors]\nexpp = 3\n")
    out = tmp_path / "out"
    result = track(landmarks, out, "--config", str(bad))
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {bad}: unknown key 'tracker.fit.priors.expp' in [tracker.fit.priors]; the keys there are: shape, exp, ")
    assert line.endswith(", fov_deg, fov")
    assert not out.exists()
    clash = tmp_path / "clash.toml"
    clash.write_text('[publishers]\nosc = ["127.0.0.1", 9100]\nvmc = ["127.0.0.1", 9100]\n')
    session = tmp_path / "no-session"
    replay = run_cli("replay", str(session), "--config", str(clash))
    assert replay.returncode == 2 and replay.stderr.startswith("error: --vmc: port 9100 on 127.0.0.1 is already in use by --osc")
    style = tmp_path / "style.toml"
    style.write_text('[render]\nstyle = "cartoon"\n')
    render = run_cli("render", str(tmp_path), "--out", str(tmp_path / "x.mp4"), "--config", str(style))
    assert render.returncode == 2 and "'render.style' = \"cartoon\": choose one of" in render.stderr
    missing = run_cli("config", "track", "--config", str(tmp_path / "absent.toml"))
    assert missing.returncode == 2 and "absent.toml does not exist" in missing.stderr


def test_a_prior_in_the_file_changes_the_fit_and_the_result_reproduces_from_its_meta(landmarks: Path, tmp_path: Path) -> None:
    plain, stiff, again = tmp_path / "plain", tmp_path / "stiff", tmp_path / "again"
    assert track(landmarks, plain, "--smoothing", "0").returncode == 0
    config = tmp_path / "stiff.toml"
    config.write_text("[tracker]\nn_exp = 50\n[tracker.fit.priors]\nexp = 50.0\n[smoothing]\nstrength = 2.0\n")
    result = track(landmarks, stiff, "--config", str(config), "--smoothing", "0")
    assert result.returncode == 0, result.stderr
    meta = json.loads((stiff / "meta.json").read_text())
    assert meta["config"]["tracker"]["fit"]["priors"]["exp"] == 50.0
    assert meta["config"]["smoothing"]["strength"] == 0.0  # the option over the file
    assert meta["config"]["tracker"]["device"] == "cpu"  # resolved: the device it ran on
    with np.load(plain / "tracking.npz") as a, np.load(stiff / "tracking.npz") as b:
        # A 1000 times stronger expression prior pulls the expression towards zero.
        assert np.abs(b["exp"]).mean() < 0.8 * np.abs(a["exp"]).mean()
    result = track(landmarks, again, "--config", str(stiff / "meta.json"))
    assert result.returncode == 0, result.stderr
    assert json.loads((again / "meta.json").read_text())["config"] == meta["config"]
    with np.load(stiff / "tracking.npz") as b, np.load(again / "tracking.npz") as c:
        for key in ("exp", "cam", "shape", "jaw_pose"):
            np.testing.assert_array_equal(b[key], c[key])
    assert read_tree(stiff / "meta.json") == meta["config"]


def test_batch_records_its_configuration_in_the_summary(landmarks: Path, tmp_path: Path) -> None:
    config = tmp_path / "batch.toml"
    config.write_text("[tracker.fit.temporal]\nexp = 3.0\n[smoothing]\nstrength = 0\n")
    root = tmp_path / "root"
    result = run_cli("batch", str(landmarks), "--out", str(root), "--flame", "demo", "--models", str(MODELS),
                     "--jobs", "1", "--config", str(config))  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((root / "summary.json").read_text())
    assert summary["config"]["tracker"]["fit"]["temporal"]["exp"] == 3.0 and summary["config"]["smoothing"]["strength"] == 0.0
    assert json.loads((root / "landmarks" / "meta.json").read_text())["config"] == summary["config"]


def test_live_records_its_configuration_in_the_session(landmarker_task: Path, shared_clips: Path, tmp_path: Path) -> None:
    config = tmp_path / "live.toml"
    config.write_text('[tracker.output_filter]\nmin_cutoff = 0.5\n[live]\nmax_frames = 5\n[publishers]\nzmq = "tcp://127.0.0.1:*"\n')
    session = tmp_path / "session"
    result = run_cli("live", "--source", str(shared_clips / "bbaf2n.mpg"), "--as-fast-as-possible", "--flame", "demo",
                     "--models", str(MODELS), "--record", str(session), "--config", str(config))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "processed 5 frames" in result.stdout
    dumped = run_cli("config", "live", "--config", str(session / "session.json"))
    assert dumped.returncode == 0, dumped.stderr
    resolved = tomllib.loads(dumped.stdout)
    assert resolved["tracker"]["output_filter"]["min_cutoff"] == 0.5 and resolved["live"]["max_frames"] == 5
    assert resolved["publishers"]["zmq"] == "tcp://127.0.0.1:*" and resolved["recorder"]["codec"] == "libx264"

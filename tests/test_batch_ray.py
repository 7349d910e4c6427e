"""`batch --ray` on a real local Ray cluster (started once for this module) with real clips: results equal
to single `track` runs, a corrupt file fails alone, a rerun skips what is done; an unreachable address is one line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_batch import frame_arrays, run_cli

ray = pytest.importorskip("ray", reason='Ray is not installed: pip install -e ".[cluster]" to run the Ray engine tests')

CLIPS = ("bbaf2n.mpg", "lbax4n.mpg", "id2_vcd_swwp2s.mpg")  # GRID: 3 s each, 75 frames


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A real two-CPU Ray cluster on this machine; the batch joins it by address, as it would a remote one.
    (Tests ask for it after the shared data, so that it is not started for a test that skips.)"""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_ray_batch_of_real_clips_equals_single_tracks(shared_clips: Path, landmarker_task: Path, ray_address: str, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(bytes(range(256)) * 64)
    root = tmp_path / "root"
    model = ("--flame", "demo", "--models", str(landmarker_task.parent))
    arguments = ("batch", *(str(shared_clips / clip) for clip in CLIPS), str(corrupt), "--out", str(root), *model)
    result = run_cli(*arguments, "--ray", ray_address)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = {line["name"]: line for line in json.loads((root / "summary.json").read_text())["inputs"]}
    assert [lines[name]["status"] for name in ("bbaf2n", "lbax4n", "id2_vcd_swwp2s", "corrupt")] == ["done", "done", "done", "failed"]
    assert "corrupt.mp4 is not a readable video" in lines["corrupt"]["reason"]
    assert all(lines[Path(clip).stem]["frames"] == 75 for clip in CLIPS)

    for clip in CLIPS:
        single = tmp_path / f"single-{clip}"
        tracked = run_cli("track", str(shared_clips / clip), "--out", str(single), *model)
        assert tracked.returncode == 0, tracked.stderr
        folder = root / Path(clip).stem
        assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in single.iterdir())
        expected, got = frame_arrays(single), frame_arrays(folder)
        assert expected.keys() == got.keys() and sum(name[:6].isdigit() for name in expected) == 75
        for name, arrays in expected.items():
            for key, value in arrays.items():
                np.testing.assert_array_equal(got[name][key], value, err_msg=f"{clip} {name}: {key}")

    records = {clip: (root / ".batch" / f"{Path(clip).stem}.json").read_text() for clip in CLIPS}
    again = run_cli(*arguments, "--ray", ray_address)
    assert again.returncode == 1
    assert "3 of 4 inputs are already complete and skipped" in again.stdout
    assert {clip: (root / ".batch" / f"{Path(clip).stem}.json").read_text() for clip in CLIPS} == records


def test_unreachable_ray_address_is_one_line(tmp_path: Path, flame_dir: Path) -> None:
    landmarks = tmp_path / "take.npz"
    landmarks.write_bytes(b"")  # never read: the address is checked before any work
    result = run_cli("batch", str(landmarks), "--out", str(tmp_path / "root"), "--flame", str(flame_dir), "--ray", "127.0.0.1:1")
    assert result.returncode == 2
    assert result.stderr.startswith("error: --ray 127.0.0.1:1: no Ray cluster answers there")
    assert len(result.stderr.strip().splitlines()) == 1

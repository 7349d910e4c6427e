"""engine/atomic.py: a writer that fails midway leaves the previous file, or none, and no temporary behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine.atomic import write_atomic, write_bytes_atomic, write_bytes_replacing, write_json_atomic, write_npz_atomic, write_png_atomic


def test_each_writer_round_trips(tmp_path: Path) -> None:
    write_bytes_atomic(tmp_path / "a.bin", b"\x00\x01")
    write_json_atomic(tmp_path / "a.json", {"fov": np.float32(0.5), "size": np.array([640, 480])})
    write_npz_atomic(tmp_path / "a.npz", {"x": np.arange(3)})
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert json.loads((tmp_path / "a.json").read_text()) == {"fov": 0.5, "size": [640, 480]}
    assert np.load(tmp_path / "a.npz")["x"].tolist() == [0, 1, 2]
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "a.json", "a.npz"]


def test_a_writer_that_raises_midway_leaves_the_old_file_and_no_partial(tmp_path: Path) -> None:
    target = tmp_path / "meta.json"
    write_json_atomic(target, {"frames": 1})

    def half_then_fail(stream) -> None:
        stream.write(b'{"frames": 2, "tim')
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        write_atomic(target, half_then_fail)
    assert json.loads(target.read_text()) == {"frames": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


class _Unreadable:
    """An array-like whose data cannot be read: np.savez fails after writing the arrays before it."""

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        raise OSError("camera unplugged")


def test_an_npz_that_fails_after_its_first_array_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="camera unplugged"):
        write_npz_atomic(tmp_path / "frame.npz", {"shape": np.zeros(300), "exp": _Unreadable()})
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "meta.json", {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_png_round_trips_in_rgb_order(tmp_path: Path) -> None:
    image = np.zeros((4, 6, 3), np.uint8)
    image[..., 0] = 255  # red
    write_png_atomic(tmp_path / "red.png", image)
    assert cv2.imread(str(tmp_path / "red.png"))[0, 0].tolist() == [0, 0, 255]  # OpenCV reads BGR


def test_replacing_writes_whole_files_with_the_users_permissions_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "000001.npz"
    write_bytes_replacing(target, b"old")
    write_bytes_replacing(target, b"new" * 100_000)  # over a file already there, larger than one write may take
    assert target.read_bytes() == b"new" * 100_000
    assert [p.name for p in tmp_path.iterdir()] == ["000001.npz"]
    (tmp_path / ".000001.npz.tmp").write_bytes(b"left by a crash")
    write_bytes_replacing(target, b"again")
    assert target.read_bytes() == b"again" and [p.name for p in tmp_path.iterdir()] == ["000001.npz"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_replacing_that_fails_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "000001.npz"
    write_bytes_replacing(target, b"old")
    with pytest.raises(TypeError):
        write_bytes_replacing(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["000001.npz"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

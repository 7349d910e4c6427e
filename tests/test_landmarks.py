"""MediaPipe in the engine: the canonical face mesh, the landmarker wrapper and the 478 -> 68 mapping."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from engine.canonical_face import GEOMETRY_MEMBER, load_canonical_face
from engine.head_model import ModelFileError


def test_canonical_face_is_a_face_sized_mesh(landmarker_task: Path) -> None:
    face = load_canonical_face(landmarker_task)
    assert face.vertices.shape == (468, 3) and face.vertices.dtype == np.float64
    assert face.uv.shape == (468, 2)
    assert face.triangles.shape == (898, 3) and face.triangles.dtype == np.int64
    assert face.triangles.min() == 0 and face.triangles.max() == 467
    assert np.all((face.uv >= 0) & (face.uv <= 1))
    width, height, depth = np.ptp(face.vertices, axis=0)
    assert 12 < width < 18 and 14 < height < 22 and 5 < depth < 15  # centimetres
    # Mirror-symmetric about x = 0; landmark 1 (nose tip) is on the midline and in front.
    assert abs(face.vertices[:, 0].mean()) < 0.1
    assert face.vertices[1, 0] == 0 and face.vertices[1, 2] > np.percentile(face.vertices[:, 2], 95)
    # Every vertex is used by some triangle.
    assert np.unique(face.triangles).size == 468


def test_canonical_face_missing_or_corrupt_file_is_one_line_error(tmp_path: Path, landmarker_task: Path) -> None:
    with pytest.raises(ModelFileError, match="does not exist"):
        load_canonical_face(tmp_path / "absent.task")

    not_a_zip = tmp_path / "not_a_zip.task"
    not_a_zip.write_bytes(b"hello")
    with pytest.raises(ModelFileError, match="not a readable"):
        load_canonical_face(not_a_zip)

    truncated = tmp_path / "truncated.task"
    with zipfile.ZipFile(landmarker_task) as source, zipfile.ZipFile(truncated, "w") as target:
        target.writestr(GEOMETRY_MEMBER, source.read(GEOMETRY_MEMBER)[:5000])
    with pytest.raises(ModelFileError, match="malformed") as excinfo:
        load_canonical_face(truncated)
    assert "\n" not in str(excinfo.value)

"""`track`'s one-pass design: frame files encoded directly as .npz, the journal of per-frame fits that an
interrupted job keeps, the sample the identity survey detects, and the fallback to surveying every frame when
the sample shows no face. Real files, real MediaPipe."""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from engine.frames import stack_reference
from engine.model_selection import select_head_model
from offline.fit_journal import CHUNK_FRAMES, FitJournal, chunk_path, journaled_frames, read_journal
from engine.atomic import replacing_temporary
from offline.frame_files import FilePreparer, npz_bytes, write_npz_files
from offline.identity_survey import SURVEY_SAMPLES, sample_indices
from offline.track_job import TrackOptions, track_input, written_frames

REPO = Path(__file__).resolve().parents[1]


def test_npz_bytes_load_as_what_np_savez_writes() -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "exp": rng.normal(size=(1, 50)).astype(np.float32),
        "K": rng.normal(size=(1, 3, 3)).astype(np.float32),
        "valid": np.array([True]),
        "format_version": np.array([1]),
        "model_checksum": np.array(["0123456789abcdef" * 4]),
        "fov": np.float64(31.5),  # 0-d
        "vertices": np.asfortranarray(rng.normal(size=(7, 3))),  # not C-ordered
    }
    written = npz_bytes(arrays)
    assert zipfile.ZipFile(io.BytesIO(written)).testzip() is None
    reference = io.BytesIO()
    np.savez(reference, **arrays)
    reference.seek(0)
    with np.load(io.BytesIO(written), allow_pickle=False) as ours, np.load(reference, allow_pickle=False) as numpy_s:
        assert ours.files == numpy_s.files
        for key in arrays:
            assert ours[key].dtype == numpy_s[key].dtype and ours[key].shape == numpy_s[key].shape, key
            np.testing.assert_array_equal(ours[key], numpy_s[key], err_msg=key)
    with pytest.raises(ValueError, match="object"):
        npz_bytes({"bad": np.array([{"a": 1}], dtype=object)})


def test_frame_files_are_written_in_turn_each_readable(tmp_path: Path) -> None:
    frames = [{"exp": np.full((1, 4), index, np.float32), "valid": np.array([index % 2 == 0])} for index in range(5)]
    write_npz_files(tmp_path, ((tmp_path / f"{index:06d}.npz", arrays) for index, arrays in enumerate(frames)))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{index:06d}.npz" for index in range(5)]
    for index, arrays in enumerate(frames):
        with np.load(tmp_path / f"{index:06d}.npz", allow_pickle=False) as stored:
            assert stored.files == ["exp", "valid"]
            np.testing.assert_array_equal(stored["exp"], arrays["exp"])
            assert stored["valid"].tolist() == [index % 2 == 0]


def test_prepared_temporaries_are_filled_by_the_writes_and_the_unused_ones_discarded(tmp_path: Path) -> None:
    paths = [tmp_path / f"{index:06d}.npz" for index in range(6)]
    preparer = FilePreparer(paths)
    preparer.start()
    deadline = time.monotonic() + 30
    while len(list(tmp_path.iterdir())) < len(paths) and time.monotonic() < deadline:
        time.sleep(0.01)
    preparer.stop()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(replacing_temporary(path).name for path in paths)
    assert all(replacing_temporary(path).stat().st_size == 0 for path in paths)
    frames = [{"exp": np.full((1, 4), index, np.float32)} for index in range(4)]  # fewer frames than prepared
    write_npz_files(tmp_path, zip(paths, frames))
    preparer.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name for path in paths[:4]]
    for path, arrays in zip(paths, frames):
        with np.load(path, allow_pickle=False) as stored:
            np.testing.assert_array_equal(stored["exp"], arrays["exp"])


def frame(value: float) -> dict[str, np.ndarray]:
    return {"exp": np.full((1, 4), value, np.float32), "valid": np.array([value >= 0])}


def test_the_journal_keeps_every_frame_handed_over_and_reads_back_the_gap_free_run(tmp_path: Path) -> None:
    count = CHUNK_FRAMES + 5
    with FitJournal(tmp_path, 0) as journal:
        for index in range(count):
            journal.add(frame(float(index)))
    assert journaled_frames(tmp_path) == written_frames(tmp_path) == count  # the partial last chunk too
    kept = read_journal(tmp_path)
    np.testing.assert_array_equal(stack_reference(kept)["exp"][:, 0], np.arange(count, dtype=np.float32))
    # A run continues the journal where it stopped.
    with FitJournal(tmp_path, count) as journal:
        journal.add(frame(-1.0))
    assert len(read_journal(tmp_path)) == count + 1
    # After a crash a later chunk may exist without the one before it: only the run from frame 0 counts.
    np.savez(chunk_path(tmp_path, count + 3, count + 4), **stack_reference([frame(9.0)]))
    assert journaled_frames(tmp_path) == count + 1 and len(read_journal(tmp_path)) == count + 1


def test_the_survey_sample_spreads_over_the_whole_input() -> None:
    assert sample_indices(10, SURVEY_SAMPLES) == list(range(10))
    sample = sample_indices(1337, SURVEY_SAMPLES)
    assert len(sample) == SURVEY_SAMPLES and sample == sorted(set(sample))
    assert sample[0] < 1337 / SURVEY_SAMPLES and sample[-1] > 1337 * (1 - 1 / SURVEY_SAMPLES)


def test_a_sample_without_a_face_falls_back_to_surveying_every_frame(
    landmarker_task: Path, shared_landmarks68: Path, tmp_path: Path
) -> None:
    """Twice as many images as the survey samples, the sampled ones (odd) blank: the calibration surveys every
    detected frame instead."""
    import cv2

    portrait = cv2.imread(str(shared_landmarks68 / "takeo.ppm"))
    images = tmp_path / "images"
    images.mkdir()
    count = 2 * SURVEY_SAMPLES
    assert sample_indices(count, SURVEY_SAMPLES) == list(range(1, count, 2))
    for index in range(count):
        cv2.imwrite(str(images / f"{index:03d}.png"), portrait if index % 2 == 0 else np.full_like(portrait, 128))
    head = select_head_model("demo", landmarker_task.parent)
    result = track_input(images, tmp_path / "out", head, landmarker_task, TrackOptions(progress=False))
    valid = [bool(arrays["valid"][0]) for arrays in result.results]
    assert len(valid) == count and all(valid[0::2]) and not any(valid[1::2])
    assert "survey_s" in result.timings and written_frames(tmp_path / "out") == count
    assert not list((tmp_path / "out").glob("fits-*")), "the journal is gone once the result is complete"

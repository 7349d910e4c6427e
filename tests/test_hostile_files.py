"""Hostile model files: arrays that would corrupt memory, tiny files that promise gigabytes, and a fuzzer.

Each crafted file below crashed (exit 139), leaked heap bytes into an array or allocated gigabytes before the
loader checked every array against the bytes the file really holds. Now each is one ModelFileError line
naming the file and the key. The fuzzer loads hundreds of mutated copies of the fixture files in a child
process under a memory limit, so a segfault or a runaway allocation shows up as a failure, not a dead run.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from flame_fixtures import torch_legacy_storage_bytes, write_small_model

from engine.assets import load_flame
from engine.head_model import ModelFileError
from engine.safe_pickle import ArrayRefusedError, load_npy, load_pickle

REPO_ROOT = Path(__file__).resolve().parents[1]
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]


class _Reduces:
    """Pickles as ``function(*args)`` followed by BUILD with ``state``: how a hostile file calls the allowed globals."""

    def __init__(self, function: object, args: tuple, state: object = None) -> None:
        self.function, self.args, self.state = function, args, state

    def __reduce__(self) -> tuple:
        return (self.function, self.args) if self.state is None else (self.function, self.args, self.state)


def _crafted_dtype(code: str, state: tuple) -> _Reduces:
    return _Reduces(np.dtype, (code, False, True), state)


def _array_from_state(shape: tuple, dtype: object, data: object) -> _Reduces:
    return _Reduces(_RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, shape, dtype, False, data))


_OBJECT_FIELD = _crafted_dtype("V8", (3, "|", None, ("a",), {"a": (np.dtype(object), 0)}, 8, 1, 63))
_OFFSET_PAST_ITEM = _crafted_dtype("V8", (3, "|", None, ("a",), {"a": (np.dtype("<f8"), 4096)}, 8, 1, 0))
_HOSTILE_ARRAYS = {
    "object dtype over raw bytes": _array_from_state((4,), np.dtype(object), b"\x41" * 32),
    "ndarray called on raw bytes": _Reduces(np.ndarray, ((4,), np.dtype(object), b"\x41" * 32)),
    "dtype state with an object field": _array_from_state((4,), _OBJECT_FIELD, b"\x41" * 32),
    "dtype state with a field past the item": _array_from_state((4,), _OFFSET_PAST_ITEM, b"\x00" * 32),
    "shape larger than the bytes": _array_from_state((1 << 28,), np.dtype("<f8"), b"\x00" * 64),
}


def _small_folder(tmp_path: Path, model: object) -> Path:
    folder = write_small_model(tmp_path / "models")
    (folder / "generic_model.pkl").write_bytes(pickle.dumps({"v_template": model}, protocol=2))
    return folder


@pytest.mark.parametrize("attack", sorted(_HOSTILE_ARRAYS))
def test_hostile_array_in_a_model_pickle_is_refused_naming_file_and_key(tmp_path: Path, attack: str) -> None:
    folder = _small_folder(tmp_path, _HOSTILE_ARRAYS[attack])
    code = (
        "import sys; from engine.assets import load_flame; from engine.errors import UserError\n"
        "try:\n    load_flame(sys.argv[1])\nexcept UserError as error:\n    print(error)\n"
    )
    result = subprocess.run(  # a child process: on unprotected numpy some of these are segfaults
        [sys.executable, "-c", code, str(folder)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("generic_model.pkl: 'v_template' "), result.stdout
    assert "refused before loading it" in result.stdout and result.stdout.count("\n") == 1


def test_tiny_torch_tensor_promising_gigabytes_is_refused() -> None:
    storage = np.zeros(4, dtype=np.float32)
    # size 40000 x 40000 with stride 0 over a 4-element storage: 6.4 GB from a few hundred bytes.
    outer = _torch_tensor_pickle(storage, size=(40000, 40000), stride=(0, 0))
    assert len(outer) < 1000
    with pytest.raises(ArrayRefusedError, match="more than a file of this size can hold"):
        load_pickle(io.BytesIO(outer))


def _torch_tensor_pickle(storage: np.ndarray, size: tuple, stride: tuple) -> bytes:
    """A pickle of ``torch._utils._rebuild_tensor_v2(torch storage, 0, size, stride)`` in torch's legacy format."""
    inner = torch_legacy_storage_bytes(storage)
    load = b"ctorch.storage\n_load_from_bytes\nB" + struct.pack("<I", len(inner)) + inner + b"\x85R"
    size_args = pickle.dumps(size, protocol=2)[2:-1] + pickle.dumps(stride, protocol=2)[2:-1]
    return b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(" + load + b"K\x00" + size_args + b"\x89t" + b"R."


def test_sparse_matrix_promising_gigabytes_is_refused() -> None:
    state = {"data": np.zeros(0), "indices": np.zeros(0, np.int32), "indptr": np.zeros(100001, np.int32),
             "_shape": (100000, 100000)}
    # scipy.sparse.csc.csc_matrix.__new__, then BUILD with the state: 80 GB dense from a 400 kB file.
    hostile = b"\x80\x02cscipy.sparse.csc\ncsc_matrix\n)\x81" + pickle.dumps(state, protocol=2)[2:-1] + b"b."
    with pytest.raises(ArrayRefusedError, match="made dense"):
        load_pickle(io.BytesIO(hostile))


@pytest.mark.parametrize(
    "hostile",
    [
        b"\x80\x04\x8e" + struct.pack("<Q", 8 << 30) + b"abc",  # BINBYTES8 of 8 GiB in 14 bytes
        b"\x80\x04\x95" + struct.pack("<Q", 8 << 30) + b"N.",  # a frame of 8 GiB
        b"\x80\x02Nr" + struct.pack("<I", 0xFFFFFFF0) + b".",  # memo index 4 billion: the memo grows to it
    ],
    ids=["bytes8", "frame", "memo"],
)
def test_pickle_lengths_beyond_the_file_are_refused_before_allocating(hostile: bytes) -> None:
    with pytest.raises(pickle.UnpicklingError):
        load_pickle(io.BytesIO(hostile))


def test_npy_header_promising_gigabytes_is_refused_before_allocating() -> None:
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": "<f8", "fortran_order": False, "shape": (1 << 28,)})
    stream.write(b"\x00" * 64)
    stream.seek(0)
    with pytest.raises(ArrayRefusedError, match=r"2,147,483,648 bytes\) but the file holds 64"):
        load_npy(stream)


@pytest.mark.parametrize("descr", ["V8", [("a", "<f8")], ("<f8", (3,)), "<M8[s]"])
def test_npz_member_with_a_non_numeric_dtype_names_file_and_key(tmp_path: Path, descr: object) -> None:
    folder = write_small_model(tmp_path / "models", model_format="npz")
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": descr, "fortran_order": False, "shape": (12, 3)})
    stream.write(b"\x00" * (12 * 3 * 24))
    with zipfile.ZipFile(folder / "generic_model.npz") as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    members["v_template.npy"] = stream.getvalue()
    with zipfile.ZipFile(folder / "generic_model.npz", "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    with pytest.raises(ModelFileError) as caught:
        load_flame(folder)
    message = str(caught.value)
    assert message.startswith("generic_model.npz: 'v_template' has") and "\n" not in message


def test_kintree_with_huge_integers_is_one_line(tmp_path: Path) -> None:
    folder = write_small_model(tmp_path / "models")
    with (folder / "generic_model.pkl").open("rb") as stream:
        model = load_pickle(stream)
    model["kintree_table"] = [[2**70] * 5, [0, 1, 2, 3, 4]]
    (folder / "generic_model.pkl").write_bytes(pickle.dumps(model, protocol=2))
    with pytest.raises(ModelFileError, match="'kintree_table' is not a numeric array"):
        load_flame(folder)


# ----------------------------------------------------------------------------------------------- fuzzer

_FUZZ_CHILD = r"""
import json, resource, sys, traceback
from pathlib import Path
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from engine.assets import load_flame
from engine.errors import UserError
for line in Path(sys.argv[1]).read_text().splitlines():
    folder = line.strip()
    print(json.dumps({"case": folder}), flush=True)
    try:
        load_flame(folder, n_tex=0)
        outcome = {"outcome": "loaded"}
    except UserError as error:
        outcome = {"outcome": "refused", "message": str(error)}
    except BaseException:
        outcome = {"outcome": "traceback", "message": traceback.format_exc()}
    print(json.dumps(outcome), flush=True)
# VmHWM, not ru_maxrss: after fork and exec ru_maxrss still counts the parent's (pytest's) pages.
peak_kb = int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0])
print(json.dumps({"max_rss_kb": peak_kb}), flush=True)
"""

_DTYPE_CODES = [b"O8", b"V8", b"M8", b"i1", b"S0", b"f4", b"c8"]
_EXTREMES = [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, (1 << 63) - 1, 1 << 40]
_HEADER_DESCRS = ["|O", "<f8", "V8", [("a", "<f8")], ("<f8", (3,)), "<M8[s]", "|S0", "<U2", "|b1"]
_HEADER_SHAPES = [(), (0,), (1 << 40,), (3, 1 << 62), (2, 3), (51,), (79, 17, 3), (1 << 31, 1 << 31)]


def _mutate_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    data = bytearray(data)
    kind = rng.integers(5)
    if kind == 0:  # flip a few bytes
        for _ in range(rng.integers(1, 9)):
            data[rng.integers(len(data))] = rng.integers(256)
    elif kind == 1:  # cut
        del data[rng.integers(1, len(data)) :]
    elif kind == 2:  # an extreme length or count where an integer might be
        width = int(rng.choice([4, 8]))
        at = int(rng.integers(0, len(data) - width))
        data[at : at + width] = int(rng.choice(_EXTREMES)).to_bytes(8, "little")[:width]
    elif kind == 3:  # another element type where a pickle or header names one
        for code in (b"f8", b"i8", b"f4", b"u4", b"i4"):
            data = data.replace(code, bytes(rng.choice(_DTYPE_CODES)), int(rng.integers(1, 4)))
    else:  # insert or delete a span
        at = int(rng.integers(len(data)))
        if rng.random() < 0.5:
            del data[at : at + int(rng.integers(1, 64))]
        else:
            data[at:at] = rng.bytes(int(rng.integers(1, 64)))
    return bytes(data)


def _mutate_npy_header(data: bytes, rng: np.random.Generator) -> bytes:
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    header(stream)
    body = data[stream.tell() :]
    out = io.BytesIO()
    descr = _HEADER_DESCRS[int(rng.integers(len(_HEADER_DESCRS)))]
    shape = _HEADER_SHAPES[int(rng.integers(len(_HEADER_SHAPES)))]
    np.lib.format.write_array_header_1_0(out, {"descr": descr, "fortran_order": bool(rng.random() < 0.2), "shape": shape})
    return out.getvalue() + body


def _mutate_npz(data: bytes, rng: np.random.Generator) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    name = sorted(members)[int(rng.integers(len(members)))]
    mutate = _mutate_npy_header if rng.random() < 0.5 else _mutate_bytes
    members[name] = mutate(members[name], rng)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for member, content in members.items():
            archive.writestr(member, content)
    return out.getvalue()


def test_fuzzed_model_files_never_crash_and_stay_in_memory(tmp_path: Path, flame_dir: Path) -> None:
    """Random mutations of real fixture files (pickles, npy, npz): each loads or is one refusal line."""
    rng = np.random.default_rng(14)
    small_pkl = write_small_model(tmp_path / "small_pkl", n_vertices=6)
    small_npz = write_small_model(tmp_path / "small_npz", model_format="npz", n_vertices=6)
    sources = {
        small_pkl / "generic_model.pkl": _mutate_bytes,
        small_npz / "generic_model.npz": _mutate_npz,
        flame_dir / "landmark_embedding.npy": _mutate_bytes,  # a pickled dict with torch tensors inside
        flame_dir / "flame_static_embedding.pkl": _mutate_bytes,
        flame_dir / "flame_dynamic_embedding.npy": _mutate_npy_header,
        flame_dir / "mediapipe_landmark_embedding.npz": _mutate_npz,
    }
    folders = []
    for source, mutate in sources.items():
        original = source.read_bytes()
        for index in range(70):
            folder = tmp_path / f"{source.parent.name}_{source.name}_{index}"
            folder.mkdir()
            model_dir = small_npz if source.suffix == ".npz" and source.stem == "generic_model" else small_pkl
            if source.stem != "generic_model":
                (folder / "generic_model.pkl").write_bytes((model_dir / "generic_model.pkl").read_bytes())
            mutation = mutate(original, rng)
            if source.suffix == ".npy" and rng.random() < 0.3:
                mutation = _mutate_bytes(mutation, rng)
            (folder / source.name).write_bytes(mutation)
            folders.append(str(folder))
    case_list = tmp_path / "cases.txt"
    case_list.write_text("\n".join(folders))
    memory_limit = 1 << 30
    result = subprocess.run(
        [sys.executable, "-c", _FUZZ_CHILD, str(case_list), str(memory_limit)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
        timeout=300,
    )
    records = [json.loads(line) for line in result.stdout.splitlines()]
    last_case = next((r["case"] for r in reversed(records) if "case" in r), None)
    assert result.returncode == 0, f"the loader died (status {result.returncode}) on {last_case}: {result.stderr[-1500:]}"
    outcomes = [r for r in records if "outcome" in r]
    assert len(outcomes) == len(folders)
    tracebacks = [r["message"] for r in outcomes if r["outcome"] == "traceback"]
    assert not tracebacks, tracebacks[0]
    refusals = [r["message"] for r in outcomes if r["outcome"] == "refused"]
    assert all("\n" not in message for message in refusals)
    assert len(refusals) > len(folders) // 2  # the mutations really damage the files
    assert records[-1]["max_rss_kb"] < 256 * 1024

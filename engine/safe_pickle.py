"""Read the pickles inside model files without letting them run code.

FLAME and its landmark embeddings ship as Python pickles (``.pkl``, and ``.npy`` files that hold pickled
objects). A pickle can name any importable callable and call it, so ``pickle.load`` on a downloaded file is
code execution. :class:`SafeUnpickler` resolves only the globals those files really use and refuses every
other one *before* anything is called:

* numpy array and scalar reconstruction (``numpy.core`` from numpy 1 files, ``numpy._core`` from numpy 2);
* chumpy's ``Ch`` (FLAME 2020/2023 store most arrays as chumpy objects) and scipy's compressed sparse
  matrices (``J_regressor``), rebuilt here as plain numpy arrays, so neither chumpy nor scipy is needed;
* torch tensors pickled with plain ``pickle`` (DECA's ``landmark_embedding.npy``), rebuilt from torch's
  legacy storage format as numpy arrays without importing torch;
* the handful of builtins that Python 2 and 3 pickles of these objects mention (``set``, ``object`` for
  ``copyreg._reconstructor``, ``_codecs.encode`` for bytes, ``collections.OrderedDict``).

Everything returned is plain data: dicts, lists, numbers, strings and numpy arrays.
"""

from __future__ import annotations

import codecs
import collections
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from numpy.lib import format as npy_format

# Python 2 pickles name the builtins and copyreg modules by their old names.
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}

# torch's legacy serialisation starts with this number (torch/serialization.py, MAGIC_NUMBER).
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_TORCH_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class RefusedGlobalError(pickle.UnpicklingError):
    """The pickle names a callable or class outside the allow-list; nothing from it was run."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"refused to load '{module}.{name}'")
        self.qualified_name = f"{module}.{name}"


class _ChumpyArray:
    """Stand-in for ``chumpy.ch.Ch``: its pickled state is a dict holding the array under ``x``."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "x" not in state:
            raise pickle.UnpicklingError("a chumpy object without its array 'x'")
        self.value = state["x"]


class _CompressedSparse:
    """Stand-in for scipy's csc/csr matrices; pickled state: data, indices, indptr and the shape."""

    compressed_axis = 1  # csc compresses columns: indptr runs over columns

    def __setstate__(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("a sparse matrix without its arrays")
        self.state = state

    def to_dense(self) -> np.ndarray:
        try:
            data = np.asarray(self.state["data"], dtype=np.float64)
            indices = np.asarray(self.state["indices"], dtype=np.int64)
            indptr = np.asarray(self.state["indptr"], dtype=np.int64)
            shape = tuple(int(n) for n in self.state.get("_shape", self.state.get("shape")))
        except (KeyError, TypeError, ValueError) as error:
            raise pickle.UnpicklingError(f"a sparse matrix with missing or odd fields ({error})") from None
        n_compressed = shape[self.compressed_axis]
        n_other = shape[1 - self.compressed_axis]
        if (
            len(shape) != 2
            or indptr.shape != (n_compressed + 1,)
            or indptr[0] != 0
            or np.any(np.diff(indptr) < 0)
            or indptr[-1] != len(indices)
            or len(data) != len(indices)
            or (len(indices) and (indices.min() < 0 or indices.max() >= n_other))
        ):
            raise pickle.UnpicklingError("a sparse matrix whose index arrays do not fit its shape")
        dense = np.zeros(shape, dtype=np.float64)
        compressed = np.repeat(np.arange(n_compressed), np.diff(indptr))
        rows, cols = (indices, compressed) if self.compressed_axis == 1 else (compressed, indices)
        np.add.at(dense, (rows, cols), data)  # duplicate entries add up, as in scipy
        return dense


class _CsrSparse(_CompressedSparse):
    compressed_axis = 0


def _reconstructor(cls: type, base: type, state: object) -> object:
    """``copyreg._reconstructor`` (protocol 0/1 pickles of new-style classes), limited to the stand-ins."""
    if cls not in (_ChumpyArray, _CompressedSparse, _CsrSparse) or base is not object or state is not None:
        raise pickle.UnpicklingError("copyreg._reconstructor used for something other than chumpy or scipy")
    return cls.__new__(cls)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode``: how Python 3 pickles bytes at protocols 0-2; only the latin-1 form is accepted."""
    if encoding.lower().replace("-", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"bytes encoded as {encoding!r}")
    return codecs.encode(text, "latin1")


def _rebuild_torch_tensor(
    storage: np.ndarray, offset: int, size: tuple[int, ...], stride: tuple[int, ...], *_ignored: object
) -> np.ndarray:
    """``torch._utils._rebuild_tensor_v2`` as a numpy array (requires_grad and hooks do not matter here)."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise pickle.UnpicklingError("a torch tensor without its storage")
    size, stride = tuple(int(n) for n in size), tuple(int(n) for n in stride)
    if len(size) != len(stride) or any(n < 0 for n in size) or any(s < 0 for s in stride):
        raise pickle.UnpicklingError("a torch tensor with inconsistent size and stride")
    if 0 in size:
        return np.zeros(size, dtype=storage.dtype)
    last = int(offset) + sum((n - 1) * s for n, s in zip(size, stride))
    if offset < 0 or last >= storage.size:
        raise pickle.UnpicklingError("a torch tensor that reaches past its storage")
    view = np.lib.stride_tricks.as_strided(
        storage[int(offset) :], shape=size, strides=[s * storage.itemsize for s in stride], writeable=False
    )
    return view.copy()


class _TorchStorageType:
    """What ``torch.FloatStorage`` and friends resolve to inside a legacy storage record: just a dtype."""

    def __init__(self, dtype: type[np.generic]) -> None:
        self.dtype = np.dtype(dtype)


def _load_torch_storage(data: bytes) -> np.ndarray:
    """``torch.storage._load_from_bytes``: parse torch's legacy ``torch.save`` format of one storage.

    The format is four pickles (magic number, protocol version, system info, the storage record with a
    persistent id), a pickled list of storage keys, then per key an int64 element count and the raw data.
    """
    if isinstance(data, str):  # bytes written by Python 2 arrive as latin-1 text
        data = data.encode("latin1")
    stream = io.BytesIO(data)
    if SafeUnpickler(stream).load() != _TORCH_LEGACY_MAGIC:
        raise pickle.UnpicklingError("a torch storage in an unknown format")
    SafeUnpickler(stream).load()  # protocol version
    system_info = SafeUnpickler(stream).load()
    if not isinstance(system_info, dict) or not system_info.get("little_endian", False):
        raise pickle.UnpicklingError("a torch storage saved on a big-endian machine")
    record_reader = _TorchStorageRecordUnpickler(stream)
    root_key = record_reader.load()
    keys = SafeUnpickler(stream).load()
    arrays: dict[str, np.ndarray] = {}
    for key in keys:
        dtype, _numel, _view = record_reader.records[key]
        count = int.from_bytes(_read_exactly(stream, 8), "little", signed=True)
        raw = _read_exactly(stream, count * dtype.itemsize)
        arrays[key] = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)
    dtype, numel, view = record_reader.records[root_key]
    storage = arrays[root_key]
    if storage.size < numel:
        raise pickle.UnpicklingError("a torch storage shorter than it claims")
    if view is not None:
        view_offset, view_size = view
        storage = storage[view_offset : view_offset + view_size]
    return storage


def _read_exactly(stream: BinaryIO, n_bytes: int) -> bytes:
    if n_bytes < 0:
        raise pickle.UnpicklingError("a negative length")
    data = stream.read(n_bytes)
    if len(data) != n_bytes:
        raise EOFError("the file ends early")
    return data


_NUMPY_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]
_NUMPY_SCALAR = np.float64(0).__reduce__()[0]
_NUMPY_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]

_CSC_NAMES, _CSR_NAMES = ("csc_matrix", "csc_array"), ("csr_matrix", "csr_array")

_ALLOWED: dict[tuple[str, str], Any] = {
    **{(m, "_reconstruct"): _NUMPY_RECONSTRUCT for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): _NUMPY_SCALAR for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): _NUMPY_FROMBUFFER for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("chumpy.ch", "Ch"): _ChumpyArray,
    **{(m, c): _CompressedSparse for m in ("scipy.sparse.csc", "scipy.sparse._csc") for c in _CSC_NAMES},
    **{(m, c): _CsrSparse for m in ("scipy.sparse.csr", "scipy.sparse._csr") for c in _CSR_NAMES},
    ("copyreg", "_reconstructor"): _reconstructor,
    ("builtins", "object"): object,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): _latin1_encode,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_torch_tensor,
    ("torch.storage", "_load_from_bytes"): _load_torch_storage,
}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals model files need (see the module docstring).

    Strings from Python 2 pickles are decoded as latin-1, which is what numpy expects for their array bytes.
    """

    def __init__(self, stream: BinaryIO) -> None:
        super().__init__(stream, encoding="latin1")

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)
        try:
            return _ALLOWED[module, name]
        except KeyError:
            raise RefusedGlobalError(module, name) from None


class _TorchStorageRecordUnpickler(SafeUnpickler):
    """Reads the storage record of torch's legacy format: a persistent id naming the storage type."""

    def __init__(self, stream: BinaryIO) -> None:
        super().__init__(stream)
        self.records: dict[str, tuple[np.dtype, int, tuple[int, int] | None]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            return _TorchStorageType(_TORCH_STORAGE_DTYPES[name])
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> str:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise pickle.UnpicklingError("an unexpected persistent id in a torch storage")
        _kind, storage_type, key, _location, numel, view_metadata = pid
        if not isinstance(storage_type, _TorchStorageType):
            raise pickle.UnpicklingError("a torch storage of an unknown type")
        # A view record is (view key, offset, size) into the root storage.
        view = None if view_metadata is None else (int(view_metadata[1]), int(view_metadata[2]))
        self.records[str(key)] = (storage_type.dtype, int(numel), view)
        return str(key)


def load_pickle(stream: BinaryIO) -> Any:
    """Unpickle through the allow-list and return plain data (stand-ins replaced by numpy arrays).

    Raises RefusedGlobalError for a forbidden global; any other exception means a damaged file.
    """
    return _to_plain(SafeUnpickler(stream).load())


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, _ChumpyArray):
        return _to_plain(obj.value)
    if isinstance(obj, _CompressedSparse):
        return obj.to_dense()
    if isinstance(obj, dict):
        return {key: _to_plain(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_plain(value) for value in obj)
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        plain = np.empty(obj.shape, dtype=object)
        for index, value in np.ndenumerate(obj):
            plain[index] = _to_plain(value)
        return plain
    return obj


def load_npy(stream: BinaryIO) -> np.ndarray:
    """Read one ``.npy`` array; object arrays (pickled dicts and the like) go through the allow-list."""
    version = npy_format.read_magic(stream)
    if version == (1, 0):
        shape, fortran_order, dtype = npy_format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran_order, dtype = npy_format.read_array_header_2_0(stream)
    else:
        raise ValueError(f".npy format version {version} is not supported")
    if dtype.hasobject:
        array = load_pickle(stream)
        if not isinstance(array, np.ndarray):
            raise pickle.UnpicklingError("a .npy file whose pickle is not an array")
        return array
    count = int(np.prod(shape, dtype=np.int64))
    buffer = bytearray(count * dtype.itemsize)
    view = memoryview(buffer)
    filled = 0
    while filled < len(buffer):
        n_read = stream.readinto(view[filled:])
        if not n_read:
            raise EOFError(f"the array data ends after {filled} of {len(buffer)} bytes")
        filled += n_read
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order="F" if fortran_order else "C")


def load_npz(path: Path, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Read the arrays of an ``.npz`` archive (only ``keys`` when given), each through :func:`load_npy`."""
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            key = member.removesuffix(".npy")
            if member.endswith(".npy") and (keys is None or key in keys):
                with archive.open(member) as stream:
                    arrays[key] = load_npy(stream)
    return arrays

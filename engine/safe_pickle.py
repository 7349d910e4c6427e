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

Memory safety: numpy's own pickle hooks trust their input (an object dtype over raw bytes makes pointers
out of file bytes; a crafted dtype state reads past its item), so none of them is called. The numpy globals
resolve to recipes that only record their arguments; :func:`load_pickle` then builds each array itself,
with a plain element type (numbers or fixed-width text, or objects only from a list of unpickled values),
after checking its shape and byte count against the bytes the file really holds. Every array allocation is
charged to an :class:`AllocationBudget` proportional to the file's size, and the pickle's opcodes are
checked (lengths, frames, memo indices) before the unpickler allocates anything for them.
"""

from __future__ import annotations

import codecs
import collections
import io
import math
import pickle
import pickletools
import zipfile
from dataclasses import dataclass
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


class ArrayRefusedError(pickle.UnpicklingError):
    """An array whose type, shape or size does not fit the bytes the file holds: the file is damaged or hostile."""

    def __init__(self, reason: str, key: str | None = None) -> None:
        super().__init__(f"'{key}' {reason}" if key else reason)
        self.reason, self.key = reason, key

    def at(self, key: str | None) -> ArrayRefusedError:
        """The same refusal naming the file's key it happened under (the innermost name is kept)."""
        return self if self.key is not None or key is None else ArrayRefusedError(self.reason, key)


# A model file stores its arrays as raw bytes, so what they need is about the file's size (a little more for
# sparse matrices made dense and compressed .npz members); a tiny file promising gigabytes is refused.
BUDGET_FILE_FACTOR = 64
BUDGET_CONSTANT_BYTES = 64 << 20


@dataclass
class AllocationBudget:
    """The bytes of arrays that reading one file may allocate, charged before each allocation."""

    limit: int
    used: int = 0

    @classmethod
    def for_file_size(cls, n_bytes: int) -> AllocationBudget:
        return cls(limit=BUDGET_CONSTANT_BYTES + BUDGET_FILE_FACTOR * max(n_bytes, 0))

    def charge(self, n_bytes: int, what: str) -> None:
        if n_bytes > self.limit - self.used:
            raise ArrayRefusedError(
                f"needs {n_bytes:,} bytes for {what}, more than a file of this size can hold "
                f"(limit {self.limit:,} bytes in all)"
            )
        self.used += n_bytes


# Element types an array may have: numbers and fixed-width text hold no pointers, whatever their bytes.
_PLAIN_KINDS = frozenset("biufcSU")
_MAX_DIMENSIONS = 32


class _DtypeRecipe:
    """``numpy.dtype(code, align, copy)`` and its pickled state, limited to plain, unstructured types."""

    def __init__(self, code: object, _align: object = False, _copy: object = True) -> None:
        if not isinstance(code, str) or len(code) > 8:
            raise pickle.UnpicklingError(f"a dtype named by {type(code).__name__} {str(code)[:20]!r}")
        self.dtype = np.dtype(code)  # a short type code: numpy parses it, nothing is allocated
        self.refusal: str | None = None

    def __setstate__(self, state: object) -> None:
        # (version, byte order, sub-array, names, fields, item size, alignment, flags[, metadata])
        if not isinstance(state, tuple) or len(state) < 5:
            self.refusal = "has an unreadable element type"
        elif any(part is not None for part in state[2:5]):
            self.refusal = "has a structured or sub-array element type, which no model file uses"
        elif state[1] in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(state[1])
        elif state[1] not in ("|", "="):
            self.refusal = f"has an unknown byte order {str(state[1])[:8]!r}"

    def resolve(self, allow_object: bool) -> np.dtype:
        if self.refusal is not None:
            raise ArrayRefusedError(self.refusal)
        return _plain_dtype(self.dtype, allow_object)


def _plain_dtype(dtype: object, allow_object: bool = False) -> np.dtype:
    """``dtype`` itself when an array of it is plain data (see _PLAIN_KINDS), else ArrayRefusedError."""
    if isinstance(dtype, _DtypeRecipe):
        return dtype.resolve(allow_object)
    if not isinstance(dtype, np.dtype):
        raise ArrayRefusedError(f"has an element type given as {type(dtype).__name__}, not a dtype")
    if dtype.names is not None or dtype.subdtype is not None:
        raise ArrayRefusedError("has a structured or sub-array element type, which no model file uses")
    if dtype.hasobject and allow_object:
        return dtype
    if dtype.kind not in _PLAIN_KINDS or dtype.itemsize == 0:
        raise ArrayRefusedError(f"has element type {dtype.str!r}; model files hold only numbers and text")
    return dtype


def _checked_shape(shape: object) -> tuple[int, ...]:
    if not isinstance(shape, (tuple, list)) or len(shape) > _MAX_DIMENSIONS:
        raise ArrayRefusedError("has an unreadable shape")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ArrayRefusedError(f"has shape {tuple(shape)!r}: lengths must be whole numbers >= 0")
    return tuple(shape)


def _array_from(
    data: object, dtype: object, shape: object, fortran_order: object, budget: AllocationBudget
) -> np.ndarray:
    """An array from pickled data, checked before numpy sees it: raw bytes of exactly the size the shape
    and a plain element type need, or (object arrays only) a list of exactly that many unpickled values."""
    shape = _checked_shape(shape)
    count = math.prod(shape)
    if isinstance(data, list):
        if _plain_dtype(dtype, allow_object=True) != np.dtype(object):
            raise ArrayRefusedError("holds a list of values but is not an object array")
        if len(data) != count:
            raise ArrayRefusedError(f"has shape {shape} ({count} values) but holds {len(data)}")
        budget.charge(count * np.dtype(object).itemsize, f"an object array of shape {shape}")
        array = np.empty(count, dtype=object)
        for index, value in enumerate(data):  # one by one: numpy would read nested lists as dimensions
            array[index] = value
        return array.reshape(shape)
    plain = _plain_dtype(dtype)
    if isinstance(data, str):  # Python 2 pickles: the bytes arrive as latin-1 text
        data = data.encode("latin1")
    if not isinstance(data, (bytes, bytearray)):
        raise ArrayRefusedError(f"holds {type(data).__name__} instead of its bytes")
    n_bytes = count * plain.itemsize
    if len(data) != n_bytes:
        raise ArrayRefusedError(f"has shape {shape} of {plain.str!r} ({n_bytes:,} bytes) but holds {len(data):,} bytes")
    budget.charge(n_bytes, f"an array of shape {shape}")
    order = "F" if fortran_order else "C"
    return np.frombuffer(data, dtype=plain).reshape(shape, order=order).copy(order="K")


class _Recipe:
    """An unpickled object recorded as data; :func:`load_pickle` builds it once the whole pickle is read."""

    def build(self, budget: AllocationBudget) -> Any:
        raise NotImplementedError


class _Refusal(_Recipe):
    """Something no model file contains, refused when it is built (so the refusal names its key)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def build(self, budget: AllocationBudget) -> Any:
        raise ArrayRefusedError(self.reason)


class _NdarrayName:
    """What ``numpy.ndarray`` resolves to: only an argument of ``_reconstruct``; calling it is refused."""

    def __new__(cls, *_args: object, **_kwargs: object) -> _Refusal:  # type: ignore[misc]
        return _Refusal("is built by calling numpy.ndarray on raw bytes, which array pickles never do")


class _ArrayRecipe(_Recipe):
    """``numpy.core.multiarray._reconstruct(ndarray, shape, typecode)`` followed by ``__setstate__``."""

    def __init__(self, subtype: object, _shape: object = (0,), _typecode: object = b"b") -> None:
        if subtype is not _NdarrayName:
            raise pickle.UnpicklingError("_reconstruct of something other than numpy.ndarray")
        self.state: object = None

    def __setstate__(self, state: object) -> None:
        self.state = state

    def build(self, budget: AllocationBudget) -> np.ndarray:
        if self.state is None:
            return np.zeros(0, dtype=np.uint8)  # what _reconstruct alone leaves
        if not isinstance(self.state, tuple) or len(self.state) not in (4, 5):
            raise ArrayRefusedError("has an unreadable array state")
        shape, dtype, fortran_order, data = self.state[-4:]
        return _array_from(data, dtype, shape, fortran_order, budget)


class _BufferRecipe(_Recipe):
    """``numpy.core.numeric._frombuffer(buffer, dtype, shape, order)``, how protocol 5 pickles arrays."""

    def __init__(self, data: object, dtype: object, shape: object, order: object) -> None:
        self.args = (data, dtype, shape, order == "F")

    def build(self, budget: AllocationBudget) -> np.ndarray:
        data, dtype, shape, fortran_order = self.args
        return _array_from(data, dtype, shape, fortran_order, budget)


class _ScalarRecipe(_Recipe):
    """``numpy.core.multiarray.scalar(dtype, bytes)``: one number."""

    def __init__(self, dtype: object, data: object = None) -> None:
        self.args = (dtype, data)

    def build(self, budget: AllocationBudget) -> np.generic:
        dtype, data = self.args
        return _array_from(data, dtype, (), False, budget)[()]


class _TensorRecipe(_Recipe):
    """``torch._utils._rebuild_tensor_v2`` as a numpy array (requires_grad and hooks do not matter here)."""

    def __init__(
        self, storage: object, offset: object, size: object, stride: object, *_ignored: object
    ) -> None:
        if not isinstance(storage, np.ndarray) or storage.ndim != 1:
            raise pickle.UnpicklingError("a torch tensor without its storage")
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def build(self, budget: AllocationBudget) -> np.ndarray:
        size, stride = _checked_shape(self.size), _checked_shape(self.stride)
        offset = self.offset
        if len(size) != len(stride) or not isinstance(offset, int) or offset < 0:
            raise ArrayRefusedError("is a torch tensor with inconsistent offset, size and stride")
        if 0 in size:
            return np.zeros(size, dtype=self.storage.dtype)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= self.storage.size:
            raise ArrayRefusedError("is a torch tensor that reaches past its storage")
        budget.charge(math.prod(size) * self.storage.itemsize, f"a tensor of size {size}")
        view = np.lib.stride_tricks.as_strided(
            self.storage[offset:], shape=size, strides=[s * self.storage.itemsize for s in stride], writeable=False
        )
        return view.copy()


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

    def to_dense(self, plainer: _Plainer, key: str | None) -> np.ndarray:
        try:
            data = np.asarray(plainer.plain(self.state["data"], key), dtype=np.float64)
            indices = np.asarray(plainer.plain(self.state["indices"], key), dtype=np.int64)
            indptr = np.asarray(plainer.plain(self.state["indptr"], key), dtype=np.int64)
            pickled_shape = plainer.plain(self.state.get("_shape", self.state.get("shape")), key)
            shape = _checked_shape(tuple(int(n) if isinstance(n, np.integer) else n for n in pickled_shape))
        except (KeyError, TypeError, ValueError, OverflowError) as error:
            raise pickle.UnpicklingError(f"a sparse matrix with missing or odd fields ({error})") from None
        if len(shape) != 2 or data.ndim != 1 or indices.ndim != 1 or indptr.ndim != 1:
            raise pickle.UnpicklingError("a sparse matrix whose index arrays do not fit its shape")
        n_compressed = shape[self.compressed_axis]
        n_other = shape[1 - self.compressed_axis]
        if (
            indptr.shape != (n_compressed + 1,)
            or indptr[0] != 0
            or np.any(np.diff(indptr) < 0)
            or indptr[-1] != len(indices)
            or len(data) != len(indices)
            or (len(indices) and (indices.min() < 0 or indices.max() >= n_other))
        ):
            raise pickle.UnpicklingError("a sparse matrix whose index arrays do not fit its shape")
        plainer.budget.charge(math.prod(shape) * 8, f"a sparse matrix of shape {shape} made dense")
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


def _empty_bytes(*args: object) -> bytes:
    """``bytes()``: how Python 3 pickles empty bytes at protocols 0-2 (``bytes(n)`` would allocate n bytes)."""
    if args:
        raise pickle.UnpicklingError("bytes() called with arguments")
    return b""


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode``: how Python 3 pickles bytes at protocols 0-2; only the latin-1 form is accepted."""
    if encoding.lower().replace("-", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"bytes encoded as {encoding!r}")
    return codecs.encode(text, "latin1")


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
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError("a torch storage without its bytes")
    stream = io.BytesIO(data)
    if _checked_load(SafeUnpickler(stream)) != _TORCH_LEGACY_MAGIC:
        raise pickle.UnpicklingError("a torch storage in an unknown format")
    _checked_load(SafeUnpickler(stream))  # protocol version
    system_info = _checked_load(SafeUnpickler(stream))
    if not isinstance(system_info, dict) or not system_info.get("little_endian", False):
        raise pickle.UnpicklingError("a torch storage saved on a big-endian machine")
    record_reader = _TorchStorageRecordUnpickler(stream)
    root_key = _checked_load(record_reader)
    keys = _checked_load(SafeUnpickler(stream))
    if not isinstance(keys, list):
        raise pickle.UnpicklingError("a torch storage without its list of keys")
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


_CSC_NAMES, _CSR_NAMES = ("csc_matrix", "csc_array"), ("csr_matrix", "csr_array")

_ALLOWED: dict[tuple[str, str], Any] = {
    **{(m, "_reconstruct"): _ArrayRecipe for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): _ScalarRecipe for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): _BufferRecipe for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): _NdarrayName,
    ("numpy", "dtype"): _DtypeRecipe,
    ("chumpy.ch", "Ch"): _ChumpyArray,
    **{(m, c): _CompressedSparse for m in ("scipy.sparse.csc", "scipy.sparse._csc") for c in _CSC_NAMES},
    **{(m, c): _CsrSparse for m in ("scipy.sparse.csr", "scipy.sparse._csr") for c in _CSR_NAMES},
    ("copyreg", "_reconstructor"): _reconstructor,
    ("builtins", "object"): object,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "bytes"): _empty_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _TensorRecipe,
    ("torch.storage", "_load_from_bytes"): _load_torch_storage,
}


def _checked_load(unpickler: SafeUnpickler) -> Any:
    """``unpickler.load()`` after walking the pickle's opcodes without building anything.

    The unpickler allocates what a length, a frame or a memo index asks for before it reads the bytes (an
    8-byte length in a 20-byte file asks for gigabytes); the walk refuses any that the stream cannot hold.
    """
    stream = unpickler.stream
    start = stream.tell()
    end = stream.seek(0, io.SEEK_END)
    stream.seek(start)
    n_opcodes = 0
    try:
        for opcode, argument, _position in pickletools.genops(stream):
            n_opcodes += 1
            if opcode.name == "FRAME" and argument > end - stream.tell():
                raise pickle.UnpicklingError(f"a frame of {argument:,} bytes in a file that ends sooner")
            if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and int(argument) > n_opcodes:
                raise pickle.UnpicklingError(f"a memo index of {int(argument):,} after {n_opcodes} opcodes")
    except ValueError as error:  # pickletools reports lengths past the end and unknown opcodes so
        raise pickle.UnpicklingError(str(error)) from None
    stream.seek(start)
    return unpickler.load()


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals model files need (see the module docstring).

    Strings from Python 2 pickles are decoded as latin-1, which is what numpy expects for their array bytes.
    """

    def __init__(self, stream: io.BytesIO) -> None:
        super().__init__(stream, encoding="latin1")
        self.stream = stream

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)
        try:
            return _ALLOWED[module, name]
        except KeyError:
            raise RefusedGlobalError(module, name) from None


class _TorchStorageRecordUnpickler(SafeUnpickler):
    """Reads the storage record of torch's legacy format: a persistent id naming the storage type."""

    def __init__(self, stream: io.BytesIO) -> None:
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


def load_pickle(stream: BinaryIO, budget: AllocationBudget | None = None) -> Any:
    """Unpickle the rest of ``stream`` through the allow-list and return plain data (arrays built and checked).

    ``budget`` bounds the arrays' bytes (default: in proportion to the pickle's size). Raises
    RefusedGlobalError for a forbidden global, ArrayRefusedError (naming the key) for an array that does not
    fit its bytes or the budget; any other exception means a damaged file.
    """
    data = stream.read()
    budget = budget if budget is not None else AllocationBudget.for_file_size(len(data))
    return _Plainer(budget).plain(_checked_load(SafeUnpickler(io.BytesIO(data))))


class _Plainer:
    """Replaces recipes and stand-ins by numpy arrays, charging each to the budget; shared objects once."""

    def __init__(self, budget: AllocationBudget) -> None:
        self.budget = budget
        self.converted: dict[int, Any] = {}  # by id: the unpickled tree keeps every original alive

    def plain(self, obj: Any, key: str | None = None) -> Any:
        if obj is None or isinstance(obj, (str, bytes, bool, int, float, complex)):
            return obj
        if id(obj) not in self.converted:
            self.converted[id(obj)] = self._convert(obj, key)
        return self.converted[id(obj)]

    def _convert(self, obj: Any, key: str | None) -> Any:
        try:
            if isinstance(obj, _Recipe):
                return self._convert(obj.build(self.budget), key)
            if isinstance(obj, _ChumpyArray):
                return self.plain(obj.value, key)
            if isinstance(obj, _CompressedSparse):
                return obj.to_dense(self, key)
        except ArrayRefusedError as error:
            raise error.at(key) from None
        if isinstance(obj, dict):
            return {name: self.plain(value, key if key is not None else str(name)) for name, value in obj.items()}
        if isinstance(obj, (list, tuple, set, frozenset)):
            return type(obj)(self.plain(value, key) for value in obj)
        if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
            plain = np.empty(obj.shape, dtype=object)
            for index, value in np.ndenumerate(obj):
                plain[index] = self.plain(value, key)
            return plain
        return obj


def load_npy(stream: BinaryIO, budget: AllocationBudget | None = None, size: int | None = None) -> np.ndarray:
    """Read one ``.npy`` array; object arrays (pickled dicts and the like) go through the allow-list.

    The header's element type must be plain (or a pickled object array) and its shape must fit the bytes that
    follow before anything is allocated. ``size`` is the stream's length in bytes (default: found by seeking);
    ``budget`` bounds the allocation (default: in proportion to ``size``).
    """
    start = stream.tell()
    if size is None:
        size = stream.seek(0, io.SEEK_END)
        stream.seek(start)
    budget = budget if budget is not None else AllocationBudget.for_file_size(size)
    version = npy_format.read_magic(stream)
    if version == (1, 0):
        shape, fortran_order, dtype = npy_format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran_order, dtype = npy_format.read_array_header_2_0(stream)
    else:
        raise ValueError(f".npy format version {version} is not supported")
    shape = _checked_shape(shape)
    available = size - stream.tell()
    if _plain_dtype(dtype, allow_object=True).hasobject:
        budget.charge(available, "a pickled array")
        array = load_pickle(stream, budget)
        if not isinstance(array, np.ndarray):
            raise pickle.UnpicklingError("a .npy file whose pickle is not an array")
        return array
    n_bytes = math.prod(shape) * dtype.itemsize
    if n_bytes > available:
        raise ArrayRefusedError(f"has shape {shape} of {dtype.str!r} ({n_bytes:,} bytes) but the file holds {available:,}")
    budget.charge(n_bytes, f"an array of shape {shape}")
    buffer = bytearray(n_bytes)
    view = memoryview(buffer)
    filled = 0
    while filled < len(buffer):
        n_read = stream.readinto(view[filled:])
        if not n_read:
            raise EOFError(f"the array data ends after {filled} of {len(buffer)} bytes")
        filled += n_read
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order="F" if fortran_order else "C")


def load_npz(path: Path, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Read the arrays of an ``.npz`` archive (only ``keys`` when given), each through :func:`load_npy`.

    One budget, in proportion to the archive's size on disk, covers all its members.
    """
    budget = AllocationBudget.for_file_size(path.stat().st_size)
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            key = info.filename.removesuffix(".npy")
            if info.filename.endswith(".npy") and (keys is None or key in keys):
                with archive.open(info) as stream:
                    try:
                        arrays[key] = load_npy(stream, budget, size=info.file_size)
                    except ArrayRefusedError as error:
                        raise error.at(key) from None
    return arrays

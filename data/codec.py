"""LMDB value codec: the bytes GR1-Training's converter writes, read and written without torch and without running
code from the data.

GR1-Training stores every value with ``pickle.dumps``: Python ints, bools and strs, and torch tensors. A pickled
tensor calls ``torch._utils._rebuild_tensor_v2`` on a storage rebuilt by ``torch.storage._load_from_bytes`` from a
nested blob in torch's legacy ``torch.save`` format: five small pickles (magic number, protocol 1001, system info, the
storage record as a persistent id, the list of storage keys), then per storage its element count (8 bytes,
little-endian) and its raw bytes.

- One reader, :func:`loads_value`. Values laid out exactly as Python's pickler, torch and this project write them
  (every value of GR1-Training's published LMDB) are parsed by position: no pickle machinery runs at all. Anything
  else goes to a restricted unpickler whose only globals are this module's own pure functions; the nested storage
  blob is read by the same restricted machinery (never by ``pickle.load``). A crafted value can therefore at worst
  raise :class:`LMDBValueError`; it cannot call a Python function.
- One writer, :func:`dumps_value`: numpy arrays as the bytes torch's ``pickle.dumps(tensor)`` gives (with a
  constant storage key, so values are deterministic; torch puts the storage's memory address there), other values
  as ``pickle.dumps(value, protocol=4)``.
"""
from __future__ import annotations

import io
import math
import pickle
import re
import struct
import sys
from collections import OrderedDict
from typing import Any

import numpy as np

_STORAGE_DTYPES = {
    "DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2", "ByteStorage": "u1", "CharStorage": "i1",
    "ShortStorage": "<i2", "IntStorage": "<i4", "LongStorage": "<i8", "BoolStorage": "?",
}
_STORAGE_NAMES = {np.dtype(v): k for k, v in _STORAGE_DTYPES.items()}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_SYS_INFO = {"protocol_version": _LEGACY_PROTOCOL, "little_endian": True,
             "type_sizes": {"short": 2, "int": 4, "long": 4}}  # what torch writes (see the fixture LMDB)
_LEGACY_HEADER = b"".join(pickle.dumps(x, protocol=2) for x in (_LEGACY_MAGIC, _LEGACY_PROTOCOL, _SYS_INFO))
_STORAGE_KEY = "0"  # any string works; a constant one keeps values byte-identical between runs


class LMDBValueError(ValueError):
    """An LMDB value is not in the format GR1-Training writes (or was crafted to run code)."""


# ---------------------------------------------------------------- writer

def _pickle_str(text: str) -> bytes:
    data = text.encode()
    assert len(data) < 256
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def _pickle_int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])  # BININT1
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)  # BININT2
    return b"J" + struct.pack("<i", value)  # BININT


def _pickle_int_tuple(values: tuple[int, ...]) -> bytes:
    items = b"".join(_pickle_int(v) for v in values)
    if len(values) <= 3:  # as Python's pickler: EMPTY_TUPLE, TUPLE1, TUPLE2, TUPLE3
        return items + (b")", b"\x85", b"\x86", b"\x87")[len(values)]
    return b"(" + items + b"t"  # MARK ... TUPLE


def _dumps_tensor(array: np.ndarray) -> bytes:
    """A numpy array as the bytes of pickle.dumps(torch.from_numpy(array)) (up to the storage key), without torch."""
    array = np.asarray(array)
    if not array.flags.c_contiguous:
        array = array.copy(order="C")  # (np.ascontiguousarray would turn a 0-d array into 1-d)
    if array.dtype.newbyteorder("<") not in _STORAGE_NAMES or sys.byteorder != "little":
        raise TypeError(f"cannot store dtype {array.dtype} as a torch tensor")
    storage = _STORAGE_NAMES[array.dtype.newbyteorder("<")]
    key = _STORAGE_KEY.encode()
    record = (b"\x80\x02(X\x07\x00\x00\x00storageq\x00ctorch\n" + storage.encode() + b"\nq\x01X"
              + struct.pack("<I", len(key)) + key + b"q\x02X\x03\x00\x00\x00cpuq\x03"
              + pickle.dumps(array.size, protocol=2)[2:-1] + b"Ntq\x04Q.")  # persistent id of the storage
    blob = (_LEGACY_HEADER + record + pickle.dumps([_STORAGE_KEY], protocol=2)
            + struct.pack("<q", array.size) + array.tobytes())
    strides = tuple(s // array.itemsize for s in array.strides) if array.size else (1,) * array.ndim
    return (b"\x80\x04" + _pickle_str("torch._utils") + _pickle_str("_rebuild_tensor_v2") + b"\x93"  # STACK_GLOBAL
            + b"(" + _pickle_str("torch.storage") + _pickle_str("_load_from_bytes") + b"\x93"
            + b"B" + struct.pack("<I", len(blob)) + blob + b"\x85R"  # BINBYTES, TUPLE1, REDUCE: the storage
            + _pickle_int(0) + _pickle_int_tuple(array.shape) + _pickle_int_tuple(strides) + b"\x89"  # NEWFALSE
            + _pickle_str("collections") + _pickle_str("OrderedDict") + b"\x93)R"  # backward hooks
            + b"tR.")  # TUPLE, REDUCE, STOP


def dumps_value(value: Any) -> bytes:
    """An LMDB value as GR1-Training writes it: numpy arrays as pickled torch tensors (torch's pickle.loads gives a
    contiguous CPU tensor of the same dtype, shape and values), ints, bools and strs as pickle protocol 4."""
    if isinstance(value, np.ndarray):
        return _dumps_tensor(value)
    if not isinstance(value, (bool, int, str)):
        raise TypeError(f"cannot store a {type(value).__name__} in the LMDB (arrays, ints, bools, strs only)")
    return pickle.dumps(value, protocol=4)


# ---------------------------------------------------------------- exact layouts, parsed by position

_INT_OPCODES = {ord("K"): "<B", ord("M"): "<H", ord("J"): "<i"}
_FRAME, _STOP = 0x95, ord(".")
_INT = rb"(?:K(.)|M(..)|J(.{4}))"  # BININT1 / BININT2 / BININT
_STORAGE_LAYOUT = re.compile(  # the storage record and key list exactly as torch writes them (after the header)
    rb"\x80\x02\(X\x07\x00\x00\x00storageq\x00ctorch\n(\w{1,20})\nq\x01X(.{4})(\d{1,20})q\x02"
    rb"X\x03\x00\x00\x00cpuq\x03" + _INT + rb"Ntq\x04Q\.\x80\x02\]q\x00X(.{4})(\d{1,20})q\x01a\.(.{8})", re.DOTALL)
_VECTOR_HEAD = re.compile(  # pickle.dumps(1-D tensor), protocol 4/5, up to the storage blob (M: optional MEMOIZE)
    rb"\x80[\x04\x05](?:\x95(.{8}))?\x8c\x0ctorch\._utils\x94?\x8c\x12_rebuild_tensor_v2\x94?\x93\x94?\("
    rb"\x8c\x0dtorch\.storage\x94?\x8c\x10_load_from_bytes\x94?\x93\x94?(?:B(.{4})|C(.))", re.DOTALL)
_VECTOR_TAIL = re.compile(  # storage REDUCE, offset 0, (size,), (1,), False, OrderedDict(), REDUCE, STOP
    rb"\x94?\x85\x94?R\x94?K\x00" + _INT + rb"\x85\x94?K\x01\x85\x94?\x89\x8c\x0bcollections\x94?"
    rb"\x8c\x0bOrderedDict\x94?\x93\x94?\)R\x94?t\x94?R\x94?\.", re.DOTALL)


def _int(groups: tuple[bytes | None, ...]) -> int:
    """The value of the _INT alternative that matched."""
    one, two, four = groups
    return one[0] if one is not None else struct.unpack("<H", two)[0] if two is not None else \
        struct.unpack("<i", four)[0]


def _parse_storage(blob: bytes) -> np.ndarray | None:
    """A legacy storage blob exactly as torch writes it -> 1-D array viewing `blob`; None if anything differs."""
    if not blob.startswith(_LEGACY_HEADER):
        return None
    m = _STORAGE_LAYOUT.match(blob, len(_LEGACY_HEADER))
    if m is None or m.group(1).decode() not in _STORAGE_DTYPES or m.group(3) != m.group(8):
        return None
    key_len, keys_len = struct.unpack("<I", m.group(2))[0], struct.unpack("<I", m.group(7))[0]
    numel, count = _int(m.group(4, 5, 6)), struct.unpack("<q", m.group(9))[0]
    dtype = np.dtype(_STORAGE_DTYPES[m.group(1).decode()])
    if key_len != len(m.group(3)) or keys_len != key_len or count != numel or \
            len(blob) != m.end() + numel * dtype.itemsize:
        return None
    return np.frombuffer(blob, dtype, numel, m.end())


def _parse_vector(data: bytes) -> np.ndarray | None:
    """A pickled 1-D contiguous tensor (every tensor GR1's LMDB holds) laid out as Python's protocol 4/5 pickler
    writes torch's reduction of it, in one frame; None for anything else."""
    head = _VECTOR_HEAD.match(data)
    if head is None or (head.group(1) is not None and struct.unpack("<Q", head.group(1))[0] != len(data) - 11):
        return None
    length = struct.unpack("<I", head.group(2))[0] if head.group(2) is not None else head.group(3)[0]
    end = head.end() + length
    tail = _VECTOR_TAIL.fullmatch(data, end)
    if tail is None:
        return None
    storage = _parse_storage(data[head.end():end])
    return storage if storage is not None and storage.size == _int(tail.group(1, 2, 3)) else None


def _parse_plain(data: bytes) -> tuple[bool, Any]:
    """(True, value) for a pickled int, bool or str exactly as Python's pickler writes one (protocol 2-5);
    (False, None) for anything else."""
    if len(data) < 4 or data[0] != 0x80 or not 2 <= data[1] <= 5 or data[-1] != _STOP:
        return False, None
    pos = 2
    if data[pos] == _FRAME:
        if len(data) < 12 or len(data) - 11 != struct.unpack_from("<Q", data, 3)[0]:
            return False, None
        pos = 11
    op, end = data[pos], len(data) - 1
    if op in (0x88, 0x89) and pos + 1 == end:  # NEWTRUE / NEWFALSE
        return True, op == 0x88
    if op in _INT_OPCODES and pos + 1 + struct.calcsize(_INT_OPCODES[op]) == end:
        return True, struct.unpack_from(_INT_OPCODES[op], data, pos + 1)[0]
    if op == 0x8C and pos + 2 <= end:  # SHORT_BINUNICODE [MEMOIZE]
        text_end = pos + 2 + data[pos + 1]
    elif op == ord("X") and pos + 5 <= end:  # BINUNICODE [MEMOIZE / BINPUT 0]
        text_end = pos + 5 + struct.unpack_from("<I", data, pos + 1)[0]
    else:
        return False, None
    tail = data[text_end:end]
    if text_end > end or tail not in (b"", b"\x94", b"q\x00"):
        return False, None
    start = pos + 2 if op == 0x8C else pos + 5
    try:
        return True, data[start:text_end].decode("utf-8")
    except UnicodeDecodeError:
        return False, None


# ---------------------------------------------------------------- restricted fallback for any other layout

def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, requires_grad: bool = False,
                    hooks: Any = None, *metadata: Any) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2 -> numpy array (read-only view of the LMDB value)."""
    if not isinstance(storage, np.ndarray) or not all(isinstance(n, int) for n in (offset, *size, *stride)):
        raise LMDBValueError("bad tensor arguments")
    if not size:
        if not 0 <= offset < storage.size:
            raise LMDBValueError(f"scalar tensor at offset {offset} outside its storage of {storage.size} elements")
        return storage[offset:offset + 1].reshape(())
    if offset < 0 or any(n < 0 for n in size) or any(s < 0 for s in stride) or len(size) != len(stride):
        raise LMDBValueError(f"bad tensor geometry size={size} stride={stride}")
    if 0 in size:
        return np.empty(tuple(size), storage.dtype)
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
    if extent > storage.size:
        raise LMDBValueError(f"tensor of size {size} does not fit its storage of {storage.size} elements")
    count = math.prod(size)
    contiguous = tuple(math.prod(size[i + 1:]) for i in range(len(size)))
    if all(s == c for n, s, c in zip(size, stride, contiguous) if n > 1):  # the usual case: a plain view
        return storage[offset:offset + count].reshape(tuple(size))
    item = storage.itemsize
    return np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size), strides=tuple(s * item for s in stride),
                                           writeable=False)


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """_codecs.encode as pickle protocol 2 uses it for bytes (text.encode('latin1')); no other codec."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise LMDBValueError(f"unsupported _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only what `globals_` names (pure functions of this module); no persistent ids, no extensions."""

    globals_: dict[tuple[str, str], Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.globals_[(module, name)]
        except KeyError:
            raise LMDBValueError(f"unsupported pickle global {module}.{name}") from None


class _PlainUnpickler(_RestrictedUnpickler):
    """The storage blob's header and key list: numbers, strings, lists and dicts only."""


class _StorageRecordUnpickler(_RestrictedUnpickler):
    """The storage record: ('storage', <torch storage type>, key, location, numel) as a persistent id."""

    globals_ = {("torch", name): dtype for name, dtype in _STORAGE_DTYPES.items()}

    def persistent_load(self, pid: Any) -> Any:
        return pid


def _restricted_load(unpickler: type[_RestrictedUnpickler], stream: io.BytesIO) -> Any:
    try:
        return unpickler(stream).load()
    except LMDBValueError:
        raise
    except Exception as e:  # UnpicklingError, EOFError, TypeError, ... from a malformed pickle
        raise LMDBValueError(f"malformed pickle ({type(e).__name__}: {e})") from None


def _storage_from_bytes(blob: bytes) -> np.ndarray:
    """torch.storage._load_from_bytes for the legacy format: -> 1-D numpy array viewing `blob`."""
    if not isinstance(blob, bytes):
        raise LMDBValueError("tensor storage is not bytes")
    exact = _parse_storage(blob)
    if exact is not None:
        return exact
    stream = io.BytesIO(blob)
    header = [_restricted_load(_PlainUnpickler, stream) for _ in range(3)]
    if header[0] != _LEGACY_MAGIC or header[1] != _LEGACY_PROTOCOL or not isinstance(header[2], dict) \
            or not header[2].get("little_endian"):
        raise LMDBValueError("not a little-endian legacy torch.save storage")
    record = _restricted_load(_StorageRecordUnpickler, stream)
    keys = _restricted_load(_PlainUnpickler, stream)
    if not (isinstance(record, tuple) and len(record) >= 5 and record[0] == "storage" and keys == [record[2]]
            and isinstance(record[1], str) and isinstance(record[4], int)):
        raise LMDBValueError(f"unexpected tensor storage record (a {type(record).__name__})")
    dtype, numel = np.dtype(record[1]), record[4]
    if len(blob) < stream.tell() + 8:
        raise LMDBValueError("truncated tensor storage")
    (count,) = struct.unpack_from("<q", blob, stream.tell())
    offset = stream.tell() + 8
    if count != numel or numel < 0 or offset + numel * dtype.itemsize > len(blob):
        raise LMDBValueError("truncated tensor storage")
    return np.frombuffer(blob, dtype, numel, offset)


class _ValueUnpickler(_RestrictedUnpickler):
    globals_ = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
        ("collections", "OrderedDict"): OrderedDict,
        ("_codecs", "encode"): _latin1_bytes,  # how pickle protocol 2 writes bytes
    }


# ---------------------------------------------------------------- reader

def loads_value(data: bytes | memoryview) -> Any:
    """An LMDB value written by GR1-Training or this project -> Python object; tensors -> numpy arrays (read-only
    views of `data`). Raises LMDBValueError (a ValueError) for anything else; never runs code from the value."""
    data = bytes(data)
    vector = _parse_vector(data)
    if vector is not None:
        return vector
    ok, plain = _parse_plain(data)
    if ok:
        return plain
    return _restricted_load(_ValueUnpickler, io.BytesIO(data))

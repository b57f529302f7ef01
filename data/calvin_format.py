"""Everything about how CALVIN data is laid out: the raw split folders, the LMDB key schema of GR1-Training, value
(de)serialisation, camera sizes, state/action layout, the gripper mapping and JPEG coding.

Used by the converter (data/convert.py), the dataset (data/lmdb_dataset.py) and evaluation. Imports neither torch
nor any CALVIN package: LMDB values that are pickled torch tensors are written and read here without torch.

Raw split (``task_ABC_D/training``, ``.../validation``): one ``episode_{id:07d}.npz`` per frame and
``lang_annotations/auto_lang_ann.npy`` whose ``info.indx`` lists (start, end) frame ids, end inclusive, and whose
``language.ann`` lists the instruction of each segment.

LMDB (GR1-Training's schema, GR1_REFERENCE.md §8): ``cur_step`` (index of the last step), and per step
``cur_episode_{s}``, ``done_{s}``, ``rgb_static_{s}``, ``rgb_gripper_{s}`` (JPEG bytes as a uint8 tensor),
``abs_action_{s}``, ``rel_action_{s}``, ``robot_obs_{s}``, ``scene_obs_{s}``; per segment ("episode")
``inst_{e}``, ``inst_token_{e}``, optionally ``inst_emb_{e}``. This project adds one key, ``conversion_info`` (JSON),
that the reference reader never asks for: the split boundary and the converter's progress.
"""
from __future__ import annotations

import codecs
import io
import json
import math
import os
import pickle
import re
import struct
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

try:  # optional: libjpeg-turbo without Pillow's per-image overhead, same pixels, ~1.5x faster dataset items
    import simplejpeg
except ImportError:  # Pillow decodes instead
    simplejpeg = None

JPEG_DECODER = "simplejpeg" if simplejpeg is not None else "Pillow"

# ---------------------------------------------------------------- cameras, state and action layout

CAMERA_SIZES = {"rgb_static": 200, "rgb_gripper": 84}  # square RGB images, pixels
JPEG_QUALITY = 75  # torchvision.io.encode_jpeg's default, which GR1-Training's converter used
ARM_DIM = 6  # TCP position (3) + Euler angles (3)
ACTION_DIM = 7  # arm (6) + gripper (1)
ROBOT_OBS_DIM = 15
SCENE_OBS_DIM = 24
FRAME_ARRAYS = {  # npz key -> expected shape; the only arrays GR1 reads from a frame file
    "rgb_static": (200, 200, 3),
    "rgb_gripper": (84, 84, 3),
    "actions": (ACTION_DIM,),
    "rel_actions": (ACTION_DIM,),
    "robot_obs": (ROBOT_OBS_DIM,),
    "scene_obs": (SCENE_OBS_DIM,),
}
ACTION_KEYS = {"ee_rel_pose": "rel_action", "ee_abs_pose": "abs_action"}  # cfg.action_mode -> LMDB key prefix


def gripper_action_to_binary(action: np.ndarray) -> np.ndarray:
    """CALVIN gripper action -1 (close) / +1 (open) -> 0 / 1, computed in the input's dtype as (a + 1) / 2."""
    return (action + 1) / 2


def gripper_state_index(robot_obs_last: float) -> int:
    """Column of the one-hot gripper state: 0 = closed (-1), 1 = open (+1), as int((g + 1) / 2) in float64."""
    index = int((float(robot_obs_last) + 1.0) / 2.0)  # Faithful to GR1-Training: .long() truncates towards zero
    if index not in (0, 1):
        raise ValueError(f"gripper state {robot_obs_last!r} (robot_obs[-1]) is not -1 or +1")
    return index


# ---------------------------------------------------------------- raw CALVIN split

ANNOTATION_FILE = os.path.join("lang_annotations", "auto_lang_ann.npy")
SPLITS = ("training", "validation")


class CalvinFormatError(ValueError):
    """Input data is not in the CALVIN format; the message names the file and what to fix."""


@dataclass(frozen=True)
class Segment:
    """One language-annotated window of a split: frames start..end (inclusive) and its instruction."""

    split: str
    start: int
    end: int
    text: str

    @property
    def num_frames(self) -> int:
        return self.end - self.start + 1


def episode_path(split_dir: str, frame_id: int) -> str:
    return os.path.join(split_dir, f"episode_{frame_id:07d}.npz")


def load_segments(split_dir: str, split: str) -> list[Segment]:
    """The annotated segments of one split folder, in file order (the order GR1-Training writes them)."""
    if not os.path.isdir(split_dir):
        raise CalvinFormatError(f"split folder not found: {split_dir} (--input_dir must contain training/ and "
                                "validation/, e.g. task_ABC_D/)")
    path = os.path.join(split_dir, ANNOTATION_FILE)
    if not os.path.isfile(path):
        raise CalvinFormatError(f"{path} not found: every CALVIN split has lang_annotations/auto_lang_ann.npy "
                                "(the language-annotated download, not the raw-only one)")
    try:
        data = np.load(path, allow_pickle=True).item()
        texts, windows = data["language"]["ann"], data["info"]["indx"]
    except Exception as e:  # a corrupt or foreign file: say which and why
        raise CalvinFormatError(f"{path}: cannot read language.ann / info.indx ({type(e).__name__}: {e})") from e
    if len(texts) != len(windows):
        raise CalvinFormatError(f"{path}: {len(texts)} instructions but {len(windows)} (start, end) windows")
    segments = []
    for text, (start, end) in zip(texts, windows):
        if not 0 <= int(start) <= int(end):
            raise CalvinFormatError(f"{path}: bad window ({start}, {end})")
        segments.append(Segment(split, int(start), int(end), str(text)))
    return segments


def load_frame(path: str) -> dict[str, np.ndarray]:
    """The arrays GR1 uses from one frame file, shape-checked; errors name the file."""
    if not os.path.isfile(path):
        raise CalvinFormatError(f"missing episode file {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            absent = [key for key in FRAME_ARRAYS if key not in npz.files]
            frame = {key: npz[key] for key in FRAME_ARRAYS if key in npz.files}  # only these are decompressed
    except Exception as e:  # zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError ...
        raise CalvinFormatError(f"corrupt episode file {path} ({type(e).__name__}: {e}); replace it (re-extract the "
                                "split) and re-run: finished segments are kept") from e
    if absent:
        raise CalvinFormatError(f"{path}: no array {absent[0]!r} in the episode file (is it a CALVIN frame?)")
    for key, shape in FRAME_ARRAYS.items():
        if frame[key].shape != shape:
            raise CalvinFormatError(f"{path}: '{key}' has shape {frame[key].shape}, expected {shape}")
    for key in CAMERA_SIZES:
        if frame[key].dtype != np.uint8:
            raise CalvinFormatError(f"{path}: '{key}' has dtype {frame[key].dtype}, expected uint8")
    return frame


# ---------------------------------------------------------------- JPEG

def encode_jpeg(image_hwc: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> JPEG bytes (quality 75, 4:2:0 like torchvision's encoder); deterministic."""
    buffer = io.BytesIO()
    Image.fromarray(image_hwc, "RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _decode_simplejpeg(data: bytes | memoryview | np.ndarray, size: int) -> np.ndarray:
    """(size, size, 3) uint8 with libjpeg-turbo's default (accurate) IDCT and upsampling, as Pillow and torchvision."""
    try:
        image = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False)
    except ValueError as e:
        raise ValueError(f"JPEG is not a valid {size}x{size} RGB image ({e})") from e
    if image.shape != (size, size, 3):
        raise ValueError(f"JPEG is not a valid {size}x{size} RGB image (it is {image.shape[1]}x{image.shape[0]})")
    return image


def _decode_jpeg_image(data: bytes | memoryview | np.ndarray, size: int) -> Image.Image:
    try:
        return Image.frombytes("RGB", (size, size), data, "jpeg", "RGB", "")
    except (ValueError, OSError) as e:  # wrong size, truncated or not a JPEG
        raise ValueError(f"JPEG is not a valid {size}x{size} RGB image ({e})") from e


def decode_jpeg_chw(data: bytes | memoryview | np.ndarray, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """JPEG bytes of a size x size RGB image -> channels-first (3, size, size) uint8, written into `out` if given.

    Same pixels as decode_jpeg; with Pillow each channel is copied out once (cheaper than packing, then transposing).
    """
    out = np.empty((3, size, size), np.uint8) if out is None else out
    if simplejpeg is not None:
        out[...] = _decode_simplejpeg(data, size).transpose(2, 0, 1)
        return out
    image = _decode_jpeg_image(data, size)
    for channel, band in enumerate("RGB"):
        out[channel] = np.frombuffer(image.tobytes("raw", band), np.uint8).reshape(size, size)
    return out


def decode_jpeg(data: bytes | memoryview | np.ndarray, size: int) -> np.ndarray:
    """JPEG bytes of a size x size RGB image -> (size, size, 3) uint8.

    Decodes with simplejpeg if it is installed, else with Pillow's decoder called directly (Image.frombytes with
    the 'jpeg' decoder, skipping Image.open's Python header parser, which costs more than decoding an 84 px image).
    Both are libjpeg-turbo with its default settings, like torchvision.io.decode_jpeg: the same pixels (tests check
    this against GR1-Training's items, and the two decoders against each other).
    """
    if simplejpeg is not None:
        return _decode_simplejpeg(data, size)
    return np.frombuffer(_decode_jpeg_image(data, size).tobytes(), np.uint8).reshape(size, size, 3)


# ---------------------------------------------------------------- pickled torch tensors without torch
#
# GR1-Training stores tensors as pickle.dumps(tensor). Such a pickle calls torch._utils._rebuild_tensor_v2 on a
# storage rebuilt by torch.storage._load_from_bytes from a nested blob in torch's legacy torch.save format:
# five small pickles (magic number, protocol 1001, system info, the storage record as a persistent id, the list
# of storage keys) followed by, per storage, its element count (8 bytes little-endian) and its raw bytes.
# Writing that layout ourselves makes values deterministic (torch puts the storage's memory address in the key)
# and torch-free; reading it ourselves is ~10x faster than pickle.loads and runs no pickle global but these.

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
    """An LMDB value is not in the format GR1-Training writes."""


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


def dumps_tensor(array: np.ndarray) -> bytes:
    """A numpy array as the bytes of pickle.dumps(torch.from_numpy(array)) (up to the storage key), without torch.

    torch's pickle.loads of the result gives a contiguous CPU tensor of the same dtype, shape and values.
    """
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


_RECORD_START = b"\x80\x02(X\x07\x00\x00\x00storageq\x00ctorch\n"
_INT_OPCODES = {ord("K"): "<B", ord("M"): "<H", ord("J"): "<i"}


def _storage_fast_path(blob: bytes) -> np.ndarray | None:
    """The storage exactly as torch writes it, parsed by position (~4x faster than unpickling its five pickles);
    None if anything differs, and the general parser takes over."""
    pos = len(_LEGACY_HEADER)
    if not blob.startswith(_LEGACY_HEADER) or not blob.startswith(_RECORD_START, pos):
        return None
    pos += len(_RECORD_START)
    name_end = blob.find(b"\n", pos, pos + 32)
    dtype = _STORAGE_DTYPES.get(blob[pos:name_end].decode("ascii", "replace")) if name_end > 0 else None
    if dtype is None or blob[name_end:name_end + 4] != b"\nq\x01X":
        return None
    pos = name_end + 4
    (key_len,) = struct.unpack_from("<I", blob, pos)
    key = blob[pos + 4:pos + 4 + key_len]
    pos += 4 + key_len
    location = b"q\x02X\x03\x00\x00\x00cpuq\x03"
    if not blob.startswith(location, pos):
        return None
    pos += len(location)
    if blob[pos] not in _INT_OPCODES:
        return None
    fmt = _INT_OPCODES[blob[pos]]
    (numel,) = struct.unpack_from(fmt, blob, pos + 1)
    pos += 1 + struct.calcsize(fmt)
    keys = b"Ntq\x04Q.\x80\x02]q\x00X" + struct.pack("<I", key_len) + key + b"q\x01a."
    if not blob.startswith(keys, pos):
        return None
    pos += len(keys)
    dtype = np.dtype(dtype)
    if len(blob) < pos + 8 or struct.unpack_from("<q", blob, pos)[0] != numel or \
            len(blob) != pos + 8 + numel * dtype.itemsize:
        return None
    return np.frombuffer(blob, dtype, numel, pos + 8)


def _storage_from_bytes(blob: bytes) -> np.ndarray:
    """torch.storage._load_from_bytes for the legacy format: -> 1-D numpy array viewing `blob`."""
    fast = _storage_fast_path(blob)
    if fast is not None:
        return fast
    stream = io.BytesIO(blob)
    try:
        header = [pickle.load(stream) for _ in range(3)]
        if header[0] != _LEGACY_MAGIC or header[1] != _LEGACY_PROTOCOL or not header[2].get("little_endian"):
            raise LMDBValueError("not a little-endian legacy torch.save storage")
        record = _StorageRecordUnpickler(stream).load()
        keys = pickle.load(stream)
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as e:
        raise LMDBValueError(f"unreadable tensor storage ({e})") from e
    if not (isinstance(record, tuple) and len(record) >= 5 and record[0] == "storage" and keys == [record[2]]):
        raise LMDBValueError(f"unexpected tensor storage record {record!r}")
    dtype, numel = np.dtype(record[1]), int(record[4])
    (count,) = struct.unpack_from("<q", blob, stream.tell())
    offset = stream.tell() + 8
    if count != numel or offset + numel * dtype.itemsize > len(blob):
        raise LMDBValueError("truncated tensor storage")
    return np.frombuffer(blob, dtype, numel, offset)


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, requires_grad: bool = False,
                    hooks: Any = None, *metadata: Any) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2 -> numpy array (read-only view of the LMDB value)."""
    if not size:
        return storage[offset:offset + 1].reshape(())
    if offset < 0 or any(n < 0 for n in size) or any(s < 0 for s in stride) or len(size) != len(stride):
        raise LMDBValueError(f"bad tensor geometry size={size} stride={stride}")
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
    if 0 in size:
        return np.empty(tuple(size), storage.dtype)
    if extent > storage.size:
        raise LMDBValueError(f"tensor of size {size} does not fit its storage of {storage.size} elements")
    count = math.prod(size)
    contiguous = tuple(math.prod(size[i + 1:]) for i in range(len(size)))
    if all(s == c for n, s, c in zip(size, stride, contiguous) if n > 1):  # the usual case: a plain view
        return storage[offset:offset + count].reshape(tuple(size))
    item = storage.itemsize
    return np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size), strides=tuple(s * item for s in stride),
                                           writeable=False)


class _StorageRecordUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise LMDBValueError(f"unsupported tensor storage type {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        return pid


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("collections", "OrderedDict"): OrderedDict,
    ("_codecs", "encode"): codecs.encode,  # how pickle protocol 2 writes bytes
}


class _ValueUnpickler(pickle.Unpickler):
    """Unpickles LMDB values; tensors become numpy arrays and no other global can run (safe on untrusted files)."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise LMDBValueError(f"unsupported pickle global {module}.{name}") from None


_STORAGE_CALL = re.compile(rb"\x8c\x0dtorch\.storage\x94?\x8c\x10_load_from_bytes\x94?\x93\x94?(?:B(.{4})|C(.))",
                           re.DOTALL)  # BINBYTES or SHORT_BINBYTES: the nested storage blob
_TENSOR_ARGS = re.compile(rb"\x94?\x85\x94?R\x94?K\x00(?:K(.)|M(..)|J(.{4}))\x85\x94?K\x01\x85\x94?\x89", re.DOTALL)


def _vector_fast_path(data: bytes) -> np.ndarray | None:
    """A pickled 1-D contiguous tensor (every tensor GR1's LMDB holds) laid out as Python's protocol 4/5 pickler
    writes it (in one frame: pickles under 64 KB), parsed by position; None for anything else (the general
    unpickler takes over)."""
    if len(data) < 64 or data[0] != 0x80 or data[1] not in (4, 5) or b"_rebuild_tensor_v2" not in data[:64]:
        return None
    call = _STORAGE_CALL.search(data, 0, 128)
    if call is None:
        return None
    start = call.end()
    end = start + (struct.unpack("<I", call.group(1))[0] if call.group(1) is not None else call.group(2)[0])
    args = _TENSOR_ARGS.match(data, end)
    if args is None:
        return None
    size = args.group(1) or args.group(2) or args.group(3)
    (numel,) = struct.unpack({1: "<B", 2: "<H", 4: "<i"}[len(size)], size)
    storage = _storage_fast_path(data[start:end])
    return storage if storage is not None and storage.size == numel else None


def loads_value(data: bytes | memoryview) -> Any:
    """An LMDB value written by GR1-Training or this project -> Python object; tensors -> numpy arrays."""
    data = bytes(data)
    vector = _vector_fast_path(data)
    if vector is not None:
        return vector
    return _ValueUnpickler(io.BytesIO(data)).load()


def dumps_value(value: Any) -> bytes:
    """A plain Python value (int, bool, str) as GR1-Training pickles it; numpy arrays as torch tensors."""
    if isinstance(value, np.ndarray):
        return dumps_tensor(value)
    return pickle.dumps(value, protocol=4)


# ---------------------------------------------------------------- LMDB keys

CUR_STEP_KEY = b"cur_step"
CONVERSION_INFO_KEY = b"conversion_info"  # added by this project; JSON, see data/convert.py
STEP_FIELDS = ("cur_episode", "done", "rgb_static", "rgb_gripper", "abs_action", "rel_action", "robot_obs",
               "scene_obs")
EPISODE_FIELDS = ("inst", "inst_token", "inst_emb")


def step_key(field: str, step: int) -> bytes:
    assert field in STEP_FIELDS, field
    return f"{field}_{step}".encode()


def episode_key(field: str, episode: int) -> bytes:
    assert field in EPISODE_FIELDS, field
    return f"{field}_{episode}".encode()


def dumps_info(info: dict[str, Any]) -> bytes:
    return json.dumps(info, sort_keys=True).encode()


def loads_info(data: bytes | None) -> dict[str, Any] | None:
    return None if data is None else json.loads(bytes(data))


def frame_values(step: int, episode: int, done: bool, frame: dict[str, np.ndarray]) -> list[tuple[bytes, bytes]]:
    """The (key, value) pairs GR1-Training writes for one frame."""
    return [
        (step_key("cur_episode", step), dumps_value(episode)),
        (step_key("done", step), dumps_value(done)),
        (step_key("rgb_static", step), dumps_tensor(np.frombuffer(encode_jpeg(frame["rgb_static"]), np.uint8))),
        (step_key("rgb_gripper", step), dumps_tensor(np.frombuffer(encode_jpeg(frame["rgb_gripper"]), np.uint8))),
        (step_key("abs_action", step), dumps_tensor(frame["actions"])),
        (step_key("rel_action", step), dumps_tensor(frame["rel_actions"])),
        (step_key("scene_obs", step), dumps_tensor(frame["scene_obs"])),
        (step_key("robot_obs", step), dumps_tensor(frame["robot_obs"])),
    ]

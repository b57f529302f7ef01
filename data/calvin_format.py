"""How CALVIN data is laid out: the raw split folders, the LMDB key schema of GR1-Training, frame arrays and JPEG
coding. LMDB values are (de)serialised by data/codec.py; camera names and sizes, state and action widths and the
gripper mapping are facts.py's (shared with the model and evaluation), re-exported here for the data modules.

Used by the converter (data/convert.py), the dataset (data/lmdb_dataset.py) and evaluation. Imports neither torch
nor any CALVIN package.

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

import io
import json
import os
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

try:
    from numpy._core import multiarray as _multiarray  # numpy >= 2
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray

import facts
from data.codec import dumps_value

try:  # optional: libjpeg-turbo without Pillow's per-image overhead, same pixels, ~1.5x faster dataset items
    import simplejpeg
except ImportError:  # Pillow decodes instead
    simplejpeg = None

JPEG_DECODER = "simplejpeg" if simplejpeg is not None else "Pillow"

# ---------------------------------------------------------------- cameras, state and action layout

# Image key (rgb_static, rgb_gripper: in frame files, LMDB keys and batches) -> square image side in pixels
CAMERA_SIZES = {facts.CAMERA_KEYS[cam]: size for cam, size in facts.CAMERA_SIZES.items()}
ARM_DIM, ACTION_DIM = facts.ARM_DIM, facts.ACTION_DIM  # the data modules read the facts they need as cf.*
ROBOT_OBS_DIM, SCENE_OBS_DIM = facts.ROBOT_OBS_DIM, facts.SCENE_OBS_DIM
gripper_action_to_binary = facts.gripper_to_binary  # the action's -1 / +1 -> 0 / 1
gripper_state_index = facts.gripper_state_index  # the robot state's -1 / +1 -> one-hot column
JPEG_QUALITY = 75  # torchvision.io.encode_jpeg's default, which GR1-Training's converter used
FRAME_ARRAYS = {  # npz key -> expected shape; the only arrays GR1 reads from a frame file
    **{key: (size, size, 3) for key, size in CAMERA_SIZES.items()},
    "actions": (ACTION_DIM,),
    "rel_actions": (ACTION_DIM,),
    "robot_obs": (ROBOT_OBS_DIM,),
    "scene_obs": (SCENE_OBS_DIM,),
}
NUMERIC_ARRAYS = ("actions", "rel_actions", "robot_obs", "scene_obs")  # arrays that must be finite
ACTION_KEYS = {"ee_rel_pose": "rel_action", "ee_abs_pose": "abs_action"}  # cfg.action_mode -> LMDB key prefix




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


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain Python data and numpy arrays / scalars only: a crafted file cannot call any other function."""

    ALLOWED = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        # numpy < 2 pickles numpy.core.multiarray, numpy 2 numpy._core.multiarray: the same two functions
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
            return getattr(_multiarray, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed here (only numpy arrays and plain data)")


def read_object_npy(path: str):
    """The object a .npy file holds (CALVIN's auto_lang_ann.npy: a pickled dict), read without running code from it:
    np.load(allow_pickle=True) would call whatever the file names."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        _, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                       else np.lib.format.read_array_header_2_0(f))
        if not dtype.hasobject:
            raise ValueError(f"an array of {dtype}, not a pickled object")
        array = _NumpyOnlyUnpickler(f).load()
    return array.item() if isinstance(array, np.ndarray) and array.shape == () else array


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
        data = read_object_npy(path)
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
    for key in NUMERIC_ARRAYS:
        bad = np.flatnonzero(~np.isfinite(frame[key]))
        if len(bad):  # GR1-Training would train on it: every loss NaN from then on
            raise CalvinFormatError(f"{path}: '{key}' holds a non-finite value ({frame[key][bad[0]]} at index "
                                    f"{bad[0]}); fix or drop this frame and re-run: finished segments are kept")
    return frame


# ---------------------------------------------------------------- JPEG

def encode_jpeg(image_hwc: np.ndarray) -> bytes:
    """(R, R, 3) uint8 camera image -> JPEG bytes (quality 75, 4:2:0 like torchvision's encoder); deterministic."""
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
    jpegs = {cam: np.frombuffer(encode_jpeg(frame[cam]), np.uint8) for cam in CAMERA_SIZES}
    return [
        (step_key("cur_episode", step), dumps_value(episode)),
        (step_key("done", step), dumps_value(done)),
        (step_key("rgb_static", step), dumps_value(jpegs["rgb_static"])),
        (step_key("rgb_gripper", step), dumps_value(jpegs["rgb_gripper"])),
        (step_key("abs_action", step), dumps_value(frame["actions"])),
        (step_key("rel_action", step), dumps_value(frame["rel_actions"])),
        (step_key("scene_obs", step), dumps_value(frame["scene_obs"])),
        (step_key("robot_obs", step), dumps_value(frame["robot_obs"])),
    ]

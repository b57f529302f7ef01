"""Reading weight files without running code from them.

Every file is untrusted. :func:`load_file` is ``torch.load(weights_only=True)`` and nothing else: no fallback to full
unpickling. Where a legitimate file of some kind pickles more than tensors and containers, exactly the globals listed
for that kind in :data:`SAFE_GLOBALS` are allowed (each is inert: it builds a value and calls nothing).

OpenAI's CLIP ``ViT-B-32.pt`` is a TorchScript archive. ``torch.jit.load`` is not used on it: it compiles and runs
the archive's TorchScript (``__setstate__`` methods run at load time), and TorchScript, although it cannot call
Python, can call tensor operators such as ``torch.from_file(name, shared=True)``, which creates and writes files.
:func:`load_clip_file` reads the archive as the zip file it is instead: the tensors of its ``data.pkl`` through a
restricted unpickler whose module classes are inert records, the tensor bytes from the zip entries; no TorchScript is
compiled or run. Which tensors are parameters and buffers (what ``state_dict()`` returns) is read from the class
declarations in the archive's ``code/`` files (``__parameters__`` / ``__buffers__``), as text.

A file that cannot be loaded (missing, empty, truncated, not a torch file, or holding anything else) is a
:class:`CheckpointError` whose one-line message names the file and says why.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import pickle
import re
import warnings
import zipfile
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from config import expand_path


class CheckpointError(RuntimeError):
    """A weights file cannot be loaded or does not fit the model; the message names the file and says why."""


# Numpy scalars (e.g. an epoch or loss counter saved as np.int64) pickle as numpy's `scalar` function of a dtype
# whose class must be allowed to be built; numpy 1.x files name the function numpy.core.multiarray.scalar, numpy 2.x
# numpy._core.multiarray.scalar.
try:
    from numpy._core.multiarray import scalar as _NUMPY_SCALAR
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import scalar as _NUMPY_SCALAR
_NUMPY_SCALARS = [(_NUMPY_SCALAR, "numpy.core.multiarray.scalar"), (_NUMPY_SCALAR, "numpy._core.multiarray.scalar"),
                  np.dtype, *sorted({type(np.dtype(c)) for c in "?bhilqBHILQefd"}, key=str)]

SAFE_GLOBALS: dict[str, list] = {
    # GR1_<n>.pth of this project and of GR1-Training (acc.save({'state_dict': ...})), ckpt_path, training state,
    # CLIP state dicts: tensors and containers only.
    "checkpoint": [],
    # MAE's own training script saves {'model', 'optimizer', 'epoch', 'scaler', 'args'} with args an
    # argparse.Namespace (the released mae_pretrain_vit_base.pth holds 'model' only).
    "mae": [argparse.Namespace],
    # Bytedance GR-1's snapshot_ABC.pt: its training code is not public (its evaluation reads payload['state_dict']
    # only); snapshots of that era may also hold the run's argparse.Namespace and numpy scalar counters.
    "bytedance": [argparse.Namespace, *_NUMPY_SCALARS],
}


def _reason(e: Exception) -> str:
    """One line saying why torch.load refused or failed."""
    text = str(e)
    blocked = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"but got <class '([\w.]+)'>", text)
    if blocked:
        return (f"it holds a pickled Python object ({blocked.group(1)}) that a weights file does not need; it was "
                "refused unread (nothing in the file was run)")
    if isinstance(e, pickle.UnpicklingError):
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        return f"not a torch weights file ({detail.group(1).strip() if detail else 'unreadable pickle'})"
    if isinstance(e, EOFError):
        return "the file ends early (truncated?)"
    if "central directory" in text or "zip archive" in text:
        return "truncated or corrupt zip archive (an interrupted download or copy?)"
    first = text.strip().splitlines()[0] if text.strip() else "no detail"
    return f"not a torch weights file ({type(e).__name__}: {first[:200]})"


def load_file(path: str, kind: str = "checkpoint") -> Any:
    """torch.load(path) on CPU with weights_only=True, allowing exactly SAFE_GLOBALS[kind]; one-line errors."""
    path = expand_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"cannot load {path}: the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(SAFE_GLOBALS[kind]):
            warnings.simplefilter("ignore")  # torch's notes on legacy formats; the outcome is reported below
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, KeyError, TypeError, OSError,
            AttributeError, IndexError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"cannot load {path}: {_reason(e)}") from None


def checkpoint_path(save_path: str, epoch: int) -> str:
    """save_path/GR1_<epoch>.pth: where training saves the checkpoint of `epoch` (GR1-Training's file name), and
    where load_epoch and evaluation look for it."""
    return os.path.join(save_path, f"GR1_{epoch}.pth")


# ---------------------------------------------------------------- TorchScript archives, read as data

_STORAGE_TYPES = {"DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
                  "BFloat16Storage": torch.bfloat16, "ByteStorage": torch.uint8, "CharStorage": torch.int8,
                  "ShortStorage": torch.int16, "IntStorage": torch.int32, "LongStorage": torch.int64,
                  "BoolStorage": torch.bool}


class _ScriptObject:
    """Stands for an instance of a TorchScript class in data.pkl: records its state, runs nothing."""

    qualname = ""

    def __init__(self, *args: Any):
        self.state: Any = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _identity(value: Any, *unused: Any) -> Any:
    return value


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *unused: Any) -> torch.Tensor:
    if not isinstance(storage, torch.Tensor) or math.prod(size) > storage.numel():  # weights never overlap
        raise CheckpointError(f"a tensor of size {tuple(size)} larger than its storage")
    return torch.as_strided(storage, tuple(size), tuple(stride), offset)  # checks the bounds of the storage


class _ScriptUnpickler(pickle.Unpickler):
    """data.pkl of a TorchScript archive: tensors, containers and inert records of script objects; nothing else."""

    _GLOBALS = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
                ("collections", "OrderedDict"): OrderedDict,
                **{("torch.jit._pickle", name): _identity for name in (
                    "restore_type_tag", "build_intlist", "build_tensorlist", "build_doublelist", "build_boollist")},
                **{("torch", name): dtype for name, dtype in _STORAGE_TYPES.items()}}

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix
        self.classes: dict[str, type] = {}
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._GLOBALS:
            return self._GLOBALS[(module, name)]
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self.classes:
                self.classes[qualname] = type(name, (_ScriptObject,), {"qualname": qualname})
            return self.classes[qualname]
        raise CheckpointError(f"unsupported global {module}.{name} in the TorchScript archive")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)
                and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise CheckpointError("unexpected storage record in the TorchScript archive")
        _, dtype, key, _, numel = pid
        if key not in self.storages:
            raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
            if len(raw) < numel * dtype.itemsize:
                raise CheckpointError(f"storage {key} is shorter than its {numel} elements")
            self.storages[key] = torch.frombuffer(raw, dtype=dtype, count=numel) if numel else torch.empty(0, dtype)
        return self.storages[key]


_CLASS = re.compile(r"^class (\w+)\(Module\):\n((?:[ \t]+.*\n|\n)*)", re.MULTILINE)


def _declared_tensors(archive: zipfile.ZipFile, prefix: str) -> dict[str, set[str]]:
    """Class qualname -> names of its parameters and buffers, from the archive's code/ files (read as text)."""
    declared: dict[str, set[str]] = {}
    for name in archive.namelist():
        if not (name.startswith(prefix + "code/") and name.endswith(".py")):
            continue
        module = name[len(prefix + "code/"):-3].replace("/", ".")
        for match in _CLASS.finditer(archive.read(name).decode("utf-8", "replace")):
            lists = re.findall(r"^\s+__(?:parameters|buffers)__ = \[(.*)\]", match.group(2), re.MULTILINE)
            if lists:
                declared[f"{module}.{match.group(1)}"] = {n for text in lists for n in re.findall(r'"([^"]+)"', text)}
    return declared


def _module_tensors(obj: _ScriptObject, declared: dict[str, set[str]], prefix: str = "", depth: int = 0
                    ) -> dict[str, torch.Tensor]:
    """state_dict() of a script module record: its declared parameters and buffers, then its submodules'."""
    if depth > 64 or not isinstance(obj.state, dict):
        return {}
    wanted = declared.get(obj.qualname)
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.state.items():
        if isinstance(value, torch.Tensor) and (wanted is None or key in wanted):
            out[prefix + str(key)] = value
        elif isinstance(value, _ScriptObject):
            out.update(_module_tensors(value, declared, f"{prefix}{key}.", depth + 1))
    return out


def is_torchscript_archive(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.count("/") == 1 and n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def read_torchscript_tensors(path: str) -> dict[str, torch.Tensor]:
    """The state_dict() a TorchScript archive's root module would return, without compiling or running it."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise CheckpointError("no single <name>/data.pkl in the archive")
            prefix = pickles[0][:-len("data.pkl")]
            root = _ScriptUnpickler(archive.read(pickles[0]), archive, prefix).load()
            declared = _declared_tensors(archive, prefix)
    except CheckpointError as e:
        raise CheckpointError(f"cannot load {path}: {e}") from None
    except Exception as e:  # a malformed archive or pickle: zipfile, KeyError, UnpicklingError, RuntimeError ...
        raise CheckpointError(f"cannot load {path}: unreadable TorchScript archive ({_reason(e)})") from None
    if not isinstance(root, _ScriptObject):
        raise CheckpointError(f"cannot load {path}: the TorchScript archive's data.pkl is not a module")
    return _module_tensors(root, declared)

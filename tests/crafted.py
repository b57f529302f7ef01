"""Crafted inputs for the security tests: pickles that run `touch <marker>` when unpickled with plain pickle (what a
hostile LMDB value or weights file does to pickle.loads / torch.load(weights_only=False)), placed in LMDB values,
torch files and TorchScript archives. A test passes only if the marker file is never created."""
from __future__ import annotations

import os
import pickle
import pickletools
import zipfile
from collections import OrderedDict

import lmdb
import numpy as np
import torch

from data import codec


class Run:
    """Unpickling this runs a shell command (os.system)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class Storage:
    def __init__(self, blob: bytes):
        self.blob = blob

    def __reduce__(self):
        return torch.storage._load_from_bytes, (self.blob,)


class Tensor:
    def __init__(self, storage: object, numel: int):
        self.storage, self.numel = storage, numel

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, (self.numel,), (1,), False, OrderedDict())


def blob_of(pickled: bytes) -> bytes:
    """The nested torch.save blob inside a pickled tensor."""
    return next(arg for op, arg, _ in pickletools.genops(pickled) if op.name in ("BINBYTES", "BINBYTES8"))


def crafted_values(marker: str, numel: int = 7) -> dict[str, bytes]:
    """LMDB values that touch `marker` if unpickled with plain pickle: in the value itself, as the storage argument,
    and at each place of a tensor's nested storage blob (header pickles, storage record, key list)."""
    run = pickle.dumps(Run(f"touch {marker}"), protocol=2)
    legit = blob_of(codec.dumps_value(np.zeros(numel)))
    header_end = len(codec._LEGACY_HEADER)
    keys_start = legit.index(b"\x80\x02]")
    blobs = {"blob_magic": run + legit,
             "blob_sys_info": legit[:header_end - len(pickle.dumps(codec._SYS_INFO, protocol=2))] + run
             + legit[header_end:],
             "blob_record": legit[:header_end] + run + legit[keys_start:],
             "blob_keys": legit[:keys_start] + run + legit[legit.index(b"a.", keys_start) + 2:]}
    values = {name: pickle.dumps(Tensor(Storage(blob), numel), protocol=4) for name, blob in blobs.items()}
    values["value"] = pickle.dumps(Run(f"touch {marker}"), protocol=4)
    values["rebuild_arg"] = pickle.dumps(Tensor(Run(f"touch {marker}"), numel), protocol=4)
    return values


def put_value(lmdb_path: str, key: str, value: bytes) -> None:
    env = lmdb.open(lmdb_path, subdir=True)
    try:
        with env.begin(write=True) as txn:
            txn.put(key.encode(), value)
    finally:
        env.close()


def crafted_pth(path: str, marker: str, legacy: bool = False) -> str:
    """A torch.save file whose unpickling touches `marker` (beside a plausible state dict)."""
    torch.save({"state_dict": {"embed_lang.weight": torch.zeros(2)}, "meta": Run(f"touch {marker}")}, path,
               _use_new_zipfile_serialization=not legacy)
    return path


def replace_zip_entry(src: str, dst: str, suffix: str, data: bytes) -> str:
    """A copy of zip `src` whose entry ending in `suffix` holds `data`."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, data if info.filename.endswith(suffix) else zin.read(info))
    return dst

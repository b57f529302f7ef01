"""Shared pieces of the data tests: a converted mini_calvin LMDB (once per session) and LMDB comparison helpers."""
from __future__ import annotations

import os
import shutil

import lmdb
import numpy as np
import pytest
import torch

from conftest import shared_path
from data import calvin_format as cf
from data.convert import convert
from data.lmdb_reader import reading


def mini_calvin() -> str:
    return shared_path("calvin", "mini_calvin")


def lmdb_contents(path: str) -> dict[bytes, bytes]:
    """Every key and value of an LMDB."""
    with reading(path) as env, env.begin() as txn:
        return dict(txn.cursor())


def assert_items_equal(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], where: str) -> None:
    assert list(ours) == list(reference), where
    for key in reference:
        assert ours[key].dtype == reference[key].dtype, f"{where} {key}: {ours[key].dtype} vs {reference[key].dtype}"
        assert ours[key].shape == reference[key].shape, f"{where} {key}"
        assert torch.equal(ours[key], reference[key]), f"{where} {key} differs"


def make_split_root(root: str, windows: dict[str, list[tuple[int, int, str]]], source: str) -> str:
    """A CALVIN split root at `root` whose frame files link to `source`'s and whose annotations are `windows`."""
    for split, items in windows.items():
        split_dir = os.path.join(root, split)
        os.makedirs(os.path.join(split_dir, "lang_annotations"))
        frames = {f for start, end, _ in items for f in range(start, end + 1)}
        for frame in frames:
            name = f"episode_{frame:07d}.npz"
            src = os.path.join(source, split, name)
            os.symlink(src, os.path.join(split_dir, name))
        annotations = {"language": {"ann": [t for _, _, t in items], "task": ["task"] * len(items),
                                    "emb": np.zeros((len(items), 1, 384), np.float32)},
                       "info": {"indx": [(s, e) for s, e, _ in items], "episodes": []}}
        np.save(os.path.join(split_dir, "lang_annotations", "auto_lang_ann.npy"), annotations, allow_pickle=True)
    return root


@pytest.fixture(scope="session")
def mini_lmdb(tmp_path_factory) -> str:
    """mini_calvin converted once (in-process, one worker)."""
    source = mini_calvin()
    out = str(tmp_path_factory.mktemp("mini_lmdb") / "lmdb")
    convert(source, out, workers=1, progress=False)
    return out


def segments_done(path: str) -> int:
    """The converter's committed segments in the LMDB at `path` (0 while it does not exist yet)."""
    if not os.path.exists(os.path.join(path, "data.mdb")):
        return 0
    try:  # the writer may be creating the file right now
        env = lmdb.open(path, readonly=True, lock=False)
    except lmdb.Error:
        return 0
    try:
        with env.begin() as txn:
            info = cf.loads_info(txn.get(cf.CONVERSION_INFO_KEY))
    finally:
        env.close()
    return 0 if info is None else info["segments_done"]


def copy_lmdb(src: str, dst: str) -> str:
    os.makedirs(dst, exist_ok=True)
    shutil.copyfile(os.path.join(src, "data.mdb"), os.path.join(dst, "data.mdb"))
    os.chmod(os.path.join(dst, "data.mdb"), 0o644)
    return dst

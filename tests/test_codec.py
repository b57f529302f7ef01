"""data/codec.py: LMDB values as GR1-Training writes them (torch tensors, ints, bools, strs), read by position or by a
restricted unpickler, never by pickle.load / pickle.loads, so that a crafted value cannot run code."""
from __future__ import annotations

import datetime
import pickle
import re

import numpy as np
import pytest
import torch

from conftest import shared_path
from crafted import Storage, Tensor, blob_of, crafted_values
from data import codec
from data.codec import LMDBValueError, dumps_value, loads_value
from data.lmdb_reader import reading

ARRAYS = [np.arange(7, dtype=np.float64) / 3, np.linspace(-1, 1, 15, dtype=np.float32), np.arange(77, dtype=np.int32),
          np.arange(300).astype(np.uint8), np.linspace(0, 1, 512).astype(np.float16), np.array(3.5),
          np.arange(12, dtype=np.float64).reshape(3, 4), np.array([True, False]), np.arange(70000, dtype=np.int64)]


@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{a.dtype}{list(a.shape)}")
def test_dumps_value_is_what_torch_unpickles(array):
    value = dumps_value(array)
    tensor = pickle.loads(value)  # torch's own unpickling, as GR1-Training's reader does
    expected = torch.from_numpy(array)
    assert tensor.dtype == expected.dtype and tensor.shape == expected.shape and torch.equal(tensor, expected)
    assert value == dumps_value(array.copy()), "serialisation must be deterministic"
    assert np.array_equal(loads_value(value), array) and loads_value(value).dtype == array.dtype


@pytest.mark.parametrize("array", ARRAYS[:4], ids=lambda a: str(a.dtype))
def test_storage_blob_equals_torchs_up_to_the_storage_key(array):
    theirs = blob_of(pickle.dumps(torch.from_numpy(array)))
    key = re.search(rb"q\x01X(....)(\d+)q\x02", theirs).group(2)  # torch uses the storage's address
    ours = blob_of(dumps_value(array)).replace(b"X\x01\x00\x00\x000q", b"X" + len(key).to_bytes(4, "little") + key
                                             + b"q")
    assert ours == theirs


def _no_pickle_load(monkeypatch):
    """The reader must never fall back to plain unpickling."""
    def refuse(*args, **kwargs):
        raise AssertionError("plain pickle.load / pickle.loads called on LMDB data")
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


@pytest.mark.parametrize("exact", [True, False])
def test_loads_value_reads_every_value_of_the_reference_lmdb(monkeypatch, exact):
    with reading(shared_path("fixtures", "tiny_calvin_lmdb")) as env, env.begin() as txn:
        values = dict(txn.cursor())
    assert len(values) == 162
    expected = {key: pickle.loads(value) for key, value in values.items()}  # torch's unpickling (trusted here)
    if not exact:  # the restricted fallback, used when a value is not laid out exactly as torch / Python write it
        monkeypatch.setattr(codec, "_parse_storage", lambda blob: None)
        monkeypatch.setattr(codec, "_parse_vector", lambda data: None)
        monkeypatch.setattr(codec, "_parse_plain", lambda data: (False, None))
    _no_pickle_load(monkeypatch)
    for key, value in values.items():
        ours, theirs = loads_value(value), expected[key]
        if isinstance(theirs, torch.Tensor):
            assert ours.dtype == theirs.numpy().dtype and np.array_equal(ours, theirs.numpy()), key
        else:
            assert type(ours) is type(theirs) and ours == theirs, key


@pytest.mark.parametrize("writer", ["ours", "torch"])
def test_exact_parser_reads_every_1d_tensor_and_plain_value(writer):
    for array in ARRAYS:
        data = dumps_value(array) if writer == "ours" else pickle.dumps(torch.from_numpy(array))
        parsed = codec._parse_vector(data)
        if array.ndim == 1 and len(data) < 65536:
            assert parsed is not None and parsed.dtype == array.dtype and np.array_equal(parsed, array)
        elif array.ndim != 1:  # anything else is left to the restricted unpickler
            assert parsed is None
    for value in (0, 5, 300, 70000, -3, True, False, "open the drawer", "x" * 300, "é"):
        for protocol in (2, 4, 5):
            assert codec._parse_plain(pickle.dumps(value, protocol=protocol)) == (True, value), (value, protocol)
            assert type(loads_value(pickle.dumps(value, protocol=protocol))) is type(value)


def test_non_contiguous_tensors_and_other_globals():
    t = torch.arange(12.0).reshape(3, 4).t()[1:]
    assert np.array_equal(loads_value(pickle.dumps(t)), t.numpy())
    with pytest.raises(LMDBValueError, match="datetime.date"):
        loads_value(pickle.dumps(datetime.date(2024, 1, 1)))
    with pytest.raises(TypeError, match="float"):
        dumps_value(1.5)


# ---------------------------------------------------------------- crafted values (tests/crafted.py)

@pytest.mark.parametrize("place", ["value", "rebuild_arg", "blob_magic", "blob_sys_info", "blob_record", "blob_keys"])
def test_crafted_values_run_no_code(tmp_path, monkeypatch, place):
    marker = tmp_path / "pwned"
    data = crafted_values(str(marker))[place]
    _no_pickle_load(monkeypatch)
    with pytest.raises(LMDBValueError) as error:
        loads_value(data)
    assert "system" in str(error.value) and "\n" not in str(error.value)
    assert not marker.exists()


def test_malformed_values_are_lmdb_value_errors():
    good = dumps_value(np.arange(7.0))
    for bad in (b"", b"\x80", good[:40], good[:-1], good[:-60] + b".", b"garbage", b"\x80\x04\x95" + b"\xff" * 8,
                pickle.dumps(Tensor(Storage(b"\x00" * 10), 7), protocol=4),
                pickle.dumps(Tensor(Storage(blob_of(good)), 70), protocol=4)):  # larger than its storage
        with pytest.raises(LMDBValueError):
            loads_value(bad)

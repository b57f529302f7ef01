"""Reading a GR1/CALVIN LMDB (GR1-Training's schema, data/calvin_format.py): this process's read-only handles, one
value parsed without running code from the LMDB (data/codec.py) with errors naming the LMDB and the key, and the
index read once at start-up (the segment of every step, this project's conversion record). data/lmdb_dataset.py
builds the training windows on it.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import lmdb
import numpy as np

from config import ConfigError, expand_path
from data import calvin_format as cf
from data.codec import LMDBValueError, loads_value


class DatasetError(ConfigError):
    """The LMDB cannot give the requested split; the message says what to fix. (A ConfigError, so that entry points
    report it in one line like any other setup mistake.)"""


_ENVIRONMENTS: dict[str, tuple[int, lmdb.Environment]] = {}  # real path -> (pid that opened it, handle)


def open_lmdb(path: str) -> lmdb.Environment:
    """This process's read-only, lock-free handle of the LMDB at `path` (py-lmdb allows one per file and process;
    lock-free works on read-only media and with any number of reader processes)."""
    key = os.path.realpath(path)
    pid, env = _ENVIRONMENTS.get(key, (None, None))
    if pid == os.getpid():
        return env
    if env is not None:  # inherited through fork: release this process's copy, then open our own
        env.close()
    try:
        env = lmdb.open(path, readonly=True, lock=False, create=False, readahead=False)
    except lmdb.Error as e:  # not an LMDB, corrupt, unreadable
        raise DatasetError(f"LMDB {path} cannot be opened ({_lmdb_reason(e)})") from None
    _ENVIRONMENTS[key] = (os.getpid(), env)
    return env


def _lmdb_reason(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}"


def read_value(txn: lmdb.Transaction, key: bytes, path: str, required: bool = True) -> object:
    """The parsed value of `key`; errors (missing, corrupt, not GR1-Training's format) name the LMDB and the key."""
    try:
        data = txn.get(key)
    except lmdb.Error as e:  # e.g. lmdb.CorruptedError
        raise DatasetError(f"LMDB {path}, key {key.decode(errors='replace')}: {_lmdb_reason(e)}") from None
    if data is None:
        if required:
            raise DatasetError(f"LMDB {path} has no key {key.decode(errors='replace')!r}: it is incomplete or not a "
                               "GR1/CALVIN LMDB")
        return None
    return parse_value(data, key, path)


def parse_value(data: bytes, key: bytes, path: str) -> object:
    try:
        return loads_value(data)
    except LMDBValueError as e:
        raise DatasetError(f"LMDB {path}, key {key.decode(errors='replace')}: unreadable value ({e})") from None


@contextlib.contextmanager
def reading(path: str) -> Iterator[lmdb.Environment]:
    """A read-only handle for a short read: this process's cached one if open, else one closed afterwards (so that
    a converter in this process can reopen the path for writing)."""
    cached = _ENVIRONMENTS.get(os.path.realpath(path), (None,))[0] == os.getpid()
    env = open_lmdb(path)
    try:
        yield env
    finally:
        if not cached:
            close_lmdb(path)


def close_lmdb(path: str) -> None:
    """Close this process's handle of `path`, if any."""
    _, env = _ENVIRONMENTS.pop(os.path.realpath(path), (None, None))
    if env is not None:
        env.close()


@dataclass(frozen=True)
class LMDBIndex:
    """What a dataset needs to know about the whole LMDB, read once: the segment of every step and the splits."""

    path: str
    episode_of_step: np.ndarray  # int32 (N,): cur_episode_{s}
    info: dict | None  # conversion_info written by this project's converter (None: GR1-Training's LMDB)

    @property
    def num_steps(self) -> int:
        return len(self.episode_of_step)

    @property
    def validation_first_step(self) -> int | None:
        """First step of CALVIN's validation split, if the converter recorded it."""
        if self.info is None or "validation" not in self.info.get("splits", {}):
            return None
        return int(self.info["splits"]["validation"]["first_step"])


def read_index(path: str) -> LMDBIndex:
    path = expand_path(path)
    if not os.path.isfile(os.path.join(path, "data.mdb")):
        raise FileNotFoundError(f"LMDB_path {path!r} has no data.mdb: convert CALVIN first (python calvin2lmdb.py "
                                f"--input_dir <task_ABC_D> --output_dir {path}) or set LMDB_path")
    with reading(path) as env, env.begin() as txn:
        info = _read_info(txn, path)
        if info is not None and not info.get("complete"):
            raise DatasetError(f"LMDB {path} is an unfinished conversion ({info.get('segments_done')} of "
                               f"{info.get('num_segments')} segments): re-run the same calvin2lmdb.py command "
                               "to finish it")
        last = read_value(txn, cf.CUR_STEP_KEY, path, required=False)
        if last is None:
            raise DatasetError(f"LMDB {path} has no 'cur_step' key: it is empty or not a GR1/CALVIN LMDB")
        if type(last) is not int or last < 0:
            raise DatasetError(f"LMDB {path}, key cur_step: {last!r:.40} is not a step index")
        episodes = _read_episode_ids(txn, last + 1, path)
    return LMDBIndex(path, episodes, info)


def _read_info(txn: lmdb.Transaction, path: str) -> dict | None:
    try:
        info = cf.loads_info(txn.get(cf.CONVERSION_INFO_KEY))
    except (ValueError, lmdb.Error) as e:  # json.JSONDecodeError, UnicodeDecodeError, CorruptedError
        raise DatasetError(f"LMDB {path}, key conversion_info: unreadable ({type(e).__name__})") from None
    if info is not None and not isinstance(info, dict):
        raise DatasetError(f"LMDB {path}, key conversion_info: not a JSON object")
    return info


def _read_episode_ids(txn: lmdb.Transaction, num_steps: int, path: str) -> np.ndarray:
    """cur_episode_{s} for every step, by one ordered scan of the cur_episode_ keys."""
    prefix = b"cur_episode_"
    episodes = np.full(num_steps, -1, dtype=np.int32)
    try:
        cursor = txn.cursor()
        if cursor.set_range(prefix):
            for key, value in cursor:
                if not key.startswith(prefix):
                    break
                step = int(key[len(prefix):]) if key[len(prefix):].isdigit() else num_steps
                if step < num_steps:
                    episode = parse_value(value, key, path)
                    if type(episode) is not int or not 0 <= episode < 2**31:
                        raise DatasetError(f"LMDB {path}, key {key.decode()}: {episode!r:.40} is not an episode index")
                    episodes[step] = episode
    except lmdb.Error as e:
        raise DatasetError(f"LMDB {path}: cannot scan the cur_episode_ keys ({_lmdb_reason(e)})") from None
    missing = np.flatnonzero(episodes < 0)
    if len(missing):
        raise DatasetError(f"LMDB {path}: key cur_episode_{missing[0]} is missing ({len(missing)} steps lack one); "
                           "the LMDB is incomplete, convert again")
    return episodes

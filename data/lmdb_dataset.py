"""Training windows from a CALVIN LMDB in GR1-Training's schema (written by calvin2lmdb.py here or by the reference).

Item i is the window of seq_len (T) steps starting at step first_step + i, each step with a chunk of chunk_size (K)
actions; frames and actions outside the first step's segment are zero and masked. Items equal GR1-Training's
LMDBDataset items for the same LMDB (fixture ../shared/fixtures/tiny_calvin_lmdb_items.pt), but each is read with
one LMDB get per distinct value (the reference reads ~110 cur_episode values and every action up to K times), the
segment of every step is looked up in an array built once, and values are parsed without torch and without running
code from the LMDB (data/lmdb_reader.py). A value that cannot be read is an error naming the LMDB and the key.

Shape key: T window (seq_len), K action chunk (chunk_size), H/W camera pixels (200 static, 84 gripper).
"""
from __future__ import annotations

import os
import sys

import lmdb
import numpy as np
import torch
from torch.utils.data import Dataset

from config import Config
from data import calvin_format as cf
from data.batch_ring import BatchRing, WrittenBatch, batch_buffers
from data.lmdb_reader import DatasetError, LMDBIndex, open_lmdb, read_index, read_value

SHARES_PREVIOUS = "shares_previous"  # frame sharing's batch key: bool (B,), window b is the one after b - 1 in a group


class LMDBDataset(Dataset):
    """Windows starting at steps first_step ... first_step + num_items - 1 of an LMDB; items are dicts of tensors:

    rgb_static uint8 (T, 3, 200, 200), rgb_gripper uint8 (T, 3, 84, 84), inst_token int32 (77,),
    arm_state float32 (T, 6), gripper_state float32 (T, 2) one-hot, actions float32 (T, K, 7) with the gripper
    in {0, 1}, mask float32 (T, K). Deterministic per index.

    With frame_groups set (frame sharing, make_loader) items also have SHARES_PREVIOUS, bool (): in a batch
    (__getitems__) True where the window is the one after the previous row's window in the same group (its first
    T - 1 frames are then copied from that row, not decoded again); False for an item read alone.
    """

    def __init__(self, index: LMDBIndex, seq_len: int, chunk_size: int, action_mode: str, first_step: int,
                 num_items: int):
        if action_mode not in cf.ACTION_KEYS:
            raise ValueError(f"action_mode must be one of {list(cf.ACTION_KEYS)}, got {action_mode!r}")
        if first_step < 0 or first_step + num_items > index.num_steps:
            raise ValueError(f"steps {first_step}..{first_step + num_items - 1} are outside the LMDB's "
                             f"{index.num_steps} steps")
        self.index, self.seq_len, self.chunk_size = index, seq_len, chunk_size
        self.action_key = cf.ACTION_KEYS[action_mode]
        self.first_step, self.num_items = first_step, num_items
        self._env: lmdb.Environment | None = None
        self._txn: lmdb.Transaction | None = None
        self._pid = -1
        self._tokens: dict[int, np.ndarray] = {}
        self.batch_ring: BatchRing | None = None  # set by make_loader: workers write batches into its buffers
        self.frame_groups: np.ndarray | None = None  # window_groups(g) with frame sharing (set by make_loader)

    def __len__(self) -> int:
        return self.num_items

    def __getstate__(self) -> dict:  # DataLoader workers open their own LMDB handle
        return {**self.__dict__, "_env": None, "_txn": None, "_pid": -1}

    def _get(self, key: bytes, shape: tuple[int | None, ...] | None = None) -> object:
        """The value of `key`; with `shape` (None: any size), a numeric array of that shape (anything else is an error
        naming the key, so that a malformed value cannot silently become wrong training data)."""
        if self._pid != os.getpid():  # first use in this process (a forked worker must not share the handle)
            self._env = open_lmdb(self.index.path)
            self._txn = self._env.begin()
            self._pid = os.getpid()
        value = read_value(self._txn, key, self.index.path)
        if shape is not None and not (isinstance(value, np.ndarray) and value.dtype.kind in "biuf" and len(shape) ==
                                      value.ndim and all(n in (None, m) for n, m in zip(shape, value.shape))):
            got = f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
            raise DatasetError(f"LMDB {self.index.path}, key {key.decode()}: expected a numeric array of shape "
                               f"{shape}, got {got}")
        return value

    def _inst_token(self, episode: int) -> np.ndarray:
        if episode not in self._tokens:
            self._tokens[episode] = np.array(self._get(cf.episode_key("inst_token", episode), (None,)))
        return self._tokens[episode]

    def _valid_steps(self, step: int) -> np.ndarray:
        """bool (T + K - 1,): which of steps step ... step + T + K - 2 belong to step's segment."""
        span = self.seq_len + self.chunk_size - 1
        episodes = self.index.episode_of_step[step:step + span]
        valid = np.zeros(span, dtype=bool)
        valid[:len(episodes)] = episodes == episodes[0]
        return valid

    def window_groups(self, size: int) -> np.ndarray:
        """int64 (num_items,) group id of each window: the windows starting in one segment, cut in index order into
        groups of `size` consecutive windows (a segment's last group can be smaller). Groups never cross segments,
        so the windows of a group share all but one frame with their neighbours."""
        episodes = self.index.episode_of_step[self.first_step:self.first_step + self.num_items]
        new_run = np.r_[True, episodes[1:] != episodes[:-1]]
        run_start = np.maximum.accumulate(np.where(new_run, np.arange(self.num_items), 0))
        starts_group = (np.arange(self.num_items) - run_start) % size == 0
        return np.cumsum(starts_group) - 1

    def item_shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Shape and dtype of each entry of an item (the instruction tokens' dtype is the LMDB's own)."""
        T, K = self.seq_len, self.chunk_size
        tokens = self._inst_token(int(self.index.episode_of_step[self.first_step]))
        shapes = {cam: ((T, 3, size, size), np.dtype(np.uint8)) for cam, size in cf.CAMERA_SIZES.items()}
        shapes = {**shapes, "inst_token": (tokens.shape, tokens.dtype), "arm_state": ((T, cf.ARM_DIM), np.float32),
                  "gripper_state": ((T, 2), np.float32), "actions": ((T, K, cf.ACTION_DIM), np.float32),
                  "mask": ((T, K), np.float32)}
        if self.frame_groups is not None:
            shapes[SHARES_PREVIOUS] = ((), np.dtype(np.bool_))
        return shapes

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        item = {k: torch.from_numpy(np.empty(shape, dtype)) for k, (shape, dtype) in self.item_shapes().items()}
        self.fill(idx, {k: v.numpy() for k, v in item.items()})
        if SHARES_PREVIOUS in item:
            item[SHARES_PREVIOUS].fill_(False)
        return item

    def shares_previous(self, indices: list[int]) -> np.ndarray:
        """bool (len(indices),): True where indices[j] is the window after indices[j - 1] in the same group."""
        idx = np.asarray(indices, dtype=np.int64)
        out = np.zeros(len(idx), dtype=bool)
        if self.frame_groups is not None and len(idx) > 1:
            groups = self.frame_groups[idx]
            out[1:] = (idx[1:] == idx[:-1] + 1) & (groups[1:] == groups[:-1])
        return out

    def __getitems__(self, indices: list[int]) -> WrittenBatch:
        """The batch of `indices`, each item written straight into one buffer per entry: the batch_ring's next
        buffer if set, else new memory (shared inside a DataLoader worker, so nothing is copied to send it).
        collate_batch passes it on as it is; other collate functions see the sequence of items they expect."""
        if self.batch_ring is not None:
            batch, ticket = self.batch_ring.take(len(indices), self.item_shapes())
        else:
            in_worker = torch.utils.data.get_worker_info() is not None
            batch, ticket = batch_buffers(len(indices), self.item_shapes(), shared=in_worker), None
        arrays = {k: v.numpy() for k, v in batch.items()}
        shares = self.shares_previous(indices)
        for row, idx in enumerate(indices):
            known = 0
            if shares[row]:  # the same steps, one later: shift the previous row's frames instead of decoding them
                for cam in cf.CAMERA_SIZES:
                    arrays[cam][row, :-1] = arrays[cam][row - 1, 1:]
                known = self.seq_len - 1
            self.fill(idx, {k: a[row] for k, a in arrays.items()}, known_frames=known)
        if SHARES_PREVIOUS in arrays:
            arrays[SHARES_PREVIOUS][...] = shares
        return WrittenBatch(batch, ticket)

    def fill(self, idx: int, out: dict[str, np.ndarray], known_frames: int = 0) -> None:
        """Writes item `idx` into the arrays `out` (shapes and dtypes of item_shapes(); their contents are ignored,
        except the first `known_frames` camera frames, which the caller has already written; SHARES_PREVIOUS is
        the caller's too)."""
        if not 0 <= idx < self.num_items:
            raise IndexError(f"index {idx} out of range for {self.num_items} windows")
        T, K = self.seq_len, self.chunk_size
        step = self.first_step + idx
        valid = self._valid_steps(step)
        offsets = np.arange(T)[:, None] + np.arange(K)[None, :]  # (T, K): step offset of action j of frame i
        mask = valid[:T, None] & valid[offsets]  # (T, K)
        chunk = np.zeros((T + K - 1, cf.ACTION_DIM), dtype=np.float32)
        for f in np.unique(offsets[mask]):  # each action read once
            chunk[f] = self._get(cf.step_key(self.action_key, step + f), (cf.ACTION_DIM,))  # float64 -> float32
        chunk[:, -1] = cf.gripper_action_to_binary(chunk[:, -1])  # in float32, as the reference
        out["actions"][...] = np.where(mask[..., None], chunk[offsets], np.float32(0))  # (T, K, 7)
        out["mask"][...] = mask
        out["arm_state"][...] = 0
        out["gripper_state"][...] = 0
        for i in range(T):
            if not valid[i]:
                for cam in cf.CAMERA_SIZES:
                    out[cam][i] = 0
                continue
            key = cf.step_key("robot_obs", step + i)
            robot_obs = self._get(key, (cf.ROBOT_OBS_DIM,))
            out["arm_state"][i] = robot_obs[:cf.ARM_DIM]
            try:
                out["gripper_state"][i, cf.gripper_state_index(robot_obs[-1])] = 1
            except (ValueError, OverflowError) as e:  # not -1 / +1, NaN or inf
                raise DatasetError(f"LMDB {self.index.path}, key {key.decode()}: {e}") from None
            if i < known_frames:
                continue
            for cam, size in cf.CAMERA_SIZES.items():
                key = cf.step_key(cam, step + i)
                jpeg = self._get(key)
                if not isinstance(jpeg, np.ndarray) or jpeg.dtype != np.uint8 or jpeg.ndim != 1:
                    raise DatasetError(f"LMDB {self.index.path}, key {key.decode()}: not JPEG bytes (a uint8 vector)")
                try:
                    cf.decode_jpeg_chw(jpeg, size, out=out[cam][i])
                except ValueError as e:
                    raise DatasetError(f"LMDB {self.index.path}, key {key.decode()}: {e}") from None
        out["inst_token"][...] = self._inst_token(int(self.index.episode_of_step[step]))


def ratio_window_range(num_steps: int, start_ratio: float, end_ratio: float, seq_len: int, chunk_size: int
                       ) -> tuple[int, int]:
    """(first_step, num_items) of GR1-Training's LMDBDataset(start_ratio, end_ratio)."""
    first = int(num_steps * start_ratio)
    end = int(num_steps * end_ratio) - seq_len - chunk_size  # Faithful to GR1-Training: the last T + K steps of
    return first, max(0, end - first)                        # each part start no window


def split_ranges(index: LMDBIndex, cfg: Config) -> tuple[str, tuple[int, int], tuple[int, int]]:
    """(split used, train (first_step, num_items), val (first_step, num_items)) for cfg.split."""
    boundary = index.validation_first_step
    split = cfg.split
    if split == "auto":
        split = "calvin" if boundary is not None else "ratio"
        if boundary is None:
            print(f"warning: LMDB {index.path} does not record where CALVIN's validation split starts (GR1-Training's "
                  f"converter?): using the reference's {cfg.train_ratio:g} step-ratio split", file=sys.stderr)
    if split == "calvin":
        if boundary is None:
            raise DatasetError(f"split='calvin' needs an LMDB written by this project's calvin2lmdb.py (it records "
                               f"where the validation split starts); {index.path} does not: use split=ratio")
        # Every step of a part starts a window; segments never cross the boundary, so neither do windows.
        return split, (0, boundary), (boundary, index.num_steps - boundary)
    T, K = cfg.seq_len, cfg.chunk_size
    return split, ratio_window_range(index.num_steps, 0.0, cfg.train_ratio, T, K), \
        ratio_window_range(index.num_steps, cfg.train_ratio, 1.0, T, K)


def make_datasets(cfg: Config) -> tuple[LMDBDataset, LMDBDataset]:
    """(train, validation) datasets of cfg.LMDB_path split as cfg.split says; errors say what to fix."""
    index = read_index(cfg.LMDB_path)
    split, train_range, val_range = split_ranges(index, cfg)
    for name, (_, count) in (("training", train_range), ("validation", val_range)):
        if count <= 0:
            raise DatasetError(f"LMDB {index.path} ({index.num_steps} steps) gives no {name} windows with split="
                               f"{split!r}, seq_len={cfg.seq_len}, chunk_size={cfg.chunk_size}: convert both CALVIN "
                               "splits, or change split / train_ratio")
    return tuple(LMDBDataset(index, cfg.seq_len, cfg.chunk_size, cfg.action_mode, first, count)
                 for first, count in (train_range, val_range))

"""DataLoaders for multi-process training with exact resume, and a device prefetcher that works without CUDA.

Each process reads its own shard of a seeded per-epoch permutation (EpochSampler), so the order of every epoch is a
pure function of (seed, epoch, rank, world size) and a resumed run can start mid-epoch at the batch it stopped at.

With frame_sharing = g > 1 the training sampler permutes groups of g consecutive windows of one segment instead of
single windows (LMDBDataset.window_groups), and each batch says which of its windows continue the previous one's
group (SHARES_PREVIOUS), so that the training step encodes each distinct frame of a group once (training/step.py).

With workers, each worker writes its batches into the shared buffers of the loader's BatchRing (data/batch_ring.py),
and the loader hands them out under the ring's rule: its consumer holds at most 2 batches (DevicePrefetcher's
current and next), and a read of a batch whose buffer was given to another batch raises StaleBatchError.
"""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from config import Config
from data.batch_ring import BatchRing, collate_batch
from data.lmdb_dataset import SHARES_PREVIOUS
from processes import end_workers_at_exit, worker_init


class EpochSampler(Sampler[int]):
    """Indices of one process: permutation(seed, epoch)[rank::world], truncated so every process has the same count.

    With `groups` (a group id per index, each group a run of consecutive indices; see LMDBDataset.window_groups) the
    permutation is over groups, each laid out in index order, and process `rank` takes the rank-th of `world` equal
    contiguous blocks of that order (so that groups stay together; a group cut by a block or batch border is shared
    by fewer windows). Every index still appears at most once per epoch, in a uniformly random group position.

    set_epoch(epoch, start) selects the epoch and skips its first `start` indices (resume).
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True,
                 groups: np.ndarray | None = None):
        if n < world:
            raise ValueError(f"dataset of {n} samples is smaller than the number of processes ({world})")
        if groups is not None and len(groups) != n:
            raise ValueError(f"groups has {len(groups)} entries for {n} samples")
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.groups = groups
        self.per_rank = n // world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def epoch_indices(self, epoch: int) -> list[int]:
        """This process's indices of `epoch`, from its first batch (a pure function of seed, epoch, rank, world and
        the groups)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.groups is not None:
            order = torch.from_numpy(self._group_order(g))
            return order[self.rank * self.per_rank:(self.rank + 1) * self.per_rank].tolist()
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        return order[self.rank::self.world][:self.per_rank].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices(self.epoch)[self.start:])

    def _group_order(self, generator: torch.Generator) -> np.ndarray:
        """All indices, group by group in a random (or, without shuffle, the given) order of the groups."""
        starts = np.flatnonzero(np.r_[True, self.groups[1:] != self.groups[:-1]])  # first index of each group
        sizes = np.diff(np.r_[starts, self.n])
        perm = torch.randperm(len(starts), generator=generator).numpy() if self.shuffle else np.arange(len(starts))
        first, size = starts[perm], sizes[perm]
        # index = the group's first index + the position inside the group
        return np.repeat(first - np.r_[0, np.cumsum(size)[:-1]], size) + np.arange(self.n)

    def __len__(self) -> int:
        return self.per_rank - self.start


class BatchLoader:
    """What make_loader returns: a DataLoader (its sampler, batch_size and drop_last are this loader's) whose workers
    write batches into `ring`, iterated through the ring's rule (a consumer holds at most ring.held batches; see
    data/batch_ring.py). Without workers there is no ring and batches are the DataLoader's."""

    def __init__(self, loader: DataLoader, ring: BatchRing | None):
        self.loader, self.ring = loader, ring
        self.sampler, self.batch_size, self.drop_last = loader.sampler, loader.batch_size, loader.drop_last

    def __iter__(self) -> Iterator[dict]:
        return iter(self.loader) if self.ring is None else self.ring.hand_out(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def make_loader(dataset: Dataset, cfg: Config, rank: int, world: int, train: bool, pin_memory: bool,
                seed_offset: int = 0) -> BatchLoader:
    """A loader over this process's shard; training drops the last incomplete batch. Training batches come in
    groups of cfg.frame_sharing consecutive windows when it is above 1 (validation batches never do). With workers,
    a dataset that writes batches in place (LMDBDataset) gets a BatchRing of prefetch_factor + 2 buffers per worker."""
    groups = None
    if train and cfg.frame_sharing > 1:
        groups = dataset.window_groups(cfg.frame_sharing)
        dataset.frame_groups = groups  # batches then carry SHARES_PREVIOUS
    sampler = EpochSampler(len(dataset), cfg.seed + seed_offset, rank, world, shuffle=True, groups=groups)
    workers = cfg.workers_per_gpu
    ring = None
    if workers > 0:
        if hasattr(dataset, "batch_ring"):
            ring = dataset.batch_ring = BatchRing(cfg.prefetch_factor)
        end_workers_at_exit()  # the workers leave SIGINT / SIGTERM to this process (processes.worker_init)
    return BatchLoader(DataLoader(
        dataset, batch_size=cfg.bs_per_gpu, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
        drop_last=train, prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
        persistent_workers=workers > 0, collate_fn=collate_batch,  # batches written in place, not stacked
        worker_init_fn=functools.partial(worker_init, os.getpid()),  # workers die with this process
        # The loader's own generator seeds the workers, so iterating never consumes the global RNG (augmentation).
        generator=torch.Generator().manual_seed(cfg.seed + seed_offset)), ring)


def batches_per_epoch(loader: BatchLoader | DataLoader) -> int:
    sampler: EpochSampler = loader.sampler
    return sampler.per_rank // loader.batch_size if loader.drop_last else math.ceil(sampler.per_rank /
                                                                                   loader.batch_size)


# Batch entries the training step reads on the host (the frame-group layout, the text-embedding cache's keys): they
# stay there, since reading them back from a device would wait for all the device's queued work, every batch.
HOST_KEYS = (SHARES_PREVIOUS, "inst_token")
HOST_FRAME_MASK = "host_frame_mask"  # added to each batch: mask[..., 0] (valid frames) kept on the host, for the same
#                                      reason (which frames the MAE encodes)


class DevicePrefetcher:
    """Iterates a loader, moving each batch but HOST_KEYS to `device` and adding HOST_FRAME_MASK; on CUDA the next
    batch is copied on a side stream while the current one is used. On CPU it is a plain iterator."""

    def __init__(self, loader: BatchLoader | DataLoader, device: torch.device):
        self.loader, self.device = loader, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _to_device(self, batch: dict) -> dict:
        moved = {k: v if k in HOST_KEYS else v.to(self.device, non_blocking=True) for k, v in batch.items()}
        return {**moved, HOST_FRAME_MASK: batch["mask"][..., 0]}

    def __iter__(self) -> Iterator[dict]:
        if self.stream is None:
            for batch in self.loader:
                yield self._to_device(batch)
            return
        it = iter(self.loader)
        nxt = self._copy(next(it, None))
        while nxt is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            batch = nxt
            for v in batch.values():
                if v.is_cuda:
                    v.record_stream(torch.cuda.current_stream(self.device))
            nxt = self._copy(next(it, None))
            yield batch

    def _copy(self, batch: dict | None) -> dict | None:
        if batch is None:
            return None
        with torch.cuda.stream(self.stream):
            return self._to_device(batch)

"""DataLoaders for multi-process training with exact resume, and a device prefetcher that works without CUDA.

Each process reads its own shard of a seeded per-epoch permutation (EpochSampler), so the order of every epoch is a
pure function of (seed, epoch, rank, world size) and a resumed run can start mid-epoch at the batch it stopped at.
"""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from config import Config
from data.lmdb_dataset import collate_batch
from processes import end_workers_at_exit, worker_init


class EpochSampler(Sampler[int]):
    """Indices of one process: permutation(seed, epoch)[rank::world], truncated so every process has the same count.

    set_epoch(epoch, start) selects the epoch and skips its first `start` indices (resume).
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True):
        if n < world:
            raise ValueError(f"dataset of {n} samples is smaller than the number of processes ({world})")
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.per_rank = n // world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def epoch_indices(self, epoch: int) -> list[int]:
        """This process's indices of `epoch`, from its first batch (a pure function of seed, epoch, rank, world)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        return order[self.rank::self.world][:self.per_rank].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices(self.epoch)[self.start:])

    def __len__(self) -> int:
        return self.per_rank - self.start


def reuse_worker_buffers(dataset: Dataset, prefetch_factor: int) -> None:
    """Lets each DataLoader worker write its batches into a ring of shared buffers instead of new shared memory
    (which costs more than decoding); to be iterated with collate_batch. A worker has at most prefetch_factor batches
    in flight and the training loop holds at most 2 (DevicePrefetcher), so a buffer is rewritten only after its
    batch has been used. Datasets without batch buffers are left as they are."""
    if hasattr(dataset, "reuse_buffers"):
        dataset.reuse_buffers = prefetch_factor + 2


def make_loader(dataset: Dataset, cfg: Config, rank: int, world: int, train: bool, pin_memory: bool,
                seed_offset: int = 0) -> DataLoader:
    """A DataLoader over this process's shard; training drops the last incomplete batch."""
    sampler = EpochSampler(len(dataset), cfg.seed + seed_offset, rank, world, shuffle=True)
    workers = cfg.workers_per_gpu
    if workers > 0:
        reuse_worker_buffers(dataset, cfg.prefetch_factor)
        end_workers_at_exit()  # the workers leave SIGINT / SIGTERM to this process (processes.worker_init)
    return DataLoader(
        dataset, batch_size=cfg.bs_per_gpu, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
        drop_last=train, prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
        persistent_workers=workers > 0, collate_fn=collate_batch,  # batches written in place, not stacked
        worker_init_fn=functools.partial(worker_init, os.getpid()),  # workers die with this process
        # The loader's own generator seeds the workers, so iterating never consumes the global RNG (augmentation).
        generator=torch.Generator().manual_seed(cfg.seed + seed_offset))


def batches_per_epoch(loader: DataLoader) -> int:
    sampler: EpochSampler = loader.sampler
    return sampler.per_rank // loader.batch_size if loader.drop_last else math.ceil(sampler.per_rank /
                                                                                   loader.batch_size)


class DevicePrefetcher:
    """Iterates a loader, moving each batch to `device`; on CUDA the next batch is copied on a side stream while
    the current one is used. On CPU it is a plain iterator."""

    def __init__(self, loader: DataLoader, device: torch.device):
        self.loader, self.device = loader, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

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
                v.record_stream(torch.cuda.current_stream(self.device))
            nxt = self._copy(next(it, None))
            yield batch

    def _copy(self, batch: dict | None) -> dict | None:
        if batch is None:
            return None
        with torch.cuda.stream(self.stream):
            return self._to_device(batch)

"""Batches written in place, and the ring of shared-memory buffers that DataLoader workers write them into.

A dataset that writes a whole batch at once (LMDBDataset.__getitems__) returns a WrittenBatch: one (n, ...) tensor
per entry. DataLoader hands it to its collate_fn; collate_batch passes the tensors on as they are (no stacking), and
DataLoader's default collate still sees the sequence of items it expects.

In a DataLoader worker, fresh shared memory for every batch costs more than decoding the batch (its pages are
faulted in anew each time), so make_loader gives the dataset a BatchRing: each worker cycles through a few shared
buffers, allocated once, and the training process reads each batch by handle, without a copy. Reusing a buffer is
safe only while nobody reads the batch it held any more; BatchRing turns that into a checked rule:

- each buffer has a generation number in shared memory, raised by the worker before it writes the buffer again, and
  every batch records the generation it was written with;
- the consumer gets RingBatch objects (read-only mappings of the tensors) through BatchRing.hand_out, which lets it
  hold at most `held` batches of the loader: handing out a batch retires the one `held` batches older, and starting
  a new pass retires them all;
- reading a retired batch, or one whose buffer's generation moved on, raises StaleBatchError. Before each batch is
  handed out, the batches still held are checked too, so a loader with more batches in flight than the ring has
  room for stops with an error instead of training on overwritten data.

A worker has at most prefetch_factor batches in flight (written, not yet handed out) and a new one is requested only
when a batch is handed out, so a ring of prefetch_factor + held buffers is never rewritten under a held batch.
Tensors taken out of a RingBatch are views of the buffer: valid until the batch is retired (clone what must outlive
it; DevicePrefetcher's copies to a GPU and pinned copies are new memory).
"""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

HELD_BATCHES = 2  # batches of one loader its consumer may hold: the current one and the next (DevicePrefetcher)

Shapes = dict[str, tuple[tuple[int, ...], np.dtype]]  # entry -> (shape of one item, dtype)


class StaleBatchError(RuntimeError):
    """A batch was read after its ring buffer was (or may have been) given to another batch."""


def batch_buffers(n: int, shapes: Shapes, shared: bool) -> dict[str, torch.Tensor]:
    """Uninitialised (n, ...) tensors, one per entry; in shared memory if `shared` (as default_collate allocates in
    workers: a shared tensor is sent to another process by handle)."""
    out = {}
    for key, (shape, dtype) in shapes.items():
        tensor = torch.empty((n, *shape), dtype=torch.from_numpy(np.empty(0, dtype)).dtype)
        out[key] = tensor.share_memory_() if shared else tensor
    return out


@dataclass(frozen=True, eq=False)
class Ticket:
    """Which ring buffer a batch was written into, and the buffer's generation then."""

    generations: torch.Tensor  # (slots,) int64 in shared memory: the worker's count of writes per buffer
    slot: int
    generation: int
    worker: int

    def rewritten(self) -> bool:
        return int(self.generations[self.slot]) != self.generation


class WrittenBatch:
    """What a dataset's __getitems__ returns: the batch as written (`batch`, (n, ...) per entry) and, if it was
    written into a BatchRing buffer, its ticket. Reads as the sequence of its n items (views) for other collate
    functions."""

    def __init__(self, batch: dict[str, torch.Tensor], ticket: Ticket | None = None):
        self.batch, self.ticket = batch, ticket

    def __len__(self) -> int:
        return len(next(iter(self.batch.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return {k: v[i] for k, v in self.batch.items()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return (self[i] for i in range(len(self)))


class RingBatch(Mapping):
    """A batch in a BatchRing buffer as the consumer reads it: a read-only mapping of its tensors whose every read
    checks that the buffer still holds this batch (StaleBatchError otherwise)."""

    def __init__(self, batch: dict[str, torch.Tensor], ticket: Ticket):
        self._batch, self.ticket = batch, ticket
        self._retired = ""  # why the batch may no longer be read

    def check(self) -> None:
        if self._retired:
            raise StaleBatchError(self._retired)
        if self.ticket.rewritten():
            raise StaleBatchError(f"buffer {self.ticket.slot} of DataLoader worker {self.ticket.worker} was "
                                  "rewritten while its batch was still held: the loader had more batches in flight "
                                  "than its BatchRing has buffers (prefetch_factor + held)")

    def retire(self, reason: str) -> None:
        self._retired = reason

    def __getitem__(self, key: str) -> torch.Tensor:
        self.check()
        return self._batch[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._batch)

    def __len__(self) -> int:
        return len(self._batch)

    def pin_memory(self) -> dict[str, torch.Tensor]:
        """Pinned copies (DataLoader's pin_memory thread): new memory, free of the ring."""
        self.check()
        return {k: v.pin_memory() for k, v in self._batch.items()}


def collate_batch(data: WrittenBatch | list) -> dict[str, torch.Tensor] | RingBatch:
    """DataLoader collate_fn: a WrittenBatch as it is (a RingBatch if it is in a ring buffer), anything else by
    default_collate."""
    if isinstance(data, WrittenBatch):
        return data.batch if data.ticket is None else RingBatch(data.batch, data.ticket)
    return torch.utils.data.default_collate(data)


class BatchRing:
    """The shared batch buffers of one loader's workers and the rule that makes reusing them safe (module docstring).

    Worker side: take() gives the worker's next buffer. Each worker process allocates its own `slots` buffers on
    first use (the ring reaches the workers inside the dataset). Consumer side: hand_out() over the DataLoader.
    """

    def __init__(self, prefetch_factor: int, held: int = HELD_BATCHES):
        self.held = held
        self.slots = prefetch_factor + held
        self._buffers: list[dict[str, torch.Tensor]] = []  # this worker's
        self._generations = torch.zeros(0, dtype=torch.int64)
        self._taken, self._pid = 0, -1
        self._out: deque[RingBatch] = deque()  # the consumer's held batches, oldest first

    def __getstate__(self) -> dict:  # a worker started by pickling makes its own buffers
        return {**self.__dict__, "_buffers": [], "_pid": -1, "_out": deque()}

    def take(self, n: int, shapes: Shapes) -> tuple[dict[str, torch.Tensor], Ticket]:
        """Worker side: this worker's next buffer as (n, ...) views, and its ticket. The buffer's generation is raised
        before the caller writes it, so a batch still held from it reads as stale from then on."""
        if self._pid != os.getpid():  # first use in this process (a forked worker inherits the parent's object)
            self._buffers, self._taken, self._pid = [{} for _ in range(self.slots)], 0, os.getpid()
            self._generations = torch.zeros(self.slots, dtype=torch.int64).share_memory_()
        slot = self._taken % self.slots
        self._taken += 1
        buffers = self._buffers[slot]
        if not buffers or len(next(iter(buffers.values()))) < n:
            buffers = self._buffers[slot] = batch_buffers(n, shapes, shared=True)
        self._generations[slot] += 1
        info = torch.utils.data.get_worker_info()
        ticket = Ticket(self._generations, slot, int(self._generations[slot]), info.id if info else -1)
        return {k: v[:n] for k, v in buffers.items()}, ticket

    def hand_out(self, batches: Iterable) -> Iterator:
        """Consumer side: one pass over `batches` (a DataLoader with collate_batch). Each RingBatch stays readable
        until `held` newer batches have been handed out or another pass starts; the batches still held are checked
        intact before each hand-out."""
        self._retire(len(self._out), "a new pass over its loader started")
        for batch in batches:
            if isinstance(batch, RingBatch):
                self._out.append(batch)
                self._retire(len(self._out) - self.held, f"the loader has handed out {self.held} newer batches "
                             f"since (a consumer holds at most {self.held} batches of a loader; clone what must "
                             "outlive that)")
                for held in self._out:
                    held.check()
            yield batch

    def _retire(self, count: int, why: str) -> None:
        for _ in range(max(0, count)):
            self._out.popleft().retire(f"this batch was retired from its BatchRing buffer: {why}")

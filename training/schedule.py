"""When things happen in the training loop, as pure functions of the loop's counters: the learning rate of an
optimiser step, which batches form an accumulation group, when a validation batch is due, when the run is complete.
training/trainer.py asks these; nothing here holds state or touches a device.
"""
from __future__ import annotations

import math

from config import Config


def cosine_with_warmup(step: float, warmup: float, total: float) -> float:
    """LR factor: linear warm-up over `warmup` steps, then half a cosine to 0 at `total` (transformers' formula)."""
    if step < warmup:
        return step / max(1.0, warmup)
    progress = (step - warmup) / max(1.0, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def lr_factor(update: int, cfg: Config, updates_per_epoch: int, world: int, dataset_len: int) -> float:
    """LR factor (of lr_max) for the `update`-th optimiser step (0-based).

    'per_step': warm-up and cosine over optimiser steps; the first update already has a non-zero LR.
    'reference': GR1-Training's staircase: the schedule advances once every print_steps batches, its length counted
    in print intervals of len(dataset) // (print_steps * bs_per_gpu * processes), so the first print_steps batches
    train with LR 0.
    """
    if cfg.lr_schedule == "per_step":
        return cosine_with_warmup(update + 1, cfg.num_warmup_epochs * updates_per_epoch,
                                  cfg.num_epochs * updates_per_epoch)
    prints_per_epoch = dataset_len // (cfg.print_steps * cfg.bs_per_gpu * world)
    batches_before = update * cfg.gradient_accumulation_steps
    return cosine_with_warmup(batches_before // cfg.print_steps, cfg.num_warmup_epochs * prints_per_epoch,
                              cfg.num_epochs * prints_per_epoch)


def accumulation_group(batch_in_epoch: int, accumulation: int, batches_per_epoch: int) -> tuple[int, bool]:
    """(size of the accumulation group that batch `batch_in_epoch` (0-based) belongs to, whether the optimiser steps
    after it). Groups of `accumulation` batches are counted from the epoch's first batch, so a resumed run cuts the
    same groups; the epoch's last group holds the batches left (fewer when `accumulation` does not divide the epoch),
    and its gradients are averaged over that many batches."""
    first = batch_in_epoch - batch_in_epoch % accumulation
    size = min(accumulation, batches_per_epoch - first)
    return size, batch_in_epoch + 1 == first + size


def validation_due(batches: int, train_windows: int, val_windows: int) -> bool:
    """Whether a validation batch follows training batch number `batches` (1-based, counted over the whole run):
    one every len(train) // len(val) batches, GR1-Training's cadence."""
    return batches % max(1, train_windows // max(1, val_windows)) == 0


def state_save_due(update: int, save_steps: int) -> bool:
    """Whether the training state is saved after optimiser step `update` (1-based) besides the epoch ends."""
    return save_steps > 0 and update % save_steps == 0


def should_stop(epoch: int, update: int, num_epochs: int, max_train_steps: int) -> bool:
    """Whether the run is complete: `num_epochs` epochs done, or `max_train_steps` optimiser steps taken (0: no
    limit)."""
    return epoch >= num_epochs or (max_train_steps > 0 and update >= max_train_steps)

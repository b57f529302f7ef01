"""Training pieces used by Main.py: optimiser, learning-rate schedule, one training / validation step, and the
loop's checks (non-finite losses, agreement between processes on stopping, save_path). Main.py wires them together;
nothing here parses arguments. The resumable training state is in training_state.py.

Shape key: B batch, T window, K action chunk.
"""
from __future__ import annotations

import math
import os
import tempfile

import torch
from torch import nn

from config import Config, ConfigError
from data.loader import EpochSampler
from models.encoders import FrozenEncoders
from models.gr1 import Keep
from models.losses import LOSS_NAMES, gr1_losses

# ---------------------------------------------------------------- optimiser and schedule

def make_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (fused on CUDA). Weight decay applies to every trainable tensor, as in
    GR1-Training."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr_max, weight_decay=cfg.weight_decay, fused=device.type == "cuda")


def cosine_with_warmup(step: float, warmup: float, total: float) -> float:
    """LR factor: linear warm-up over `warmup` steps, then half a cosine to 0 at `total` (transformers' formula)."""
    if step < warmup:
        return step / max(1.0, warmup)
    progress = (step - warmup) / max(1.0, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def lr_factor(update: int, cfg: Config, updates_per_epoch: int, batches_per_epoch: int, world: int,
              dataset_len: int) -> float:
    """LR factor for the `update`-th optimiser step (0-based).

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


# ---------------------------------------------------------------- steps

def batch_images(preprocessor, batch: dict, train: bool) -> dict[str, torch.Tensor]:
    static, gripper = preprocessor.process(batch["rgb_static"], batch["rgb_gripper"], train=train)
    return {"static": static, "gripper": gripper}


def compute_losses(model: nn.Module, encoders: FrozenEncoders, preprocessor, batch: dict, cfg: Config,
                   train: bool) -> dict[str, torch.Tensor]:
    """Preprocess, encode (frozen, no grad), predict and score one batch. Work whose result no loss uses is left
    out: padded frames are not encoded and the last skip_frame steps are not decoded into frames."""
    images = batch_images(preprocessor, batch, train)
    frame_mask = batch["mask"][..., 0]  # (B, T) valid frames
    features = encoders.encode_frames(images, frame_mask)
    lang = encoders.encode_text(batch["inst_token"])
    keep = Keep(frame_steps=list(range(cfg.seq_len - cfg.skip_frame)))
    out = model(lang, batch["arm_state"], batch["gripper_state"], features, frame_mask, keep)
    return gr1_losses(out, images, batch["actions"], batch["mask"], cfg.skip_frame, cfg.patch_size,
                      not cfg.without_norm_pixel_loss, cfg.arm_loss_ratio)


def mean_losses(totals: dict[str, float], count: int) -> dict[str, float]:
    return {k: totals[k] / max(1, count) for k in totals}


def empty_totals() -> dict[str, float]:
    return {k: 0.0 for k in LOSS_NAMES + ("total",)}


# ---------------------------------------------------------------- the loop's checks

class NonFiniteLossError(RuntimeError):
    """A training loss was NaN or inf; raised before the optimiser step, so no weights were updated with it."""


class TrainingStopped(Exception):  # noqa: N818 (not an error: a requested stop)
    """SIGINT / SIGTERM stopped the run after a save of the full training state."""


def check_save_path(path: str) -> None:
    """save_path must be a writable directory (created if absent): fail in one line before anything is built."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test"):
            pass
    except OSError as e:
        raise ConfigError(f"save_path {path!r} is not a writable directory ({e.strerror or e})") from None


def nonfinite(losses: dict[str, float]) -> list[str]:
    """Names of the losses that are NaN or inf."""
    return [k for k, v in losses.items() if not math.isfinite(v)]


def agree(accelerator, stop: bool, bad_batch: int | None) -> tuple[bool, dict[int, int]]:
    """What every process learns at a synchronisation point: whether any asked to stop, and which processes saw a
    non-finite loss at which batch of the epoch ({rank: batch}). One all-reduce of world + 1 numbers."""
    world, rank = accelerator.num_processes, accelerator.process_index
    flags = torch.zeros(world + 1, dtype=torch.float64)
    flags[0] = float(stop)
    if bad_batch is not None:
        flags[1 + rank] = bad_batch + 1
    if world > 1:
        flags = accelerator.reduce(flags.to(accelerator.device), reduction="sum").cpu()
    return bool(flags[0] > 0), {r: int(v) - 1 for r, v in enumerate(flags[1:].tolist()) if v > 0}


def window_starts(epoch_indices: list[int], first_step: int, batch: int, batch_size: int) -> list[int]:
    """LMDB steps at which the windows of batch `batch` of an epoch start (the sampler's order is a pure function of
    seed, epoch, rank and world, so any process can name any process's batch)."""
    return [first_step + i for i in epoch_indices[batch * batch_size:(batch + 1) * batch_size]]


def nonfinite_report(bad: dict[int, int], dataset, cfg: Config, epoch: int, update: int, world: int) -> str:
    """nonfinite_message for {rank: batch} of the training `dataset` (an LMDBDataset): every process's batch is named
    from the sampler's order."""
    windows = {}
    for rank, batch in bad.items():
        order = EpochSampler(len(dataset), cfg.seed, rank, world).epoch_indices(epoch)
        windows[rank] = (batch, window_starts(order, dataset.first_step, batch, cfg.bs_per_gpu))
    return nonfinite_message(windows, epoch, update, dataset.index.path, cfg.seq_len + cfg.chunk_size - 1)


def nonfinite_message(bad: dict[int, tuple[int, list[int]]], epoch: int, update: int, lmdb_path: str,
                      span: int) -> str:
    """One line naming where a non-finite loss appeared: per process (rank: (batch, window starts)), its batch of
    the epoch and the LMDB steps at which the batch's windows start."""
    where = "; ".join(f"{f'process {r}: ' if len(bad) > 1 or r else ''}batch {b} of epoch {epoch}, windows "
                      f"starting at LMDB steps {', '.join(map(str, steps))}" for r, (b, steps) in sorted(bad.items()))
    return (f"non-finite training loss after {update} optimiser steps ({where}) in {lmdb_path}: each window reads "
            f"the keys <name>_<s> for s = start .. start + {span - 1}; the weights were not updated with it and "
            "nothing was saved after the last good state")


def error_line(e: BaseException) -> str:
    """An exception as one line; an error re-raised from a DataLoader worker is reduced to its original message."""
    text = str(e).strip() or type(e).__name__
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):  # torch's ExceptionWrapper: the worker's traceback
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith(type(e).__name__) else last
    return " ".join(ln.strip() for ln in lines)

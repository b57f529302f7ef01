"""Training pieces used by Main.py: optimiser, learning-rate schedule, one training / validation step, and the
loop's checks (non-finite losses, agreement between processes on stopping, save_path). Main.py wires them together;
nothing here parses arguments. The resumable training state is in training_state.py.

Shape key: B batch, T window, K action chunk, G frame groups, U frames per group (T + largest group - 1).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from config import Config, ConfigError, ModelConfig
from data.lmdb_dataset import SHARES_PREVIOUS
from data.loader import HOST_FRAME_MASK, EpochSampler
from models.encoders import FrozenEncoders
from models.gr1 import Keep
from models.losses import LOSS_NAMES, gr1_losses

# ---------------------------------------------------------------- optimiser and schedule

FUSED_ADAMW_DEVICES = ("cuda", "cpu")  # devices with a fused AdamW kernel in every torch this project supports


def make_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, fused (one kernel pass over all tensors) where the device has it, as
    GR1-Training's fused=True. Weight decay applies to every trainable tensor, as in GR1-Training."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr_max, weight_decay=cfg.weight_decay,
                             fused=torch.device(device).type in FUSED_ADAMW_DEVICES)


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


@dataclass(frozen=True)
class FrameGroups:
    """Where the frames of a frame-sharing batch come from and go to. A group of n windows (consecutive windows of
    one segment, SHARES_PREVIOUS) holds T + n - 1 distinct frames; groups are padded to U frames."""

    source: torch.Tensor  # (G, U) long: flat (B T) index of a window frame equal to frame u of group g
    in_group: torch.Tensor  # (G, U) bool: frame u is one of group g's frames (not padding)
    window_frames: torch.Tensor  # (B, T) long: flat (G U) index of window b's frame t

    def to(self, device: torch.device) -> FrameGroups:
        """Copies on `device` (from pinned memory on CUDA: the copies do not wait for the device)."""
        pinned = torch.device(device).type == "cuda"
        return FrameGroups(*((t.pin_memory() if pinned else t).to(device, non_blocking=True)
                             for t in (self.source, self.in_group, self.window_frames)))


def frame_groups(shares_previous: torch.Tensor, T: int) -> FrameGroups:
    """The layout of a batch (on the host) from SHARES_PREVIOUS (bool (B,), kept on the host by DevicePrefetcher)."""
    shares = shares_previous.cpu().numpy().astype(bool)
    shares[0] = False  # a batch starts a group (a group cut by the batch border is shared by fewer windows)
    starts = np.flatnonzero(~shares)  # (G,) first window of each group
    sizes = np.diff(np.r_[starts, len(shares)])  # (G,) windows per group
    G, U = len(starts), T + int(sizes.max()) - 1
    group = np.repeat(np.arange(G), sizes)  # (B,)
    offset = np.arange(len(shares)) - starts[group]  # (B,) position of the window in its group
    u = np.arange(U)[None]  # (1, U)
    window = np.clip(u - T + 1, 0, sizes[:, None] - 1)  # (G, U) a window of the group that holds frame u
    source = (starts[:, None] + window) * T + np.minimum(u - window, T - 1)
    window_frames = (group * U + offset)[:, None] + np.arange(T)[None]  # (B, T)
    return FrameGroups(*(torch.from_numpy(a) for a in (source, u < T + sizes[:, None] - 1, window_frames)))


def predict_batch(model: nn.Module, encoders: FrozenEncoders, preprocessor, batch: dict, cfg: Config, train: bool
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Preprocess, encode (frozen, no grad) and predict one batch -> (GR1 outputs, the preprocessed images of every
    window (B, T, 3, S, S), the pixel targets). Work whose result no loss uses is left out: padded frames are not
    encoded and the last skip_frame steps are not decoded into frames.

    With SHARES_PREVIOUS in the batch (frame_sharing > 1), each group's distinct frames are preprocessed with one
    random shift per group, encoded by the MAE and the resampler once, and every window takes its frames' tokens
    and images from them: each window gets what it would get alone with the group's shift.
    """
    frame_mask = batch["mask"][..., 0]  # (B, T) valid frames
    host_mask = batch.get(HOST_FRAME_MASK, frame_mask)  # the same, on the host where DevicePrefetcher kept it
    keep = Keep(frame_steps=list(range(cfg.seq_len - cfg.skip_frame)))
    if SHARES_PREVIOUS not in batch:
        images = batch_images(preprocessor, batch, train)
        features = encoders.encode_frames(images, host_mask)
        lang = encoders.encode_text(batch["inst_token"])
        return model(lang, batch["arm_state"], batch["gripper_state"], features, frame_mask, keep), images
    groups = frame_groups(batch[SHARES_PREVIOUS], cfg.seq_len)
    on_device = groups.to(frame_mask.device)
    raw = {k: batch[k].flatten(0, 1)[on_device.source] for k in ("rgb_static", "rgb_gripper")}  # (G, U, 3, H, W)
    group_images = batch_images(preprocessor, raw, train)  # (G, U, 3, S, S); one random shift per group
    layout = groups if host_mask.device.type == "cpu" else on_device
    group_mask = host_mask.flatten()[layout.source] * layout.in_group  # (G, U)
    features = {cam: (cls.flatten(0, 1), patches.flatten(0, 1))  # (G U, F), (G U, P, F)
                for cam, (cls, patches) in encoders.encode_frames(group_images, group_mask).items()}
    lang = encoders.encode_text(batch["inst_token"])
    out = model(lang, batch["arm_state"], batch["gripper_state"], features, frame_mask, keep,
                frame_index=on_device.window_frames)
    images = {cam: x.flatten(0, 1)[on_device.window_frames] for cam, x in group_images.items()}  # (B, T, 3, S, S)
    return out, images


def compute_losses(model: nn.Module, encoders: FrozenEncoders, preprocessor, batch: dict, cfg: Config,
                   train: bool) -> dict[str, torch.Tensor]:
    """The four losses and their total for one batch (predict_batch, then models/losses.py)."""
    out, images = predict_batch(model, encoders, preprocessor, batch, cfg, train)
    return gr1_losses(out, images, batch["actions"], batch["mask"], ModelConfig.from_config(cfg))


def detached(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A step's losses for logging, left on the device: Main.py sums them there and mean_losses reads them back once
    per log line, so that the loop never waits for the device (an .item() per batch would, every batch)."""
    return {k: v.detach() for k, v in losses.items()}


def mean_losses(totals: dict[str, float | torch.Tensor], count: int) -> dict[str, float]:
    """Means of summed losses as floats; sums held on a device are read back in one transfer."""
    on_device = [v for v in totals.values() if isinstance(v, torch.Tensor)]
    if on_device:
        sums = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=on_device[0].device)
                            for v in totals.values()]).tolist()
        totals = dict(zip(totals, sums))
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


def first_nonfinite(flags: list[tuple[int, torch.Tensor]]) -> int | None:
    """The first batch (in the epoch) of an accumulation group whose loss was not finite, from (batch, finite?) pairs
    held on the device: one read back for the whole group."""
    finite = torch.stack([flag for _, flag in flags]).tolist()
    return next((batch for (batch, _), ok in zip(flags, finite) if not ok), None)


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
    groups = dataset.frame_groups  # the training sampler's window groups (None without frame sharing)
    for rank, batch in bad.items():
        order = EpochSampler(len(dataset), cfg.seed, rank, world, groups=groups).epoch_indices(epoch)
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


# ---------------------------------------------------------------- logging

TRACKER_PROJECT = "gr1"  # the run name accelerate's trackers get (TensorBoard: save_path/logs/gr1)
CURVES_FILE = "training_curves.png"
METRICS_FILE = "metrics.jsonl"


def tracker_names(cfg: Config) -> list[str]:
    """cfg.log_with as accelerate tracker names; an unknown one, or one whose package is missing, is a one-line
    error (accelerate itself would drop a missing one silently)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
    names = [n.strip() for n in cfg.log_with.split(",") if n.strip() and n.strip() != "none"]
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"log_with: unknown tracker {name!r}; accelerate has {sorted(LOGGER_TYPE_TO_CLASS)} "
                              "(comma-separated), or 'none'")
        if name not in available:
            raise ConfigError(f"log_with: the {name} tracker is not installed here (pip install {name}), or leave it "
                              "out of log_with")
    return names


def tracker_config(cfg: Config) -> dict:
    """The run's config for the trackers' hyper-parameter views (lists as text: TensorBoard takes scalars only)."""
    return {k: str(v) if isinstance(v, list) else v for k, v in cfg.to_dict().items()}


def read_metrics(path: str) -> list[dict]:
    """The records of metrics.jsonl (a line cut by a crash is skipped)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


_LOSS_PANELS = (("total", "total loss"), ("action_arm", "arm action (smooth L1)"),
                ("action_gripper", "gripper action (BCE)"), ("rgb_static", "static camera frame (MSE)"),
                ("rgb_gripper", "gripper camera frame (MSE)"))
_RUN_PANELS = (("lr", "learning rate"), ("samples_per_s", "samples / s (all processes)"),
               ("data_loading_share", "share of the time waiting for data"))


def draw_training_curves(records: list[dict], path: str) -> None:
    """training_curves.png: each loss (training and validation), the learning rate, samples/s and the data-loading
    share, against the optimiser step (matplotlib, Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    steps = [r["update"] for r in records]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5), constrained_layout=True)
    for ax, (name, title) in zip(axes.flat, _LOSS_PANELS):
        for split, label, style in (("train", "training", "-"), ("val", "validation", "o-")):
            points = [(u, r[f"{split}/{name}"]) for u, r in zip(steps, records) if f"{split}/{name}" in r]
            if points:
                ax.plot(*zip(*points), style, markersize=3, label=label)
        values = [r[f"{s}/{name}"] for r in records for s in ("train", "val") if f"{s}/{name}" in r]
        if values and min(values) > 0:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))  # 1-2-5 labels, never crowded
            ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(title)
        if ax.get_lines():
            ax.legend(loc="upper right")
    for ax, (key, title) in zip(axes.flat[len(_LOSS_PANELS):], _RUN_PANELS):
        ax.plot(steps, [r.get(key, float("nan")) for r in records], "-")
        ax.set_title(title)
    for ax in axes.flat:
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"GR-1 training: {len(records)} log points, last at optimiser step {steps[-1] if steps else 0}")
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)

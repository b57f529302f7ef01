"""One optimiser step's work: the optimiser, preprocessing + frozen encoders + GR1 + losses for a batch (training and
validation alike), and the step's checks (non-finite losses, which processes asked to stop). The loop that calls them
is training/trainer.py.

Shape key: B batch, T window, K action chunk, G frame groups, U frames per group (T + largest group - 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from config import Config, ModelConfig
from data.lmdb_dataset import SHARES_PREVIOUS
from data.loader import HOST_FRAME_MASK, EpochSampler
from models.encoders import FrozenEncoders
from models.gr1 import Keep
from models.losses import gr1_losses

# ---------------------------------------------------------------- optimiser

FUSED_ADAMW_DEVICES = ("cuda", "cpu")  # devices with a fused AdamW kernel in every torch this project supports


def make_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, fused (one kernel pass over all tensors) where the device has it, as
    GR1-Training's fused=True. Weight decay applies to every trainable tensor, as in GR1-Training."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr_max, weight_decay=cfg.weight_decay,
                             fused=torch.device(device).type in FUSED_ADAMW_DEVICES)


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


# ---------------------------------------------------------------- the step's checks

class NonFiniteLossError(RuntimeError):
    """A training loss was NaN or inf; raised before the optimiser step, so no weights were updated with it."""


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

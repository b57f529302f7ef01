"""Training pieces used by Main.py: optimiser, learning-rate schedule, one training / validation step, the resumable
training state and checkpoint files. Main.py wires them together; nothing here parses arguments.

Shape key: B batch, T window, K action chunk, G frame groups, U frames per group (T + largest group - 1).
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from config import Config
from data.lmdb_dataset import SHARES_PREVIOUS
from data.loader import HOST_FRAME_MASK
from models.encoders import FrozenEncoders
from models.gr1 import Keep
from models.losses import LOSS_NAMES, gr1_losses

STATE_DIR = "state"  # save_path/state: the full training state of the last save (accelerate.save_state)


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
    return gr1_losses(out, images, batch["actions"], batch["mask"], cfg.skip_frame, cfg.patch_size,
                      not cfg.without_norm_pixel_loss, cfg.arm_loss_ratio)


@dataclass
class TrainState:
    """Where the run is; saved with the optimiser state so that a resumed run continues exactly."""

    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # batches of this epoch already trained
    update: int = 0  # optimiser steps taken in total
    batches: int = 0  # batches trained in total
    best_val: float = float("inf")

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


# ---------------------------------------------------------------- saving

def state_dirs(save_path: str) -> tuple[str, str, str]:
    base = os.path.join(save_path, STATE_DIR)
    return base, base + ".tmp", base + ".old"


def save_training_state(accelerator, save_path: str) -> None:
    """accelerate.save_state into a temporary folder, then swapped in, so a crash mid-save keeps the last state."""
    final, tmp, old = state_dirs(save_path)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, "COMPLETE"), "w") as f:
            f.write("ok\n")
        if os.path.isdir(final):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def find_training_state(save_path: str) -> str | None:
    """The last complete saved state (also after a crash between the folder swaps), or None."""
    for path in state_dirs(save_path)[::2]:  # final, then .old
        if os.path.isfile(os.path.join(path, "COMPLETE")):
            return path
    return None


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

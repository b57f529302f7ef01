"""The only place a loss or a training target exists: pixel targets, masked losses, the weighted total.

Used identically for training and validation (Main.py) and by the parity tests.

Shape key: B batch, T window, Tf decoded frames, K action chunk, P patches, C p*p*3 pixels per patch, S image size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_NAMES = ("rgb_static", "rgb_gripper", "action_arm", "action_gripper")


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, T, 3, S, S) -> (B, T, P, C): patches in row-major order, pixels (y, x, channel) with channel fastest."""
    B, T, Ch, H, W = images.shape
    p = patch_size
    x = images.reshape(B, T, Ch, H // p, p, W // p, p)
    return x.permute(0, 1, 3, 5, 4, 6, 2).reshape(B, T, (H // p) * (W // p), p * p * Ch)


def pixel_targets(images: torch.Tensor, patch_size: int, normalize: bool) -> torch.Tensor:
    """Patchified images, optionally standardised per patch.

    Faithful to GR1-Training: unbiased variance and the epsilon on the std, (v - mean) / (std + 1e-6)
    (MAE itself uses (var + 1e-6) ** 0.5).
    """
    x = patchify(images, patch_size)
    if normalize:
        x = (x - x.mean(dim=-1, keepdim=True)) / (x.var(dim=-1, unbiased=True, keepdim=True).sqrt() + 1e-6)
    return x


def masked_mean(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of an elementwise loss over the entries where mask is 1; mask's dims are the loss's leading dims.

    Equal to GR1-Training's masked_loss when the mask has a valid entry; 0 (not NaN) when it has none.
    """
    per_entry = loss[0].numel() // mask[0].numel()  # elements per mask entry
    mask = mask.reshape(mask.shape + (1,) * (loss.dim() - mask.dim()))
    return (loss * mask).sum() / mask.sum().clamp_min(1) / per_entry


def frame_losses(preds: torch.Tensor, images: torch.Tensor, frame_mask: torch.Tensor, skip_frame: int,
                 patch_size: int, normalize: bool) -> torch.Tensor:
    """MSE between the frames predicted at step t and the frames at step t + skip_frame.

    preds (B, T - skip_frame, P, C) (only the steps whose target exists) or (B, T, P, C) (the last skip_frame steps
    are then ignored), images (B, T, 3, S, S) normalised network inputs, frame_mask (B, T) valid frames.
    """
    T = images.shape[1]
    preds = preds[:, :T - skip_frame]
    targets = pixel_targets(images[:, skip_frame:], patch_size, normalize)  # (B, T - skip, P, C)
    return masked_mean(F.mse_loss(preds, targets, reduction="none"), frame_mask[:, skip_frame:])


def gr1_losses(out: dict[str, torch.Tensor], images: dict[str, torch.Tensor], actions: torch.Tensor,
               mask: torch.Tensor, skip_frame: int, patch_size: int, normalize_pixels: bool,
               arm_loss_ratio: float) -> dict[str, torch.Tensor]:
    """The four GR-1 losses and their weighted total.

    out: GR1.forward output (arm_action (B, T, K, 6), gripper_action (B, T, K, 1) logits, rgb_<cam>_pred);
    images['static'|'gripper'] (B, T, 3, S, S) the normalised inputs; actions (B, T, K, 7) with the gripper in
    {0, 1}; mask (B, T, K) valid actions (mask[..., 0] marks valid frames).
    """
    frame_mask = mask[..., 0]
    losses = {
        f"rgb_{cam}": frame_losses(out[f"rgb_{cam}_pred"], images[cam], frame_mask, skip_frame, patch_size,
                                   normalize_pixels)
        for cam in ("static", "gripper")}
    losses["action_arm"] = masked_mean(F.smooth_l1_loss(out["arm_action"], actions[..., :6], reduction="none"),
                                       mask)
    losses["action_gripper"] = masked_mean(
        F.binary_cross_entropy_with_logits(out["gripper_action"], actions[..., 6:], reduction="none"), mask)
    losses["total"] = (losses["rgb_static"] + losses["rgb_gripper"] + arm_loss_ratio * losses["action_arm"]
                       + losses["action_gripper"])
    return losses

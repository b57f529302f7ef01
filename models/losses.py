"""The only place a loss or a training target exists: pixel targets, masked losses, the weighted total.

Used identically for training and validation (Main.py) and by the parity tests. The settings come from the model's
ModelConfig (patch_size, skip_frame, without_norm_pixel_loss, arm_loss_ratio).

Shape letters (README "Architecture"): B batch, T window, Tf decoded frames, K action chunk, N images, P patches,
C p*p*3 pixels per patch, S image side.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from config import ModelConfig
from facts import ARM_DIM, CAMERA_KEYS, CAMERAS, PREDICTION_KEYS

LOSS_NAMES = (*(CAMERA_KEYS[cam] for cam in CAMERAS), "action_arm", "action_gripper")  # a frame loss per camera


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, T, 3, S, S) -> (B, T, P, C): patches in row-major order, pixels (y, x, channel) with channel fastest."""
    B, T, channels, height, width = images.shape
    p = patch_size
    x = images.reshape(B, T, channels, height // p, p, width // p, p)
    return x.permute(0, 1, 3, 5, 4, 6, 2).reshape(B, T, (height // p) * (width // p), p * p * channels)


def unpatchify(patches: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, P, C) -> (N, 3, S, S): the inverse of patchify for square images (N stands for any leading dims of one)."""
    N, P, _ = patches.shape
    g, p = int(round(P ** 0.5)), patch_size
    x = patches.reshape(N, g, g, p, p, 3)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(N, 3, g * p, g * p)


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
               mask: torch.Tensor, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The four GR-1 losses and their weighted total.

    out: GR1.forward output (arm_action (B, T, K, 6), gripper_action (B, T, K, 1) logits, rgb_<cam>_pred);
    images[cam] (B, T, 3, S, S) the normalised inputs (cam in facts.CAMERAS); actions (B, T, K, 7) with the gripper
    in {0, 1}; mask (B, T, K) valid actions (mask[..., 0] marks valid frames).
    """
    frame_mask = mask[..., 0]
    losses = {
        CAMERA_KEYS[cam]: frame_losses(out[PREDICTION_KEYS[cam]], images[cam], frame_mask, cfg.skip_frame,
                                       cfg.patch_size, not cfg.without_norm_pixel_loss)
        for cam in CAMERAS}
    losses["action_arm"] = masked_mean(
        F.smooth_l1_loss(out["arm_action"], actions[..., :ARM_DIM], reduction="none"), mask)
    losses["action_gripper"] = masked_mean(
        F.binary_cross_entropy_with_logits(out["gripper_action"], actions[..., ARM_DIM:], reduction="none"), mask)
    frames = sum(losses[CAMERA_KEYS[cam]] for cam in CAMERAS)  # static + gripper, in that order
    losses["total"] = frames + cfg.arm_loss_ratio * losses["action_arm"] + losses["action_gripper"]
    return losses

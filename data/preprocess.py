"""Image preprocessing on the training / evaluation device, and its inverse for videos.

uint8 camera frames -> float in [0, 1] -> (training only) random-shift augmentation -> bicubic antialiased resize to
rgb_shape -> ImageNet normalisation: the same numbers as GR1-Training's PreProcess.rgb_process (fixture
../shared/fixtures/preprocess_rgb.pt), with no torchvision: torchvision's v2 Resize(BICUBIC, antialias=True) on a
float tensor is F.interpolate(mode='bicubic', antialias=True, align_corners=False) (GR1_REFERENCE.md §6).

Shape letters (README "Architecture"): B batch, T window, N images, R camera image side (200 static, 84 gripper),
S network image side (rgb_shape).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from config import Config
from facts import CAMERA_KEYS, CAMERAS

NORM_EPS = 1e-6  # Faithful to GR1-Training: (x - mean) / (std + 1e-6)


def random_shift(images: torch.Tensor, pad: int) -> torch.Tensor:
    """DrQ-style random shift of (B, T, 3, R, R) float images by up to `pad` pixels, replicate-padded.

    Faithful to GR1-Training's RandomShiftsAug: one integer shift (x, y) per sample, the same for all T frames, drawn
    from the global torch RNG of the images' device as torch.randint(0, 2 pad + 1, (B, 1, 1, 1, 2)), and applied with
    the same bilinear grid_sample on pixel-centre coordinates (not an integer crop: the grid's rounding error,
    up to 2.4e-5, is part of the reference numbers).
    """
    B, T, channels, R, width = images.shape
    if R != width:
        raise ValueError(f"random_shift needs square images, got {R}x{width}")
    x = F.pad(images.reshape(B * T, channels, R, R), (pad,) * 4, mode="replicate")  # (B T, 3, R + 2 pad, R + 2 pad)
    padded = R + 2 * pad
    eps = 1.0 / padded
    steps = torch.linspace(-1.0 + eps, 1.0 - eps, padded, device=x.device, dtype=x.dtype)[:R]  # pixel centres
    base = torch.stack((steps.unsqueeze(0).expand(R, R), steps.unsqueeze(1).expand(R, R)), dim=2)  # (R, R, 2) x, y
    shift = torch.randint(0, 2 * pad + 1, size=(B, 1, 1, 1, 2), device=x.device, dtype=x.dtype)
    shift = shift.expand(B, T, 1, 1, 2).reshape(B * T, 1, 1, 2) * (2.0 / padded)
    out = F.grid_sample(x, base.unsqueeze(0) + shift, padding_mode="zeros", align_corners=False)
    return out.reshape(B, T, channels, R, R)


class ImagePreprocessor:
    """GR1-Training's PreProcess on any device: process() for the network input, to_pixels() for videos."""

    def __init__(self, cfg: Config, device: torch.device | str = "cpu"):
        self.size = cfg.rgb_shape
        self.pads = dict(zip(CAMERAS, (cfg.rgb_static_pad, cfg.rgb_gripper_pad)))
        self.mean = torch.tensor(cfg.rgb_mean, dtype=torch.float32, device=device).view(3, 1, 1)
        self.std = torch.tensor(cfg.rgb_std, dtype=torch.float32, device=device).view(3, 1, 1)

    def _one_camera(self, images_u8: torch.Tensor, pad: int, train: bool) -> torch.Tensor:
        """(B, T, 3, R, R) uint8 -> (B, T, 3, S, S) normalised float32."""
        if images_u8.dim() != 5 or images_u8.shape[2] != 3:
            raise ValueError(f"expected uint8 images (batch, time, 3, height, width), got {tuple(images_u8.shape)}")
        x = images_u8.float() * (1 / 255.0)  # Faithful to GR1-Training: not bit-identical to / 255
        if train and pad > 0:
            x = random_shift(x, pad)
        B, T = x.shape[:2]
        x = F.interpolate(x.flatten(0, 1), size=(self.size, self.size), mode="bicubic", align_corners=False,
                          antialias=True).unflatten(0, (B, T))  # (B, T, 3, S, S); overshoot is not clamped
        return (x - self.mean) / (self.std + NORM_EPS)

    def process(self, rgb_static: torch.Tensor, rgb_gripper: torch.Tensor, train: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, T, 3, 200, 200) and (B, T, 3, 84, 84) -> two normalised float (B, T, 3, S, S).

        With train=True the static camera's shifts are drawn before the gripper camera's (as the reference)."""
        static = self._one_camera(rgb_static, self.pads["static"], train)
        gripper = self._one_camera(rgb_gripper, self.pads["gripper"], train)
        return static, gripper

    def cameras(self, images: Mapping[str, torch.Tensor], train: bool) -> dict[str, torch.Tensor]:
        """process() from and to dicts: images[CAMERA_KEYS[cam]] uint8 (B, T, 3, R, R) (a batch, or stacked
        observations) -> {cam: normalised (B, T, 3, S, S)} for cam in CAMERAS, the model's camera names."""
        return dict(zip(CAMERAS, self.process(*(images[CAMERA_KEYS[cam]] for cam in CAMERAS), train=train)))

    def to_pixels(self, normalised: torch.Tensor) -> torch.Tensor:
        """(..., 3, S, S) normalised -> float pixels in [0, 255] (clamped), as GR1-Training's rgb_back_process."""
        mean, std = self.mean.to(normalised.device), self.std.to(normalised.device)
        return (normalised * (std + NORM_EPS) + mean).clamp(0, 1) * 255.0

"""Helpers shared by several test modules (test modules import from here, conftest.py, data_helpers.py,
gr1_fixtures.py or crafted.py, never from each other)."""
from __future__ import annotations

import socket
import warnings

import numpy as np
import torch

from config import Config, from_dict
from facts import CAMERA_KEYS, CAMERA_SIZES, CAMERAS, GRIPPER_STATE_CLASSES, ROBOT_OBS_DIM


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (for a process group's or accelerate's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config(**changes) -> Config:
    """A GR-1 of a few thousand parameters (1 layer, 32 px images, hidden 32, window 3, chunk 4), random encoders."""
    values = dict(embed_dim=32, n_layer=1, n_head=2, resampler_depth=1, resampler_dim_head=8, resampler_heads=2,
                  resampler_num_latents=2, seq_len=3, chunk_size=4, skip_frame=1, rgb_shape=32, patch_size=16,
                  img_feat_dim=32, patch_feat_dim=32, lang_feat_dim=16, mae_depth=1, mae_num_heads=2,
                  clip_text_width=16, clip_text_layers=1, clip_text_heads=2, mae_ckpt="", clip_ckpt="",
                  n_positions=128)
    values.update(changes)
    return from_dict(values)


def tiny_inputs(cfg: Config, B: int = 2):
    """Seeded GR1.forward inputs for cfg (seq_len 3): lang (B, E), arm (B, T, 6), one-hot gripper (B, T, 2),
    features[cam] = (cls (B, T, F), patches (B, T, P, F)), attention mask (B, T) with row 1's last step padded."""
    g = torch.Generator().manual_seed(0)
    T, S = cfg.seq_len, cfg.rgb_shape
    return (torch.randn(B, cfg.lang_feat_dim, generator=g), torch.randn(B, T, 6, generator=g),
            torch.nn.functional.one_hot(torch.randint(0, 2, (B, T), generator=g), GRIPPER_STATE_CLASSES).float(),
            {cam: (torch.randn(B, T, cfg.img_feat_dim, generator=g),
                   torch.randn(B, T, (S // cfg.patch_size) ** 2, cfg.img_feat_dim, generator=g))
             for cam in CAMERAS},
            torch.tensor([[1, 1, 1], [1, 1, 0]])[:B])


def random_observation(rng: np.random.Generator) -> dict:
    """A CALVIN-shaped observation: random camera images, a random robot state with the gripper at -1 or +1."""
    return {"rgb_obs": {CAMERA_KEYS[cam]: rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                        for cam, size in CAMERA_SIZES.items()},
            "robot_obs": np.concatenate([rng.normal(size=ROBOT_OBS_DIM - 1), [rng.choice([-1.0, 1.0])]])}


def random_policy_model(cfg: Config):
    """(encoders, GR1 in eval mode, ImagePreprocessor) on the CPU with random weights (seeded by cfg.seed)."""
    from data.preprocess import ImagePreprocessor
    from models.build import build_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random encoders
        encoders, gr1, _ = build_model(cfg, "cpu", weights=None)
    return encoders, gr1.eval(), ImagePreprocessor(cfg, "cpu")

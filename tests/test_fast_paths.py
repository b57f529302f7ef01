"""Speed paths that must not change numbers: the frozen MAE's low-precision copy under autocast, frames chosen from a
host mask, and the logged losses read back once per log line; a bf16 training step with finite losses."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

from config import Config, load_config
from conftest import DEVICES, ROOT
from data.loader import DevicePrefetcher
from data.preprocess import ImagePreprocessor
from models.build import build_encoders, build_model
from training.logs import detached, empty_totals, mean_losses
from training.step import compute_losses, make_optimizer

TINY = os.path.join(ROOT, "configs", "tiny.json")


def _encoders_and_images():
    cfg = load_config(TINY)
    encoders = build_encoders(cfg)
    g = torch.Generator().manual_seed(0)
    images = {cam: torch.randn(2, 3, 3, cfg.rgb_shape, cfg.rgb_shape, generator=g) for cam in ("static", "gripper")}
    return encoders, images


def _direct(encoders, images):
    """The MAE called on the frames as they are, with its fp32 weights (autocast casts them at every call)."""
    flat = torch.cat([x.flatten(0, 1) for x in images.values()])
    with torch.no_grad():
        return encoders.mae(flat)


def test_low_precision_copy_gives_what_autocast_gives():
    encoders, images = _encoders_and_images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _direct(encoders, images)
        features = encoders.encode_frames(images)
    (copy,) = encoders._cast_mae.values()
    assert copy.blocks[0].mlp.fc1.weight.dtype == torch.bfloat16 and copy.norm.weight.dtype == torch.float32
    got = [torch.cat([features[cam][i].flatten(0, 1) for cam in images]) for i in range(2)]
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    # new weights (loaded in place) are seen: the copy is made again
    with torch.no_grad():
        encoders.mae.blocks[0].mlp.fc1.weight.mul_(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _direct(encoders, images)
        features = encoders.encode_frames(images)
    assert torch.equal(torch.cat([features[cam][1].flatten(0, 1) for cam in images]), expected[1])
    # without autocast: the fp32 MAE itself
    features = encoders.encode_frames(images)
    assert features["static"][0].dtype == torch.float32
    assert torch.equal(torch.cat([features[cam][1].flatten(0, 1) for cam in images]), _direct(encoders, images)[1])


def test_frames_chosen_from_a_mask_are_the_frames_encoded_alone():
    encoders, images = _encoders_and_images()
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    features = encoders.encode_frames(images, mask)
    full = encoders.encode_frames(images)
    for cam in images:
        for got, ref in zip(features[cam], full[cam]):
            torch.testing.assert_close(got[mask > 0], ref[mask > 0], rtol=1e-5, atol=1e-6)
            assert got[mask == 0].abs().sum() == 0
    # features feed trainable layers: they must be usable by autograd (not inference tensors)
    weight = torch.ones(features["static"][0].shape[-1], requires_grad=True)
    (features["static"][0] * weight).sum().backward()


def test_losses_summed_on_the_device_are_read_once():
    totals = empty_totals()
    for step in range(3):
        for k, v in detached({k: torch.tensor(float(step + i), requires_grad=True)
                              for i, k in enumerate(totals)}).items():
            totals[k] += v
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in totals.values())
    means = mean_losses(totals, 3)
    assert means == {k: 1.0 + i for i, k in enumerate(totals)} and all(type(v) is float for v in means.values())
    assert mean_losses(empty_totals(), 0) == empty_totals()


def _random_batch(cfg: Config, B: int) -> dict[str, torch.Tensor]:
    """A loader batch of B windows (host tensors, as the DataLoader yields them)."""
    g = torch.Generator().manual_seed(0)
    T, K = cfg.seq_len, cfg.chunk_size
    actions = torch.rand(B, T, K, 7, generator=g) * 2 - 1
    actions[..., 6] = actions[..., 6].gt(0).float()
    return {"rgb_static": torch.randint(0, 256, (B, T, 3, 200, 200), dtype=torch.uint8, generator=g),
            "rgb_gripper": torch.randint(0, 256, (B, T, 3, 84, 84), dtype=torch.uint8, generator=g),
            "inst_token": torch.randint(1, 49000, (B, 77), dtype=torch.int32, generator=g),
            "arm_state": torch.randn(B, T, 6, generator=g), "actions": actions, "mask": torch.ones(B, T, K),
            "gripper_state": torch.nn.functional.one_hot(torch.randint(0, 2, (B, T), generator=g), 2).float()}


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_training_step_has_finite_losses(device):
    """One optimiser step as Main.py runs it with mixed_precision=bf16: the batch through DevicePrefetcher (a side
    stream on CUDA), bf16 autocast with the frozen MAE's bf16 copy, fused AdamW; every loss, gradient and updated
    weight finite. CPU: the tiny config (the suite's time budget); CUDA (`pytest -m cuda`): full size, configs.json."""
    dev = torch.device(device)
    cfg = load_config(TINY if dev.type == "cpu" else None, ["mae_ckpt=", "clip_ckpt=", "clip_precision=auto"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random encoders
        encoders, gr1, _ = build_model(cfg, dev, weights=None)
    gr1.train()
    optimizer = make_optimizer(gr1, cfg, dev)
    (batch,) = DevicePrefetcher([_random_batch(cfg, 2)], dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        losses = compute_losses(gr1, encoders, ImagePreprocessor(cfg, dev), batch, cfg, train=True)
    losses["total"].backward()
    optimizer.step()
    assert all(torch.isfinite(v).item() for v in losses.values()), {k: v.item() for k, v in losses.items()}
    assert losses["total"].item() > 0
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in gr1.parameters())
    assert all(torch.isfinite(p).all() for p in gr1.parameters())
    assert [m.blocks[0].mlp.fc1.weight.dtype for m in encoders._cast_mae.values()] == [torch.bfloat16]

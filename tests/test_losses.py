import dataclasses

import pytest
import torch
import torch.nn.functional as F

from config import Config, ModelConfig
from models.losses import frame_losses, gr1_losses, masked_mean, patchify, pixel_targets

# skip_frame 1, patch 16, per-patch normalised pixel targets, arm loss weight 100
LOSS_SETTINGS = dataclasses.replace(ModelConfig.from_config(Config()), skip_frame=1, patch_size=16,
                                    without_norm_pixel_loss=False, arm_loss_ratio=100.0)


def test_patchify_order_is_patch_row_col_then_y_x_channel():
    img = torch.arange(3 * 4 * 4, dtype=torch.float32).reshape(1, 1, 3, 4, 4)  # C=3, 4x4, patch 2
    p = patchify(img, 2)
    assert p.shape == (1, 1, 4, 12)
    # patch (row 0, col 1) = pixels y in 0..1, x in 2..3; within it y, x, then channel fastest
    expected = torch.stack([img[0, 0, c, y, x] for y in (0, 1) for x in (2, 3) for c in range(3)])
    assert torch.equal(p[0, 0, 1], expected)


def test_pixel_target_normalisation_uses_unbiased_std_plus_eps():
    img = torch.rand(1, 1, 3, 4, 4)
    t = pixel_targets(img, 2, normalize=True)
    raw = patchify(img, 2)
    manual = (raw - raw.mean(-1, keepdim=True)) / (raw.std(-1, unbiased=True, keepdim=True) + 1e-6)
    torch.testing.assert_close(t, manual, rtol=0, atol=1e-6)
    assert torch.equal(pixel_targets(img, 2, normalize=False), raw)


def test_masked_mean_by_hand():
    loss = torch.tensor([[[1.0, 3.0], [5.0, 7.0]], [[100.0, 100.0], [2.0, 4.0]]])  # (B=2, T=2, 2)
    mask = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    # valid entries: (0,0) mean 2, (0,1) mean 6, (1,1) mean 3 -> (4 + 12 + 6) / 3 entries / 2 elements
    assert masked_mean(loss, mask).item() == pytest.approx((1 + 3 + 5 + 7 + 2 + 4) / 3 / 2)


def test_all_masked_batch_gives_zero_not_nan_and_finite_gradients():
    pred = torch.randn(2, 4, 3, 6, requires_grad=True)
    loss = masked_mean(F.smooth_l1_loss(pred, torch.zeros_like(pred), reduction="none"), torch.zeros(2, 4, 3))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(pred.grad).all()
    images = torch.randn(1, 4, 3, 32, 32)
    frames = torch.randn(1, 1, 4, 768, requires_grad=True)
    fl = frame_losses(frames, images, torch.tensor([[1.0, 1.0, 1.0, 0.0]]), 3, 16, True)
    assert fl.item() == 0.0  # the only target frame (t=3) is padded


def test_skip_frame_pairs_prediction_t_with_frame_t_plus_skip():
    images = torch.randn(1, 4, 3, 16, 16)
    targets = pixel_targets(images, 16, True)  # (1, 4, 1, 768)
    preds = torch.zeros(1, 4, 1, 768)
    preds[:, :2] = targets[:, 2:]  # perfect predictions for skip 2
    assert frame_losses(preds, images, torch.ones(1, 4), 2, 16, True).item() == 0.0
    assert frame_losses(preds[:, :2], images, torch.ones(1, 4), 2, 16, True).item() == 0.0  # pre-trimmed
    assert frame_losses(preds, images, torch.ones(1, 4), 1, 16, True).item() > 0.1


def test_total_is_the_weighted_sum():
    B, T, K = 1, 3, 2
    out = {"arm_action": torch.randn(B, T, K, 6), "gripper_action": torch.randn(B, T, K, 1),
           "rgb_static_pred": torch.randn(B, T, 1, 768), "rgb_gripper_pred": torch.randn(B, T, 1, 768)}
    images = {cam: torch.randn(B, T, 3, 16, 16) for cam in ("static", "gripper")}
    actions = torch.rand(B, T, K, 7).round()
    losses = gr1_losses(out, images, actions, torch.ones(B, T, K), LOSS_SETTINGS)
    total = losses["rgb_static"] + losses["rgb_gripper"] + 100 * losses["action_arm"] + losses["action_gripper"]
    assert torch.equal(losses["total"], total)
    expected_bce = F.binary_cross_entropy_with_logits(out["gripper_action"], actions[..., 6:])
    torch.testing.assert_close(losses["action_gripper"], expected_bce)

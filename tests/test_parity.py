"""Same numbers as the reference for the same weights: GR1-Training fixtures A and B (outputs, pixel targets, losses,
gradients) and the Bytedance GR-1 fixture loaded through the Bytedance converter.

Tolerance: 1e-6 absolute plus 2**-22 (two float32 ulps) of the reference value. The fixtures were made on a CPU
with AVX-512; on CPUs without it the unmodified reference code itself differs from its own fixture by up to
1.2e-6 on pixel predictions (values up to ~10), from different matmul kernels. With exact_attention=true this
implementation is bit-identical to the reference code run on the same machine (checked during development).
On CUDA (`pytest -m cuda`, TF32 off) the same fixtures hold within 1e-4 absolute plus the same relative part.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import DEVICES, strict_device
from gr1_fixtures import REFERENCE_OUTPUT_NAMES, fixture_inputs, load_fixture, run_model, to_device
from models.gr1 import Keep
from models.losses import gr1_losses, pixel_targets

ATOL = {"cpu": 1e-6, "cuda": 1e-4}  # absolute part of the tolerance per device type (the 1e-4 on CUDA)
MODELS = [("parity_small_A", False, "A-fused"), ("parity_small_A", True, "A-exact"),
          ("parity_small_B", False, "B-fused"), ("parity_small_B", True, "B-exact")]


def assert_matches_reference(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    atol = ATOL[ours.device.type]
    ours = ours.detach().cpu().reshape(ref.shape).to(ref.dtype)
    excess = (ours - ref).abs() - (atol + 2.0 ** -22 * ref.abs())
    worst = (ours - ref).abs().max().item()
    assert excess.max().item() <= 0, f"{what}: max |diff| {worst:.3e} exceeds {atol:g} + 2^-22 |ref|"


@pytest.fixture(scope="module", params=[pytest.param((name, exact, device.values[0]), id=f"{label}-{device.id}",
                                                     marks=device.marks)
                                        for name, exact, label in MODELS for device in DEVICES])
def fixture_model(request, tmp_path_factory):
    torch.set_num_threads(1)
    name, exact, device = request.param
    return load_fixture(name, str(tmp_path_factory.mktemp(name)), strict_device(device), exact_attention=exact)


def _device(gr1: torch.nn.Module) -> torch.device:
    return next(gr1.parameters()).device


def test_forward_outputs_match(fixture_model):
    cfg, encoders, gr1, fx, report = fixture_model
    assert report.format == "gr1-training"
    with torch.no_grad():
        out = run_model(encoders, gr1, fixture_inputs(fx, _device(gr1)))
    for ref_name, name in REFERENCE_OUTPUT_NAMES.items():
        assert_matches_reference(out[name], fx["outputs"][ref_name], ref_name)


def test_pixel_targets_match(fixture_model):
    cfg, encoders, gr1, fx, _ = fixture_model
    inputs = fixture_inputs(fx, _device(gr1))
    for cam, ref_name in (("static", "obs_targets"), ("gripper", "obs_hand_targets")):
        targets = pixel_targets(inputs["images"][cam], cfg.patch_size, not cfg.without_norm_pixel_loss)
        atol = ATOL[targets.device.type]
        torch.testing.assert_close(targets.cpu(), fx["outputs"][ref_name], rtol=0, atol=atol)


def test_losses_match_for_every_skip_frame(fixture_model):
    cfg, encoders, gr1, fx, _ = fixture_model
    inputs, targets = fixture_inputs(fx, _device(gr1)), to_device(fx["loss_targets"], _device(gr1))
    with torch.no_grad():
        out = run_model(encoders, gr1, inputs)
    for key, ref_losses in fx["losses"].items():
        skip = int(key.rsplit("_", 1)[1])
        losses = gr1_losses(out, inputs["images"], targets["actions"].float(), targets["mask"].float(),
                            dataclasses.replace(gr1.config, skip_frame=skip))
        for name, ref in ref_losses.items():
            assert_matches_reference(losses[name].detach(), ref, f"{key} {name}")


def test_gradients_match_through_the_training_path(fixture_model):
    """The training path leaves out work whose result is unused (frames of padded steps are not encoded, the last
    skip_frame steps are not decoded) and must still give the reference's gradients. The frame mask stays on the
    host, as in training."""
    cfg, encoders, gr1, fx, _ = fixture_model
    inputs, targets = fixture_inputs(fx, _device(gr1)), to_device(fx["loss_targets"], _device(gr1))
    gr1.zero_grad(set_to_none=True)
    keep = Keep(frame_steps=list(range(cfg.seq_len - cfg.skip_frame)))
    out = run_model(encoders, gr1, inputs, keep=keep, frame_mask=fx["inputs"]["attention_mask"])
    losses = gr1_losses(out, inputs["images"], targets["actions"].float(), targets["mask"].float(), gr1.config)
    losses["total"].backward()
    ref_grads = fx["grads_total_loss_eval_mode"]
    params = dict(gr1.named_parameters())
    trainable = {k for k, p in params.items() if p.requires_grad}
    assert trainable == set(ref_grads), "trainable parameters differ from those the reference trains"
    for name, ref in ref_grads.items():
        assert_matches_reference(params[name].grad, ref, f"grad {name}")
    assert all(p.grad is None for p in encoders.parameters())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_size", [1, 10])
def test_bytedance_snapshot_matches_bytedance_model(tmp_path, chunk_size, device):
    """Bytedance GR-1 weights through the converter (wpe zeroed, chunk queries zero) reproduce Bytedance's model;
    with chunk_size 10 every chunk position repeats the chunk-1 prediction."""
    torch.set_num_threads(1)
    cfg, encoders, gr1, fx, report = load_fixture("parity_bytedance_small", str(tmp_path), strict_device(device),
                                                  chunk_size=chunk_size)
    assert report.format == "bytedance"
    assert torch.count_nonzero(gr1.transformer.wpe.weight) == 0
    inputs = fx["inputs"]
    model_inputs = to_device({"images": {"static": inputs["rgb_float16"].float(),
                                         "gripper": inputs["hand_rgb_float16"].float()},
                              "arm_state": inputs["state"]["arm"], "gripper_state": inputs["state"]["gripper"],
                              "tokens": inputs["language"], "attention_mask": inputs["attention_mask"]}, device)
    with torch.no_grad():
        out = run_model(encoders, gr1, model_inputs)
    ref = fx["outputs"]
    for k in range(chunk_size):
        assert_matches_reference(out["arm_action"][:, :, k], ref["arm_action_preds"], f"arm chunk {k}")
        assert_matches_reference(out["gripper_action"][:, :, k], ref["gripper_action_preds"], f"gripper chunk {k}")
    if chunk_size != 1:
        return  # a different token sequence: frame predictions agree in exact arithmetic only (rounding ~1e-6)
    for name, ref_name in (("rgb_static_pred", "obs_preds"), ("rgb_gripper_pred", "obs_hand_preds")):
        assert_matches_reference(out[name][:, :, :16], ref[f"{ref_name}[:, :, :16]"], name)
        total = out[name].double().sum().item()
        assert total == pytest.approx(ref[f"{ref_name}_sum_float64"].item(), abs=1e-3), name

"""GR1 network: token layout, gradient coverage, DDP without unused parameters, and the equivalence of the
shortcuts (pruned queries, unencoded padded frames) with the full computation."""
from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from config import Config, ModelConfig
from helpers import tiny_config, tiny_inputs
from models.build import build_gr1
from models.gr1 import GR1, Keep, TokenLayout
from models.losses import gr1_losses


def test_token_layout_matches_the_reference():
    layout = TokenLayout(n_latents=9, chunk_size=10)
    assert layout.per_step == 52 and layout.n_obs == 22
    assert layout.camera("static") == slice(2, 12) and layout.camera("gripper") == slice(12, 22)
    assert layout.action_queries == slice(22, 32)
    assert layout.obs_queries("static") == slice(32, 42) and layout.obs_queries("gripper") == slice(42, 52)
    assert TokenLayout(9, 1).per_step == 43
    assert Config().seq_len * layout.per_step == 520


def _loss(gr1: GR1, cfg: Config, keep: Keep | None = None, B: int = 2):
    lang, arm, grip, feats, mask = tiny_inputs(cfg, B)
    out = gr1(lang, arm, grip, feats, mask, keep)
    g = torch.Generator().manual_seed(1)
    images = {cam: torch.randn(B, cfg.seq_len, 3, cfg.rgb_shape, cfg.rgb_shape, generator=g)
              for cam in ("static", "gripper")}
    actions = torch.rand(B, cfg.seq_len, cfg.chunk_size, 7, generator=g).round()
    action_mask = mask[:, :, None].float().expand(-1, -1, cfg.chunk_size).clone()
    loss_cfg = dataclasses.replace(ModelConfig.from_config(cfg), without_norm_pixel_loss=False, arm_loss_ratio=100.0)
    return gr1_losses(out, images, actions, action_mask, loss_cfg)["total"]


def test_every_trainable_parameter_gets_a_gradient_and_frozen_ones_none():
    cfg = tiny_config()
    gr1 = build_gr1(cfg).train()
    _loss(gr1, cfg, Keep(frame_steps=list(range(cfg.seq_len - cfg.skip_frame)))).backward()
    missing = [n for n, p in gr1.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"trainable parameters without gradient: {missing}"
    frozen = {n for n, p in gr1.named_parameters() if not p.requires_grad}
    assert frozen == {"transformer.wte.weight", "decoder_pos_embed"}
    assert all(p.grad is None for n, p in gr1.named_parameters() if n in frozen)


def test_ddp_needs_no_find_unused_parameters(tmp_path):
    """Two iterations under DDP with find_unused_parameters=False: DDP raises if any parameter got no gradient."""
    # A file store, not a TCP port: a port picked free can be taken by another process before the store binds it
    # (it hung once with several suites on one machine), and the timeout turns any other hang into a failure.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=timedelta(seconds=120))
    try:
        cfg = tiny_config()
        model = torch.nn.parallel.DistributedDataParallel(build_gr1(cfg).train(), find_unused_parameters=False)
        for _ in range(2):
            _loss(model, cfg, Keep(frame_steps=list(range(cfg.seq_len - cfg.skip_frame)))).backward()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("keep", [Keep(frame_steps=[0, 1]), Keep(action_steps=[2], frame_steps=[]),
                                  Keep(action_steps=[1], frame_steps=[1])], ids=["train", "eval", "eval-video"])
def test_left_out_queries_change_no_other_output(keep):
    cfg = tiny_config()
    gr1 = build_gr1(cfg).eval()
    inputs = tiny_inputs(cfg)
    with torch.no_grad():
        full = gr1(*inputs)
        part = gr1(*inputs, keep=keep)
    act = list(range(cfg.seq_len)) if keep.action_steps is None else keep.action_steps
    torch.testing.assert_close(part["arm_action"], full["arm_action"][:, act], rtol=0, atol=1e-6)
    torch.testing.assert_close(part["gripper_action"], full["gripper_action"][:, act], rtol=0, atol=1e-6)
    for cam in ("static", "gripper"):
        name = f"rgb_{cam}_pred"
        if keep.frame_steps:
            torch.testing.assert_close(part[name], full[name][:, keep.frame_steps], rtol=0, atol=1e-6)
        else:
            assert name not in part


def test_padded_frames_do_not_influence_valid_outputs():
    """Features of a padded timestep (mask 0) are invisible: changing them changes no prediction of valid steps."""
    cfg = tiny_config()
    gr1 = build_gr1(cfg).eval()
    lang, arm, grip, feats, mask = tiny_inputs(cfg)
    changed = {cam: (cls.clone(), patches.clone()) for cam, (cls, patches) in feats.items()}
    for cls, patches in changed.values():
        cls[1, 2] = 0
        patches[1, 2] = 0
    with torch.no_grad():
        a = gr1(lang, arm, grip, feats, mask)
        b = gr1(lang, arm, grip, changed, mask)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)

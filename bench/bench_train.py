"""Training throughput of the full-size GR-1: this project's training step vs the same step written the way
GR1-Training's Main.py runs it.

    python bench/bench_train.py [--batch 1] [--steps 3] [--threads 2] [key=value ...]

Reference-style step (written here, from GR1_REFERENCE.md): frozen MAE and CLIP called with autograd enabled, each
camera through the MAE separately with the reference ViT's attention arithmetic, CLIP text re-encoded every step,
GPT-2 building its KV cache, every timestep's frames decoded, GR1-Training's masked_loss. Ours: training.py's
compute_losses (frozen encoders under no_grad with fused attention, both cameras in one MAE batch, text embeddings
cached, no KV cache, the last skip_frame steps not decoded, padded frames not encoded).

Both start from the same weights and see the same batches and random shifts, CPU fp32. GPT-2 dropout is switched
off in both so that the losses of the two can be compared step by step (dropout masks depend on tensor shapes).
Prints samples/s of each, the ratio (target >= 1.3x) and the largest relative difference of their losses.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import Config, load_config  # noqa: E402
from data.preprocess import ImagePreprocessor  # noqa: E402
from models.build import build_model, set_exact_attention  # noqa: E402
from training import compute_losses  # noqa: E402


def reference_losses(gr1, encoders, pre, batch: dict, cfg: Config) -> dict[str, torch.Tensor]:
    from models.losses import pixel_targets
    static, gripper = pre.process(batch["rgb_static"], batch["rgb_gripper"], train=True)
    B, T = static.shape[:2]
    feats = {}
    for cam, images in (("static", static), ("gripper", gripper)):  # two MAE calls, autograd enabled
        cls, patches = encoders.mae(images.flatten(0, 1))
        feats[cam] = (cls.unflatten(0, (B, T)), patches.unflatten(0, (B, T)))
    emb = encoders.clip_text(batch["inst_token"].long())  # re-encoded every step
    lang = (emb / (emb.norm(dim=1, keepdim=True) + 1e-6)).float()
    obs_mask = batch["mask"][..., 0]
    out = gr1(lang, batch["arm_state"], batch["gripper_state"], feats, obs_mask)  # every step decoded
    normalize = not cfg.without_norm_pixel_loss
    losses = {f"rgb_{cam}": _ref_loss(out[f"rgb_{cam}_pred"], pixel_targets(img, cfg.patch_size, normalize),
                                      obs_mask, cfg.skip_frame, F.mse_loss)
              for cam, img in (("static", static), ("gripper", gripper))}
    losses["action_arm"] = _ref_loss(out["arm_action"], batch["actions"][..., :6], batch["mask"], 0,
                                     F.smooth_l1_loss)
    losses["action_gripper"] = _ref_loss(out["gripper_action"], batch["actions"][..., -1:], batch["mask"], 0,
                                         F.binary_cross_entropy_with_logits)
    losses["total"] = (losses["rgb_static"] + losses["rgb_gripper"] + cfg.arm_loss_ratio * losses["action_arm"]
                       + losses["action_gripper"])
    return losses


def _ref_loss(pred, target, mask, skip, fn):
    """GR1-Training's masked_loss: drop the last `skip` predictions and the first `skip` targets / mask entries."""
    if skip:
        pred = pred[:, :-skip]
    target, mask = target[:, skip:], mask[:, skip:]
    loss = fn(pred, target, reduction="none")
    per_entry = math.prod(pred.shape[mask.dim():])
    mask = mask.reshape(mask.shape + (1,) * (loss.dim() - mask.dim()))
    return (loss * mask).sum() / mask.sum() / per_entry


def synthetic_batch(cfg: Config, B: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    T, K = cfg.seq_len, cfg.chunk_size
    actions = torch.rand(B, T, K, 7, generator=g) * 2 - 1
    actions[..., 6] = (actions[..., 6] > 0).float()
    return {"rgb_static": torch.randint(0, 256, (B, T, 3, 200, 200), dtype=torch.uint8, generator=g),
            "rgb_gripper": torch.randint(0, 256, (B, T, 3, 84, 84), dtype=torch.uint8, generator=g),
            "inst_token": torch.randint(1, 49405, (B, 77), dtype=torch.int32, generator=g),
            "arm_state": torch.randn(B, T, 6, generator=g),
            "gripper_state": F.one_hot(torch.randint(0, 2, (B, T), generator=g), 2).float(),
            "actions": actions, "mask": torch.ones(B, T, K)}


def run(name: str, step_fn, gr1, batches, seed: int) -> tuple[list[float], list[float]]:
    optimizer = torch.optim.AdamW([p for p in gr1.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)
    times, losses = [], []
    for i, batch in enumerate(batches):
        torch.manual_seed(seed + i)  # same random shifts for both paths
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = step_fn(batch)["total"]
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        print(f"  {name} step {i}: {times[-1]:.2f} s, loss {losses[-1]:.6f}", flush=True)
    return times, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per path (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(None, ["mae_ckpt=", "clip_ckpt=", "clip_precision=fp32", "dropout=0.0", *args.overrides])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random encoders: this measures speed
        encoders, gr1, _ = build_model(cfg, "cpu", weights=None)
    for m in gr1.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # incl. GPT-2's embedding dropout (fixed at 0.1 as in GR1-Training)
    gr1.train()
    pre = ImagePreprocessor(cfg, "cpu")
    batches = [synthetic_batch(cfg, args.batch, s) for s in range(args.steps + 1)]

    ref_gr1, ref_encoders = copy.deepcopy(gr1), copy.deepcopy(encoders)
    set_exact_attention(ref_gr1, True)
    set_exact_attention(ref_encoders, True)
    ref_gr1.transformer.config.use_cache = True  # GR1-Training's GPT2Config default: a KV cache every forward
    print(f"GR-1 training step, full size, CPU fp32, batch {args.batch}, {args.threads} threads, "
          f"torch {torch.__version__}")
    with torch.enable_grad():
        ref_t, ref_l = run("reference", lambda b: reference_losses(ref_gr1, ref_encoders, pre, b, cfg), ref_gr1,
                           batches, 1000)
    ours_t, ours_l = run("ours", lambda b: compute_losses(gr1, encoders, pre, b, cfg, train=True), gr1, batches,
                         1000)
    ref_s, ours_s = statistics.median(ref_t[1:]), statistics.median(ours_t[1:])
    rel = max(abs(a - b) / abs(a) for a, b in zip(ref_l, ours_l))
    print(f"  reference: {args.batch / ref_s:.3f} samples/s (median step {ref_s:.2f} s)")
    print(f"  ours:      {args.batch / ours_s:.3f} samples/s (median step {ours_s:.2f} s)")
    print(f"  speed-up {ref_s / ours_s:.2f}x (target >= 1.3x); max relative loss difference {rel:.1e}")


if __name__ == "__main__":
    main()

"""Training step of the full-size GR-1: the real GR1-Training code vs ours, same weights, same batches.

    python bench/bench_train.py --reference_dir ../GR1-Training [--batch 1] [--rounds 6] [--threads 2]
                                [--frame_sharing 1] [--device cpu|cuda] [--precision fp32|bf16] [--compile]
                                [--memory] [--json FILE] [key=value ...]

With --reference_dir (a local clone of EDiRobotics/GR1-Training, imported at run time, never committed) the
reference's GR1 is built as its Main.py builds it, with random full-size weights (configs.json unless overridden),
and its whole state dict goes into our model through our converter, so both hold the same weights. Each round runs
one optimiser step of each (reference: PreProcess.rgb_process, GR1.forward, Main.py's masked_loss x 4, backward,
AdamW fused as its Main.py; ours: training/step.py's compute_losses, backward, make_optimizer's AdamW) on the same
batch with the same random shifts, alternating which goes first; round 0 is a warm-up. Prints every step, the
medians, the ratio of the medians and the median of the per-round ratios, and the largest relative difference of
the two losses over the rounds. GPT-2 dropout is 0 in both, so that the losses can be compared step by step.
Without --reference_dir only our own figures are printed.

--frame_sharing G feeds ours batches of groups of G consecutive windows of one episode, as the training sampler does
with frame_sharing=G (the reference gets the same windows, each encoded on its own). One random shift is then drawn
per group, so the two losses are no longer comparable step by step (tests/test_frame_sharing.py checks that each
window gets the features and losses of that window encoded alone with the group's shift).

--device cuda --precision bf16 runs both under torch.autocast(bfloat16), as accelerate's mixed precision does (the
reference's CLIP in fp16, as clip.load gives it on CUDA). --memory measures the peak memory of a few steps of each in
separate processes. --compile also times our step with torch.compile (compile_model) and compares its losses.
--json FILE also writes the figures (samples/s and median step per path, speed-ups, loss agreement) as JSON
(bench/gpu_check.sh reads it).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import real_reference as rr
from config import Config, load_config
from data.calvin_format import CAMERA_SIZES
from data.lmdb_dataset import SHARES_PREVIOUS
from data.loader import HOST_FRAME_MASK, HOST_KEYS
from data.preprocess import ImagePreprocessor
from facts import ACTION_DIM, ARM_DIM, GRIPPER_STATE_CLASSES
from models.build import build_model
from training.step import compute_losses, make_optimizer


def synthetic_batch(cfg: Config, B: int, seed: int, frame_sharing: int, device: torch.device
                    ) -> dict[str, torch.Tensor]:
    """B windows in groups of frame_sharing consecutive windows of one synthetic episode (1: independent windows)."""
    g = torch.Generator().manual_seed(seed)
    T, K, G = cfg.seq_len, cfg.chunk_size, frame_sharing
    groups = -(-B // G)
    span = T + G - 1  # steps of one group's episode piece
    images = {key: torch.randint(0, 256, (groups, span, 3, size, size), dtype=torch.uint8, generator=g)
              for key, size in CAMERA_SIZES.items()}  # static, then gripper
    arm = torch.randn(groups, span, ARM_DIM, generator=g)
    grip = F.one_hot(torch.randint(0, 2, (groups, span), generator=g), GRIPPER_STATE_CLASSES).float()
    steps = torch.rand(groups, span + K - 1, ACTION_DIM, generator=g) * 2 - 1
    steps[..., ARM_DIM] = (steps[..., ARM_DIM] > 0).float()
    windows = [(k, j) for k in range(groups) for j in range(G)][:B]
    frames = [slice(j, j + T) for _, j in windows]
    chunk = torch.arange(T)[:, None] + torch.arange(K)[None, :]  # (T, K) step offsets
    batch = {**{key: torch.stack([x[k, f] for (k, _), f in zip(windows, frames)]) for key, x in images.items()},
             "inst_token": torch.randint(1, 49405, (1, 77), dtype=torch.int32, generator=g).expand(B, 77).clone(),
             "arm_state": torch.stack([arm[k, f] for (k, _), f in zip(windows, frames)]),
             "gripper_state": torch.stack([grip[k, f] for (k, _), f in zip(windows, frames)]),
             "actions": torch.stack([steps[k, j + chunk] for k, j in windows]), "mask": torch.ones(B, T, K)}
    if G > 1:
        batch[SHARES_PREVIOUS] = torch.tensor([j > 0 for _, j in windows])
    moved = {k: v if k in HOST_KEYS else v.to(device) for k, v in batch.items()}  # as DevicePrefetcher
    return {**moved, HOST_FRAME_MASK: batch["mask"][..., 0]}


def frame_sharing_bound(ref, model, pre, cfg: Config, batch: dict) -> str:
    """The speed-up frame sharing can give by FLOPs, counting only the MAE frames it saves: FLOPs of one reference
    training step at batch 1 (FlopCounterMode; CPU SDPA kernels, GPT-2's attention here, have no formula: < 2 %),
    minus the MAE's share for the frames not encoded."""
    from torch.utils.flop_counter import FlopCounterMode
    shares = batch[SHARES_PREVIOUS].numpy()
    sizes = np.diff(np.r_[np.flatnonzero(~shares), len(shares)])
    frames = sum(cfg.seq_len + n - 1 for n in sizes) / len(shares)  # distinct frames per window and camera
    one = {k: v[:1] for k, v in batch.items() if k != SHARES_PREVIOUS}
    with FlopCounterMode(display=False) as counter:
        rr.reference_losses(ref, model, pre, one, cfg)["total"].backward()
    model.zero_grad(set_to_none=True)
    total = counter.get_total_flops()
    mae = sum(counter.get_flop_counts().get("GR1.model_mae", {}).values())
    bound = total / (total - mae * (1 - frames / cfg.seq_len))
    return (f"FLOP bound of frame sharing (MAE frames only): {bound:.2f}x ({frames:.2f} instead of {cfg.seq_len} MAE "
            f"frames per window and camera; reference step {total / 1e9:.0f} GFLOP per sample, MAE {mae / 1e9:.0f})")


def reference_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """GR1-Training's Main.py: AdamW(model.parameters(), fused=True) (frozen parameters never get a gradient)."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr_max, weight_decay=cfg.weight_decay, fused=True)


def step_fn(losses_fn, optimizer, batches, seeds, autocast, record: list):
    def step(r: int) -> None:
        torch.manual_seed(seeds[r])  # the same random shifts for both
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            losses = losses_fn(batches[r])
        losses["total"].backward()
        optimizer.step()
        record.append(losses["total"].detach())
    return step


def build_ours(cfg: Config, device: torch.device):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random encoders: this measures speed
        encoders, gr1, _ = build_model(cfg, device, weights=None)
    return encoders, gr1.train()


def memory_child(args, cfg: Config, device: torch.device) -> None:
    """--only NAME: a few steps of one path in this process, then its peak memory (random weights, same sizes)."""
    batches = [synthetic_batch(cfg, args.batch, s, args.frame_sharing, device) for s in range(3)]
    autocast = autocast_for(args.precision, device)
    if args.only == "reference":
        ref = rr.import_reference(args.reference_dir)
        model = rr.build_reference_gr1(ref, cfg, device).train()
        pre = rr.reference_preprocessor(ref, cfg, device)
        step = step_fn(lambda b: rr.reference_losses(ref, model, pre, b, cfg), reference_optimizer(model, cfg),
                       batches, range(3), autocast, [])
    else:
        encoders, gr1 = build_ours(cfg, device)
        pre = ImagePreprocessor(cfg, device)
        step = step_fn(lambda b: compute_losses(gr1, encoders, pre, b, cfg, train=True),
                       make_optimizer(gr1, cfg, device), batches, range(3), autocast, [])
    for r in range(3):
        step(r)
    if device.type == "cuda":
        print(f"peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    else:
        print(f"peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


def measure_memory(args) -> None:
    paths = ["ours"] + (["reference"] if args.reference_dir else [])
    peaks = {}
    for name in paths:
        cmd = [sys.executable, os.path.abspath(__file__), "--only", name, *sys.argv[1:]]
        cmd.remove("--memory")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        peaks[name] = float(out.split()[1])
    what = "GPU memory allocated" if args.device == "cuda" else "RSS"
    line = "  ".join(f"{name} {peak:.2f} GiB" for name, peak in peaks.items())
    change = f"  ({peaks['ours'] / peaks['reference'] - 1:+.0%})" if "reference" in peaks else ""
    print(f"peak {what}, batch {args.batch}, 3 training steps, separate processes: {line}{change}")


def autocast_for(precision: str, device: torch.device):
    """A context factory: bf16 autocast as accelerate's mixed precision, or nothing (fp32)."""
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=rr.STAND_IN_HELP)
    parser.add_argument("--reference_dir", default="", help="local clone of EDiRobotics/GR1-Training")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6, help="rounds of one step each (round 0 is a warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--frame_sharing", type=int, default=1, help="windows per group in our batches")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--compile", action="store_true", help="also time our step with torch.compile")
    parser.add_argument("--memory", action="store_true", help="measure peak memory instead (separate processes)")
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    parser.add_argument("--only", choices=("ours", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--config", default=None, help="config file (default: configs.json, full size)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_config(args.config, ["mae_ckpt=", "clip_ckpt=", "clip_precision=auto", "dropout=0.0",
                             f"frame_sharing={args.frame_sharing}", *args.overrides])
    if args.only:
        return memory_child(args, cfg, device)
    if args.memory:
        return measure_memory(args)

    encoders, gr1 = build_ours(cfg, device)
    paths, records, autocast = {}, {}, autocast_for(args.precision, device)
    batches = [synthetic_batch(cfg, args.batch, 100 + r, args.frame_sharing, device) for r in range(args.rounds)]
    seeds = [1000 + r for r in range(args.rounds)]
    if args.reference_dir:
        ref, model, ref_pre = rr.reference_beside_ours(args.reference_dir, cfg, device, gr1, encoders)
        model.train()
        if args.frame_sharing > 1:
            bound = frame_sharing_bound(ref, model, ref_pre, cfg, batches[0])
        records["reference"] = []
        paths["reference"] = step_fn(lambda b: rr.reference_losses(ref, model, ref_pre, b, cfg),
                                     reference_optimizer(model, cfg), batches, seeds, autocast, records["reference"])
    pre = ImagePreprocessor(cfg, device)
    records["ours"] = []
    paths["ours"] = step_fn(lambda b: compute_losses(gr1, encoders, pre, b, cfg, train=True),
                            make_optimizer(gr1, cfg, device), batches, seeds, autocast, records["ours"])
    if args.compile:
        import copy
        compiled = torch.compile(copy.deepcopy(gr1))
        records["compiled"] = []
        paths["compiled"] = step_fn(lambda b: compute_losses(compiled, encoders, pre, b, cfg, train=True),
                                    make_optimizer(compiled, cfg, device), batches, seeds, autocast,
                                    records["compiled"])
    print(f"GR-1 training step, {os.path.basename(args.config or 'configs.json')}, batch {args.batch}, frame_sharing "
          f"{args.frame_sharing}, {args.precision}, {rr.machine_line(device, args.threads)}")
    timings = rr.alternate(paths, args.rounds, device, args.threads)
    figures = report(args, timings, records)
    if args.reference_dir and args.frame_sharing > 1:
        print(f"  {bound}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "device": args.device, "precision": args.precision,
                       "frame_sharing": args.frame_sharing, **figures}, f, indent=1)


def report(args, timings: dict[str, rr.Timing], records: dict[str, list]) -> dict:
    """Prints the figures; returns them: per path samples/s and median step, per comparison the speed-ups and the
    largest relative difference of the total loss."""
    for t in timings.values():  # round 0 is the warm-up
        del t.wall[0], t.cpu_share[0]
    print(f"  {args.rounds - 1} timed rounds (medians; per-round CPU share near 1.0 = this process had the CPU):")
    figures: dict = {"paths": {name: {"samples_per_s": args.batch / t.median(), "median_step_s": t.median()}
                               for name, t in timings.items()}, "comparisons": {}}
    for name, t in timings.items():
        print(f"  {name:>9s}: {args.batch / t.median():8.3f} samples/s (median step {t.median():.3f} s, min "
              f"{min(t.wall):.3f}, max {max(t.wall):.3f}, CPU share {statistics.median(t.cpu_share):.2f})")
    ours = timings["ours"]
    for name in [n for n in timings if n != "ours"]:
        base = timings[name]
        ratios = rr.paired_ratios(base, ours)
        label = f"ours vs {name}" if name == "reference" else f"{name} vs ours"
        speed = base.median() / ours.median() if name == "reference" else ours.median() / base.median()
        pr = statistics.median(ratios) if name == "reference" else statistics.median(1 / x for x in ratios)
        print(f"  speed-up {label}: {speed:.2f}x (ratio of medians), {pr:.2f}x (median of per-round ratios)")
        a = torch.stack(records[name]).float().cpu()
        b = torch.stack(records["ours"]).float().cpu()
        rel = ((a - b).abs() / a.abs()).max().item()
        figures["comparisons"][label] = {"speed_up": speed, "median_round_ratio": pr, "max_rel_loss_diff": rel}
        if name == "reference" and args.frame_sharing > 1:
            print(f"  losses not compared step by step: frame sharing draws one random shift per group "
                  f"(max relative difference {rel:.1e})")
        else:
            print(f"  max relative difference of the total loss over {len(a)} steps ({name} vs ours): {rel:.1e}")
    return figures


if __name__ == "__main__":
    main()

"""Policy step latency of the full-size GR-1 at evaluation: cached path vs GR1-Training's uncached path.

    python bench/bench_eval.py [--steps 5] [--threads 2] [key=value ...]

Both paths run in this process on the same weights (random, full size from configs.json unless overridden) and the
same stream of observations, with the history full (seq_len frames), CPU, fp32, batch 1. Prints the median latency
of each, their ratio (target >= 10x) and the largest difference between the actions they return.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import load_config  # noqa: E402
from data.preprocess import ImagePreprocessor  # noqa: E402
from evaluation.policy import GR1Policy  # noqa: E402
from models.build import build_model  # noqa: E402


def observation(rng: np.random.Generator) -> dict:
    return {"rgb_obs": {"rgb_static": rng.integers(0, 256, (200, 200, 3), dtype=np.uint8),
                        "rgb_gripper": rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)},
            "robot_obs": np.concatenate([rng.normal(size=14), [rng.choice([-1.0, 1.0])]])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per path (after the history is full)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(None, ["mae_ckpt=", "clip_ckpt=", "clip_precision=fp32", *args.overrides])
    device = torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random encoders: this measures speed, not skill
        encoders, gr1, _ = build_model(cfg, device, weights=None)
    gr1.eval()
    pre = ImagePreprocessor(cfg, device)
    policies = {"uncached (reference)": GR1Policy(cfg, encoders, gr1, pre, device, use_cache=False),
                "cached (ours)": GR1Policy(cfg, encoders, gr1, pre, device, use_cache=True)}
    instruction = "push the sliding door to the left side"
    rng = np.random.default_rng(0)
    stream = [observation(rng) for _ in range(cfg.seq_len - 1 + args.steps)]
    times: dict[str, list[float]] = {}
    actions: dict[str, list[np.ndarray]] = {}
    for name, policy in policies.items():
        policy.reset()
        times[name], actions[name] = [], []
        for i, obs in enumerate(stream):
            start = time.perf_counter()
            actions[name].append(policy.step(obs, instruction)["action"])
            if i >= cfg.seq_len - 1:  # history full
                times[name].append(time.perf_counter() - start)
    base, ours = (statistics.median(times[n]) for n in policies)
    diff = max(np.abs(a - b).max() for a, b in zip(*actions.values()))
    print(f"GR-1 policy step, full size, CPU fp32, batch 1, history {cfg.seq_len}, {args.threads} threads, "
          f"torch {torch.__version__}")
    for name in policies:
        print(f"  {name:22s} median {statistics.median(times[name]) * 1000:8.1f} ms  (min "
              f"{min(times[name]) * 1000:.1f}, max {max(times[name]) * 1000:.1f}, {len(times[name])} steps)")
    print(f"  speed-up {base / ours:.1f}x (target >= 10x)")
    print(f"  max |action difference| {diff:.2e} (target <= 1e-5)")


if __name__ == "__main__":
    main()

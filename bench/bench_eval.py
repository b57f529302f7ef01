"""Evaluation policy step of the full-size GR-1: the real GR1-Training evaluator vs our cached policy.

    python bench/bench_eval.py --reference_dir ../GR1-Training [--steps 8] [--threads 2] [--device cpu|cuda]
                               [key=value ...]

With --reference_dir (a local clone of EDiRobotics/GR1-Training, imported at run time, never committed) the
reference's GR1 is built as its Main.py builds it, with random full-size weights, and goes into our model through our
converter. Its evaluator, evaluation/calvin_evaluation.py's GR1CalvinEvaluation (tokenise the instruction, keep
seq_len frames, re-encode all of them and decode every step's frames at every step), and our evaluation/policy.py
(each new frame encoded once and its tokens kept, the instruction's embedding kept, only the queried step's action
queries run, no frames decoded) step through the same stream of observations in alternation, batch 1, fp32. The
first seq_len - 1 steps fill the history and are not timed. Prints every timed step, the medians, their ratio and
the largest difference between the actions the two return. Without --reference_dir only our own figures are printed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import real_reference as rr
from config import load_config
from data.preprocess import ImagePreprocessor
from evaluation.policy import GR1Policy
from facts import CAMERA_KEYS, CAMERA_SIZES
from models.build import build_model

INSTRUCTION = "push the sliding door to the left side"


def observation(rng: np.random.Generator) -> dict:
    return {"rgb_obs": {CAMERA_KEYS[cam]: rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                        for cam, size in CAMERA_SIZES.items()},
            "robot_obs": np.concatenate([rng.normal(size=14), [rng.choice([-1.0, 1.0])]])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=rr.STAND_IN_HELP)
    parser.add_argument("--reference_dir", default="", help="local clone of EDiRobotics/GR1-Training")
    parser.add_argument("--steps", type=int, default=8, help="timed steps (after the history is full)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--config", default=None, help="config file (default: configs.json, full size)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_config(args.config, ["mae_ckpt=", "clip_ckpt=", "clip_precision=auto", *args.overrides])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random encoders: this measures speed, not skill
        encoders, gr1, _ = build_model(cfg, device, weights=None)
    gr1.eval()
    policies, actions = {}, {}
    if args.reference_dir:
        ref, model, ref_pre = rr.reference_beside_ours(args.reference_dir, cfg, device, gr1, encoders)
        evaluator = ref.evaluation.GR1CalvinEvaluation(model.eval(), cfg.to_dict(), ref_pre, device)
        evaluator.reset()
        policies["reference"] = lambda obs: evaluator.step(obs, INSTRUCTION)["action_pred"][0].numpy()
    policy = GR1Policy(cfg, encoders, gr1, ImagePreprocessor(cfg, device), device, use_cache=True)
    policy.reset()
    policies["ours"] = lambda obs: policy.step(obs, INSTRUCTION)["action"]
    rng = np.random.default_rng(0)
    stream = [observation(rng) for _ in range(cfg.seq_len - 1 + args.steps)]

    def stepper(name):
        actions[name] = []
        return lambda r: actions[name].append(np.asarray(policies[name](stream[r]), dtype=np.float64))

    print(f"GR-1 policy step, {os.path.basename(args.config or 'configs.json')}, batch 1, history {cfg.seq_len}, fp32, "
          f"{rr.machine_line(device, args.threads)}")
    timings = rr.alternate({name: stepper(name) for name in policies}, len(stream), device, args.threads,
                           verbose=False)
    for t in timings.values():  # the history is filling: not timed
        del t.wall[:cfg.seq_len - 1], t.cpu_share[:cfg.seq_len - 1]
    for r in range(args.steps):
        print("    step " + str(r) + ": " + "  ".join(f"{name} {t.wall[r] * 1000:8.1f} ms (CPU share "
                                                      f"{t.cpu_share[r]:.2f})" for name, t in timings.items()))
    for name, t in timings.items():
        print(f"  {name:>9s}: median {t.median() * 1000:8.1f} ms (min {min(t.wall) * 1000:.1f}, max "
              f"{max(t.wall) * 1000:.1f}, {len(t.wall)} steps, CPU share {statistics.median(t.cpu_share):.2f})")
    if "reference" in timings:
        ratios = rr.paired_ratios(timings["reference"], timings["ours"])
        print(f"  speed-up ours vs reference: {timings['reference'].median() / timings['ours'].median():.1f}x "
              f"(ratio of medians), {statistics.median(ratios):.1f}x (median of per-step ratios)")
        diff = max(np.abs(a - b).max() for a, b in zip(actions["reference"], actions["ours"]))
        print(f"  max |action difference| over all {len(stream)} steps: {diff:.1e}")


if __name__ == "__main__":
    main()

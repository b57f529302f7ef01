"""What frame sharing costs in learning: the demo recipe trained with frame_sharing=1 and =4 for the same number of
samples, over several seeds, then validation losses and built-in-scene success rates with their spread.

    python bench/frame_sharing_study.py [--out frame_sharing_study] [--seeds 0 1 2] [--sharing 1 4]
                                        [--episodes 30] [--sequences 20] [--threads N] [--parallel N]

One recording and one LMDB (as scripts/demo.sh makes them: the scripted expert over the demo's five tasks, every
window annotated with the evaluation sentence) serve all runs. Each run trains configs/demo.json (6 epochs: each
window once per epoch whatever frame_sharing is, so every run sees the same number of samples) with its seed and
frame_sharing; then the whole validation split is scored with the final checkpoint (losses as training computes
them, no augmentation, independent windows) and the checkpoint is evaluated on the demo's built-in-scene chains.
Re-running skips what is done (results in OUT/results.json); the table at the end is the README's. Training times
are those of this machine at the time (contended if it is shared).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIG = os.path.join(ROOT, "configs", "demo.json")
TASKS = "turn_on_led,turn_off_led,push_red_block_left,push_red_block_right,lift_red_block_table"  # scripts/demo.sh


def run(cmd: list[str], log: str, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        raise SystemExit(f"error: {' '.join(cmd[:3])} ... failed (exit {proc.returncode}); see {log}")


def prepare_data(out: str, episodes: int, threads: int) -> str:
    demos, lmdb = os.path.join(out, "demos"), os.path.join(out, "lmdb")
    if not os.path.isfile(os.path.join(demos, "manifest.json")):
        print(f"recording {episodes} + 3 episodes ...", flush=True)
        run([sys.executable, "-m", "evaluation.builtin_env.record", "--output_dir", demos, "--episodes",
             str(episodes), "--val_episodes", "3", "--workers", "2", "--annotations", "validation", "--tasks", TASKS],
            os.path.join(out, "record.log"), threads)
    if not os.path.isfile(os.path.join(out, "lmdb.done")):
        print("converting ...", flush=True)
        run([sys.executable, "calvin2lmdb.py", "--input_dir", demos, "--output_dir", lmdb, "--no_progress"],
            os.path.join(out, "convert.log"), threads)
        open(os.path.join(out, "lmdb.done"), "w").close()
    return lmdb


def validation_losses(lmdb: str, ckpt: str, log: str, threads: int) -> dict[str, float]:
    """Mean losses over the whole validation split, computed in a child process (--validation_of)."""
    run([sys.executable, os.path.abspath(__file__), "--validation_of", ckpt, "--lmdb", lmdb], log, threads)
    with open(log) as f:
        return json.loads(f.read().strip().splitlines()[-1])


def score_validation(lmdb: str, ckpt: str) -> dict[str, float]:
    """Mean losses over the whole validation split (windows weighted equally, no augmentation)."""
    import torch
    from torch.utils.data import DataLoader

    from config import load_config
    from data.batch_ring import collate_batch
    from data.lmdb_dataset import make_datasets
    from data.preprocess import ImagePreprocessor
    from models.build import build_model
    from training.step import compute_losses
    cfg = load_config(CONFIG, [f"LMDB_path={lmdb}"])
    _, val = make_datasets(cfg)
    encoders, gr1, _ = build_model(cfg, "cpu", weights=ckpt)
    gr1.eval()
    pre = ImagePreprocessor(cfg)
    totals: dict[str, float] = {}
    with torch.no_grad():
        for batch in DataLoader(val, batch_size=64, collate_fn=collate_batch):
            n = len(batch["mask"])
            for k, v in compute_losses(gr1, encoders, pre, batch, cfg, train=False).items():
                totals[k] = totals.get(k, 0.0) + v.item() * n
    return {k: v / len(val) for k, v in totals.items()}


def one_run(out: str, lmdb: str, sharing: int, seed: int, sequences: int, threads: int) -> dict:
    name = f"g{sharing}_seed{seed}"
    run_dir = os.path.join(out, name)
    result_file = os.path.join(run_dir, "result.json")
    if os.path.isfile(result_file):
        with open(result_file) as f:
            return json.load(f)
    os.makedirs(run_dir, exist_ok=True)
    from config import load_config
    from models.files import checkpoint_path
    ckpt = checkpoint_path(run_dir, load_config(CONFIG).num_epochs)
    print(f"{name}: training ...", flush=True)
    start = time.perf_counter()
    if not os.path.isfile(ckpt):
        run([sys.executable, "Main.py", "--config", CONFIG, f"LMDB_path={lmdb}", f"save_path={run_dir}/",
             f"seed={seed}", f"frame_sharing={sharing}", "resume=true"], os.path.join(run_dir, "train.log"), threads)
    train_seconds = time.perf_counter() - start
    print(f"{name}: validation losses and evaluation ...", flush=True)
    val = validation_losses(lmdb, ckpt, os.path.join(run_dir, "validation.log"), threads)
    eval_dir = os.path.join(run_dir, "eval")
    run([sys.executable, "evaluate_calvin.py", "--config", CONFIG, f"ckpt_path={ckpt}", f"eval_dir={eval_dir}",
         f"num_sequences={sequences}", f"builtin_tasks={TASKS}"],
        os.path.join(run_dir, "eval.log"), threads)
    with open(os.path.join(eval_dir, "result.txt")) as f:
        summary = json.load(f)["null"]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        speeds = [json.loads(line)["samples_per_s"] for line in f]
    result = {"frame_sharing": sharing, "seed": seed, "val": val, "avg_seq_len": summary["avg_seq_len"],
              "chain_sr": summary["chain_sr"], "train_seconds": train_seconds,
              "samples_per_s": statistics.median(speeds)}
    with open(result_file, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{name}: val total {val['total']:.4f}, avg length {summary['avg_seq_len']:.2f}", flush=True)
    return result


def spread(values: list[float], fmt: str) -> str:
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:{fmt}} ± {sd:{fmt}}"


def table(results: list[dict]) -> str:
    lines = ["| frame_sharing | seeds | val total loss | val arm loss (x100) | val gripper loss | val static / gripper "
             "frame loss | avg length | 1/5 success | samples/s (training) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for g in sorted({r["frame_sharing"] for r in results}):
        rs = [r for r in results if r["frame_sharing"] == g]
        val = {k: [r["val"][k] for r in rs] for k in rs[0]["val"]}
        lines.append(
            f"| {g} | {', '.join(str(r['seed']) for r in rs)} | {spread(val['total'], '.3f')} | "
            f"{spread([100 * v for v in val['action_arm']], '.3f')} | {spread(val['action_gripper'], '.3f')} | "
            f"{spread(val['rgb_static'], '.3f')} / {spread(val['rgb_gripper'], '.3f')} | "
            f"{spread([r['avg_seq_len'] for r in rs], '.2f')} | "
            f"{spread([100 * r['chain_sr']['1'] for r in rs], '.0f')} % | "
            f"{spread([r['samples_per_s'] for r in rs], '.1f')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "frame_sharing_study"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sharing", type=int, nargs="+", default=[1, 4], help="frame_sharing values to train")
    parser.add_argument("--episodes", type=int, default=30, help="training episodes recorded (demo.sh: 30)")
    parser.add_argument("--sequences", type=int, default=20, help="evaluation chains per run (demo.sh: 20)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads per process")
    parser.add_argument("--parallel", type=int, default=1, help="runs trained at the same time")
    parser.add_argument("--validation_of", help=argparse.SUPPRESS)  # child process: score one checkpoint
    parser.add_argument("--lmdb", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.validation_of:
        print(json.dumps(score_validation(args.lmdb, args.validation_of)))
        return
    os.makedirs(args.out, exist_ok=True)
    lmdb = prepare_data(args.out, args.episodes, args.threads)
    runs = [(g, seed) for seed in args.seeds for g in args.sharing]
    with ThreadPoolExecutor(args.parallel) as pool:  # each run is a chain of child processes
        results = list(pool.map(lambda r: one_run(args.out, lmdb, r[0], r[1], args.sequences, args.threads), runs))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nconfigs/demo.json, {args.episodes} training episodes, {args.sequences} evaluation chains, mean ± "
          "standard deviation over seeds:\n")
    print(table(results))


if __name__ == "__main__":
    main()

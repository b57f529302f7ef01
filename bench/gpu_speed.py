"""The measuring steps of bench/gpu_check.sh (run by bench/gpu_steps.py, one process per step): training throughput
with and without compile_model, GR1-Training's real step beside ours, the data loader, the cached policy's latency,
and evaluation steps/s with N envs per process (built-in scene; calvin_env rendering with EGL on the GPU).

Full size (configs.json, random weights) and bf16 for training, as Main.py trains on a GPU; the policy in fp32, as
evaluate_calvin.py runs it. A dry run uses configs/tiny.json, batch 2, a few steps and N = 1, 2 envs.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from bench.gpu_steps import ROOT, TINY, SkipStepError, StepResult, cores, model_config, prepare_lmdb, step_device

TRAIN_BATCHES, EVAL_ENVS, POLICY_BATCHES = (8, 16, 32), (1, 4, 8, 16), (1, 8, 16)
REFERENCE_BATCH = 16  # the README's GPU row
LOADER_BATCH, LOADER_SECONDS = 16, 12.0


def _peak_gib(device) -> float:
    """torch.cuda.max_memory_allocated since the last reset on CUDA; the process's peak RSS on the CPU."""
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ---------------------------------------------------------------- training throughput

def _train_row(cfg, model, encoders, pre, optimizer, batch: int, rounds: int, compiled: bool, device) -> dict:
    """`rounds` optimiser steps at `batch` (round 0: warm-up, and compilation with compile_model) -> one row."""
    import torch

    from bench import bench_train as bt
    from bench import real_reference as rr
    from training.step import compute_losses
    pair = [bt.synthetic_batch(cfg, batch, 100 + r, 1, device) for r in range(2)]  # two resident, as the prefetcher
    losses: list = []
    step = bt.step_fn(lambda b: compute_losses(model, encoders, pre, b, cfg, train=True), optimizer,
                      [pair[r % 2] for r in range(rounds)], range(rounds), bt.autocast_for("bf16", device), losses)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    wall = rr.alternate({"ours": step}, rounds, device, torch.get_num_threads(), verbose=False)["ours"].wall
    median = statistics.median(wall[1:])
    return {"batch": batch, "compile_model": compiled, "samples_per_s": round(batch / median, 2),
            "step_ms": round(1000 * median, 1), "first_step_s": round(wall[0], 2),
            "peak_memory_gib": round(_peak_gib(device), 2),
            "losses_finite": bool(torch.isfinite(torch.stack(losses)).all())}


def _train(opts, result: StepResult, compiled: bool) -> None:
    import torch

    from bench import bench_train as bt
    from config import load_config
    from data.preprocess import ImagePreprocessor
    from training.step import make_optimizer
    device = step_device(opts)
    cfg = load_config(model_config(opts), ["mae_ckpt=", "clip_ckpt=", "clip_precision=auto", "dropout=0.0"])
    encoders, gr1 = bt.build_ours(cfg, device)
    # compile_model as Main.py (inductor); a dry run traces with aot_eager: inductor's C++ code generation for the
    # CPU takes over 5 minutes on 2 cores, and the GPU run is what measures it
    backend = "aot_eager" if opts.dry_run else "inductor"
    model = torch.compile(gr1, backend=backend) if compiled else gr1
    pre, optimizer = ImagePreprocessor(cfg, device), make_optimizer(model, cfg, device)
    memory = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "the process's peak RSS (CPU)"
    result.note(f"{os.path.basename(model_config(opts))}, bf16 autocast, random weights, synthetic batches; peak "
                f"memory: {memory} over the batch's steps (weights, AdamW state, two batches, activations)")
    for batch in (2,) if opts.dry_run else TRAIN_BATCHES:
        try:
            row = _train_row(cfg, model, encoders, pre, optimizer, batch, 3 if opts.dry_run else 6, compiled, device)
            result.row(**row, **({"compile_backend": backend} if compiled else {}))
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            result.row(batch=batch, compile_model=compiled, error="CUDA out of memory")
    if not all(row.get("losses_finite", True) for row in result.data["rows"]):
        result.finish("failed", "a non-finite loss (see the rows)")


def train(opts, result: StepResult) -> None:
    """Training samples/s and peak memory, full size, bf16, batch 8, 16 and 32."""
    _train(opts, result, compiled=False)


def train_compile(opts, result: StepResult) -> None:
    """The same with torch.compile (compile_model=true)."""
    _train(opts, result, compiled=True)


def train_reference(opts, result: StepResult) -> None:
    """bench_train.py --reference_dir: GR1-Training's real step and ours on the same weights, bf16."""
    import importlib.util
    if not opts.reference_dir:
        raise SkipStepError("no --reference_dir given (a GR1-Training clone, carried beside the check)")
    if not os.path.isfile(os.path.join(opts.reference_dir, "models", "gr1.py")):
        raise SkipStepError(f"{opts.reference_dir} is not a GR1-Training clone (no models/gr1.py)")
    for name in ("flamingo_pytorch", "einops", "einops_exts"):  # requirements-bench.txt
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(name=name)
    device = step_device(opts)
    batch, out = 2 if opts.dry_run else REFERENCE_BATCH, os.path.join(opts.work, "reference.json")
    cmd = [sys.executable, os.path.join("bench", "bench_train.py"), "--reference_dir", opts.reference_dir,
           "--device", device.type, "--precision", "bf16", "--batch", str(batch), "--rounds",
           "3" if opts.dry_run else "6", "--json", out] + (["--config", TINY] if opts.dry_run else [])
    print(" ".join(cmd), flush=True)
    code = subprocess.run(cmd, cwd=ROOT).returncode
    if code != 0:
        return result.finish("failed", f"bench_train.py exited with {code} (see the log)")
    with open(out) as f:
        figures = json.load(f)
    for name, path in figures["paths"].items():
        result.row(batch=batch, path=name, samples_per_s=round(path["samples_per_s"], 2),
                   step_ms=round(1000 * path["median_step_s"], 1))
    for label, c in figures["comparisons"].items():
        result.note(f"speed-up {label}: {c['speed_up']:.2f}x (median of per-round ratios "
                    f"{c['median_round_ratio']:.2f}x); largest relative difference of the total loss "
                    f"{c['max_rel_loss_diff']:.1e}")


# ---------------------------------------------------------------- data

def data(opts, result: StepResult) -> None:
    """Main.py's training loader (make_loader, workers = cores, pinned memory, DevicePrefetcher onto the GPU):
    samples/s after each worker's first batch."""
    from bench import real_reference as rr
    from config import load_config
    from data.lmdb_dataset import make_datasets
    from data.loader import DevicePrefetcher, make_loader
    device = step_device(opts)
    lmdb = prepare_lmdb(opts, result)
    workers, batch = cores(), 2 if opts.dry_run else LOADER_BATCH
    cfg = load_config(model_config(opts), [f"LMDB_path={lmdb}", f"workers_per_gpu={workers}", f"bs_per_gpu={batch}"])
    train_set, _ = make_datasets(cfg)
    loader = make_loader(train_set, cfg, 0, 1, True, pin_memory=device.type == "cuda")

    def batches():
        for epoch in range(1 << 30):
            loader.sampler.set_epoch(epoch)
            yield from DevicePrefetcher(loader, device)

    stream = batches()
    for _ in range(workers):
        next(stream)  # each worker's first batch: start-up is not the steady state
    rr.synchronize(device)
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < (3.0 if opts.dry_run else LOADER_SECONDS):
        count += len(next(stream)["mask"])
    rr.synchronize(device)
    rate = count / (time.perf_counter() - start)
    result.row(workers=workers, batch=batch, seq_len=cfg.seq_len, samples_per_s=round(rate, 1),
               pinned=device.type == "cuda", device=device.type, windows=len(train_set))


# ---------------------------------------------------------------- evaluation

def eval_policy(opts, result: StepResult) -> None:
    """The cached policy (GR1BatchPolicy, as evaluate_calvin.py serves its envs) on the GPU, fp32: time per query
    with a full history at batch 1 and batched over 8 and 16 envs."""
    import numpy as np

    from bench import real_reference as rr
    from bench.bench_eval import INSTRUCTION, observation
    from bench.bench_eval_envs import gr1_policy
    device = step_device(opts)
    policy = gr1_policy(model_config(opts), device)
    history, steps, rng = policy.cfg.seq_len, 3 if opts.dry_run else 10, np.random.default_rng(0)
    for n in (1, 2) if opts.dry_run else POLICY_BATCHES:
        for env in range(n):
            policy.reset(env)
        walls = []
        for t in range(history - 1 + steps):
            requests = {env: (observation(rng), INSTRUCTION) for env in range(n)}
            rr.synchronize(device)
            start = time.perf_counter()
            policy.act(requests)
            rr.synchronize(device)
            if t >= history - 1:  # the history is full
                walls.append(time.perf_counter() - start)
        query = statistics.median(walls)
        result.row(envs=n, query_ms=round(1000 * query, 2), env_steps_per_s=round(n / query, 1), history=history,
                   test_chunk_size=policy.cfg.test_chunk_size)


def _env_rows(opts, result: StepResult, backend: str, envs: tuple[int, ...], steps: int) -> list[dict]:
    """bench_eval_envs.py's rows: env only (the ceiling) and GR-1 served with batched queries, for each N."""
    from bench import bench_eval_envs as bee
    device = step_device(opts)
    name, path = ("tiny GR-1", TINY) if opts.dry_run else ("full GR-1", model_config(opts))
    policies = {"env only": "zero", name: bee.gr1_policy(path, device)}
    rows = []
    for n in envs:
        ceiling = None
        for label, policy in policies.items():
            row = bee.measure(backend, n, policy, steps, device)
            ceiling = ceiling or row["steps_per_s"]
            rows.append({"backend": backend, "envs": n, "policy": label, "steps_per_s": round(row["steps_per_s"], 1),
                         "x_ceiling": round(row["steps_per_s"] / ceiling, 2),
                         "policy_pct": round(100 * row["policy_share"], 1), "mean_batch": row.get("batch"),
                         "ms_per_query": row.get("ms_per_query"), "renderer": ", ".join(row["renderer"])})
            result.row(**rows[-1])
    return rows


def eval_envs(opts, result: StepResult) -> None:
    """Built-in-scene evaluation steps/s with N = 1, 4, 8, 16 env workers in one process."""
    _env_rows(opts, result, "builtin", (1, 2) if opts.dry_run else EVAL_ENVS, 5 if opts.dry_run else 30)


def calvin_egl(opts, result: StepResult) -> None:
    """calvin_env's workers rendering with EGL on the process's GPU: steps/s with 8 envs (a calvin_env takes seconds
    to build: one N fits the budget) and the OpenGL renderer they report."""
    from evaluation.calvin_env import calvin_env_available, software_renderer
    if not calvin_env_available():
        raise SkipStepError("calvin_env is not importable (bench/gpu_check.sh --calvin_env DIR puts a clone on the "
                            "path; its dependencies come with --wheels)")
    rows = _env_rows(opts, result, "calvin", (1,) if opts.dry_run else (8,), 5 if opts.dry_run else 20)
    soft = sorted({r["renderer"] for r in rows if software_renderer(r["renderer"])})
    if soft and step_device(opts).type == "cuda":
        result.finish("failed", f"calvin_env rendered with {soft[0]!r}, not EGL on the GPU")
    elif soft:
        result.note("rendered with the software renderer: there is no GPU (dry run)")


STEPS = {"train": train, "train_compile": train_compile, "train_reference": train_reference, "data": data,
         "eval_policy": eval_policy, "eval_envs": eval_envs, "calvin_egl": calvin_egl}

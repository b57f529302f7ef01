"""Evaluation wiring shared by evaluate_calvin.py and Main.py (evaluate_during_training): the backend's sequence
list and instructions, the policy, this process's env workers (evaluation/pool.py), the sharded protocol across
accelerate processes (evaluation/protocol.py) and the run's identity, which resume checks."""
from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from config import Config, save_config
from evaluation.backends import (
    WORKER_POLICIES,
    ExpertPolicy,
    ZeroPolicy,
    builtin_tasks,
    env_spec,
    evaluation_sequences,
    sequence_slice,
    validation_instructions,
)
from evaluation.interfaces import BatchPolicy
from evaluation.pool import EnvPool, EvalWorkerError, available_cores
from evaluation.protocol import check_resume, format_summary, run_sharded

__all__ = ["EvalWorkerError", "ExpertPolicy", "ZeroPolicy", "evaluate", "evaluate_during_training",
           "make_policy", "run_identity"]


def make_policy(cfg: Config, encoders=None, gr1=None, device=None) -> BatchPolicy | str:
    """GR-1 served by this process in batches, or the name of a baseline that runs inside the env workers."""
    if cfg.eval_policy in WORKER_POLICIES:
        return cfg.eval_policy
    from data.preprocess import ImagePreprocessor
    from evaluation.policy import GR1BatchPolicy
    return GR1BatchPolicy(cfg, encoders, gr1, ImagePreprocessor(cfg, device), device,
                          use_cache=cfg.eval_feature_cache, record_video=cfg.record_evaluation_video)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def run_identity(cfg: Config, weights: str | None = None) -> dict[str, Any]:
    """What decides an evaluation's results: recorded in its running files, and resume=true refuses files whose
    identity differs (a run mixed from two policies or sequence lists would report a number nobody measured)."""
    identity: dict[str, Any] = {
        "eval_policy": cfg.eval_policy, "eval_backend": cfg.eval_backend, "num_sequences": cfg.num_sequences,
        "sequences": list(sequence_slice(cfg)), "ep_len": cfg.ep_len}
    if cfg.eval_backend == "builtin":
        identity.update(builtin_tasks=",".join(builtin_tasks(cfg)), seed=cfg.seed)
    else:  # the built-in scene always resets deterministically
        identity.update(calvin_dataset_path=cfg.calvin_dataset_path, eval_reset=cfg.eval_reset)
    if cfg.eval_policy == "gr1":
        identity.update(checkpoint=f"sha256:{file_sha256(weights)}" if weights else "the model in memory",
                        test_chunk_size=cfg.test_chunk_size)
    return identity


def warn_if_software_renderer(cfg: Config, renderers: list[str], cuda: bool) -> bool:
    """Warn (once per process) when calvin_env renders on the CPU although a GPU is there; True if it warned."""
    from evaluation.calvin_env import SOFTWARE_RENDERER_HELP, software_renderer
    soft = sorted({r for r in renderers if software_renderer(r)})
    if cfg.eval_backend != "calvin" or not cuda or not soft:
        return False
    warnings.warn(SOFTWARE_RENDERER_HELP.format(renderer=soft[0]), RuntimeWarning, stacklevel=2)
    return True


@contextlib.contextmanager
def policy_threads(device: torch.device, n_envs: int) -> Iterator[None]:
    """On CPU, the policy's torch threads share the cores with the env workers: the policy gets the cores the envs
    leave, at least one. OpenMP threads that do not get a core of their own wait for each other at every operation:
    measured on a busy 2-core machine, a demo GR-1 step took 13 ms on 1 thread and 480-740 ms on 2 (full size: 3.0-3.6
    s and 6.5-6.7 s); an idle machine gains at most 2x from the second thread. Restored afterwards (training goes
    on)."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(max(1, available_cores() - n_envs))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def evaluate(cfg: Config, encoders, gr1, accelerator, out_dir: str, weights: str | None = None) -> dict | None:
    """Run the protocol on every process (each its own shard, on eval_envs_per_process env workers) and write
    merged results (and config.json) on the main process. `weights` is the checkpoint file (recorded for resume)."""
    from accelerate.utils import gather_object
    device = accelerator.device
    sequences = evaluation_sequences(cfg)
    instructions = validation_instructions(cfg.eval_backend)
    identity = run_identity(cfg, weights)
    if cfg.resume:
        check_resume(out_dir, identity)  # before anything is written or started
    if accelerator.is_main_process:
        save_config(cfg, os.path.join(out_dir, "config.json"))
    policy = make_policy(cfg, encoders, gr1, device)
    gather = gather_object if accelerator.num_processes > 1 else (lambda x: x)
    if cfg.eval_backend == "calvin":
        from evaluation.calvin_env import set_egl_device
        set_egl_device(device)  # the env workers inherit EGL_VISIBLE_DEVICES: they render on this process's GPU
    video_dir = os.path.join(out_dir, "videos") if cfg.record_evaluation_video else None
    n_envs = cfg.eval_envs_per_process
    with policy_threads(device, n_envs), EnvPool(n_envs, env_spec(cfg), policy, instructions, cfg.ep_len,
                                                 video_dir, policy_on_cpu=device.type == "cpu") as pool:
        warn_if_software_renderer(cfg, pool.renderers, torch.cuda.is_available())
        summary = run_sharded(pool.evaluate, sequences, out_dir, accelerator.process_index,
                              accelerator.num_processes, gather, resume=cfg.resume, progress=True,
                              identity=identity, envs_per_process=n_envs)
    if summary is not None:
        accelerator.print(format_summary(summary))
        accelerator.print(f"results in {out_dir}")
    return summary


def evaluate_during_training(cfg: Config, encoders, gr1, accelerator, epoch: int) -> dict | None:
    out_dir = os.path.join(cfg.save_path, "eval", f"epoch_{epoch + cfg.load_epoch}")
    with torch.no_grad():
        return evaluate(cfg.replace(resume=False), encoders, gr1, accelerator, out_dir)

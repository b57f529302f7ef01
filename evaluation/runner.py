"""Evaluation wiring shared by evaluate_calvin.py and Main.py (evaluate_during_training): backend (environment,
task oracle, sequences, instructions), policy, sharded protocol run across accelerate processes."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from config import Config, ConfigError
from evaluation.interfaces import EvalEnv, EvalPolicy, TaskOracle
from evaluation.protocol import EvalSequence, format_summary, run_protocol

POLICIES = ("gr1", "zero", "expert")


@dataclass
class Backend:
    env: EvalEnv
    oracle: TaskOracle
    sequences: list[EvalSequence]
    instructions: dict[str, str]


def make_backend(cfg: Config, device: torch.device) -> Backend:
    """The environment named by cfg.eval_backend with its oracle, the sequences (get_sequences(num_sequences) from
    position eval_sequence_start, as GR1-Training draws them) and one validation instruction per task."""
    first, n = cfg.eval_sequence_start, cfg.num_sequences
    if first >= n:
        raise ConfigError(f"eval_sequence_start ({first}) must be smaller than num_sequences ({n})")
    if cfg.eval_backend == "calvin":
        from evaluation.calvin_env import make_calvin_env, make_calvin_oracle
        from evaluation.sequences import load_validation_instructions, official_sequences
        seqs = [EvalSequence(s["index"], list(s["tasks"]), np.asarray(s["robot_obs"]), np.asarray(s["scene_obs"]),
                             dict(s["condition"])) for s in official_sequences(n, start=first)]
        return Backend(make_calvin_env(cfg.calvin_dataset_path, device), make_calvin_oracle(), seqs,
                       load_validation_instructions())
    from evaluation.builtin_env.env import BuiltinEnv
    from evaluation.builtin_env.sequences import get_sequences
    from evaluation.builtin_env.tasks import TASK_NAMES, BuiltinTaskOracle, validation_annotations
    tasks_used = tuple(t.strip() for t in cfg.builtin_tasks.split(",") if t.strip()) or TASK_NAMES
    seqs = [EvalSequence(i, list(tasks), state["robot_obs"], state["scene_obs"])
            for i, (state, tasks) in enumerate(get_sequences(n, seed=cfg.seed, tasks=tasks_used))][first:]
    return Backend(BuiltinEnv(seed=cfg.seed), BuiltinTaskOracle(),
                   seqs, {task: sentences[0] for task, sentences in validation_annotations().items()})


class ZeroPolicy:
    """Baseline: never moves (gripper open)."""

    def reset(self) -> None:
        pass

    def step(self, obs: dict, instruction: str) -> dict[str, Any]:
        return {"action": np.array([0, 0, 0, 0, 0, 0, 1.0])}


class ExpertPolicy:
    """Upper bound in the built-in scene: its scripted expert, which reads privileged state."""

    def __init__(self, env, instructions: dict[str, str]):
        from evaluation.builtin_env.expert import ScriptedExpert
        self._make = ScriptedExpert
        self.env, self.task_of = env, {sentence: task for task, sentence in instructions.items()}
        self.expert = None

    def reset(self) -> None:
        self.expert = None

    def step(self, obs: dict, instruction: str) -> dict[str, Any]:
        if self.expert is None:
            self.expert = self._make(self.env, self.task_of[instruction])
        return {"action": self.expert.act()}


def make_policy(cfg: Config, backend: Backend, encoders=None, gr1=None, device=None) -> EvalPolicy:
    if cfg.eval_policy == "zero":
        return ZeroPolicy()
    if cfg.eval_policy == "expert":
        if cfg.eval_backend != "builtin":
            raise ValueError("eval_policy=expert exists only in the built-in scene (eval_backend=builtin)")
        return ExpertPolicy(backend.env, backend.instructions)
    from data.preprocess import ImagePreprocessor
    from evaluation.policy import GR1Policy
    return GR1Policy(cfg, encoders, gr1, ImagePreprocessor(cfg, device), device, use_cache=cfg.eval_feature_cache,
                     record_video=cfg.record_evaluation_video)


def evaluate(cfg: Config, encoders, gr1, accelerator, out_dir: str) -> dict | None:
    """Run the protocol on every process (each its own shard) and write merged results on the main process."""
    from accelerate.utils import gather_object
    device = accelerator.device
    backend = make_backend(cfg, device)
    policy = make_policy(cfg, backend, encoders, gr1, device)
    gather = gather_object if accelerator.num_processes > 1 else (lambda x: x)
    try:
        summary = run_protocol(backend.env, backend.oracle, policy, backend.sequences, backend.instructions,
                               cfg.ep_len, out_dir, accelerator.process_index, accelerator.num_processes, gather,
                               record_video=cfg.record_evaluation_video, resume=cfg.resume,
                               progress=True)
    finally:
        close = getattr(backend.env, "close", None)
        if close:
            close()
    if summary is not None:
        accelerator.print(format_summary(summary))
        accelerator.print(f"results in {out_dir}")
    return summary


def evaluate_during_training(cfg: Config, encoders, gr1, accelerator, epoch: int) -> dict | None:
    out_dir = os.path.join(cfg.save_path, "eval", f"epoch_{epoch + cfg.load_epoch}")
    with torch.no_grad():
        return evaluate(cfg.replace(resume=False), encoders, gr1, accelerator, out_dir)

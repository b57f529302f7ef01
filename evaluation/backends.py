"""The evaluation backends without torch: what env worker processes build (env, task oracle, baseline policies) and
what the main process evaluates (the sequence list and the instruction per task).

Backends: 'builtin' (the pybullet scene shipped in evaluation/builtin_env, always deterministic: its reset rebuilds
the world) and 'calvin' (the real CALVIN simulator through evaluation/calvin_env.py). An `EnvSpec` is plain JSON, so
it travels to env worker processes as is.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from config import Config
from evaluation.interfaces import EvalEnv, EvalPolicy, TaskOracle
from evaluation.protocol import EvalSequence

WORKER_POLICIES = ("zero", "expert")  # baselines that run inside the env workers (the expert reads the simulator)


@dataclass(frozen=True)
class EnvSpec:
    """Everything an env worker needs to build its env and oracle."""

    backend: str = "builtin"  # 'builtin' or 'calvin'
    seed: int = 0  # built-in scene: random layouts of reset(scene_obs=None) (evaluation always passes scene_obs)
    calvin_dataset_path: str = ""  # calvin: CALVIN split folder with the rendering config ('' = shipped scene D)
    reset: str = "deterministic"  # calvin: 'deterministic' or 'reference' (calvin_env's plain reset)
    render: bool = True  # built-in scene: False skips the cameras (state-only tests)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def env_spec(cfg: Config) -> EnvSpec:
    return EnvSpec(cfg.eval_backend, cfg.seed, cfg.calvin_dataset_path, cfg.eval_reset)


def make_env(spec: EnvSpec) -> EvalEnv:
    """The env of a spec. calvin_env renders on the GPU that EGL_VISIBLE_DEVICES names (the accelerate process sets
    it for its workers with calvin_env.set_egl_device), else on EGL's default renderer."""
    if spec.backend == "calvin":
        from evaluation.calvin_env import make_calvin_env
        return make_calvin_env(spec.calvin_dataset_path, "cpu", spec.reset)
    from evaluation.builtin_env.env import BuiltinEnv
    return BuiltinEnv(seed=spec.seed, render=spec.render)


def make_oracle(spec: EnvSpec) -> TaskOracle:
    if spec.backend == "calvin":
        from evaluation.calvin_env import make_calvin_oracle
        return make_calvin_oracle()
    from evaluation.builtin_env.tasks import BuiltinTaskOracle
    return BuiltinTaskOracle()


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


def make_worker_policy(name: str, env: EvalEnv, instructions: dict[str, str]) -> EvalPolicy:
    """A baseline policy that runs beside its env (in the env's process)."""
    if name == "zero":
        return ZeroPolicy()
    if name == "expert":
        return ExpertPolicy(env, instructions)
    raise ValueError(f"unknown in-worker policy {name!r}; expected one of {WORKER_POLICIES}")


def sequence_slice(cfg: Config) -> tuple[int, int]:
    """[start, stop) of get_sequences(num_sequences) that cfg evaluates (eval_sequence_start, eval_sequence_count;
    config.py checks that it lies inside the list)."""
    start = cfg.eval_sequence_start
    return start, cfg.num_sequences if cfg.eval_sequence_count == 0 else start + cfg.eval_sequence_count


def builtin_tasks(cfg: Config) -> tuple[str, ...]:
    from evaluation.builtin_env.tasks import TASK_NAMES
    return tuple(t.strip() for t in cfg.builtin_tasks.split(",") if t.strip()) or TASK_NAMES


def evaluation_sequences(cfg: Config) -> list[EvalSequence]:
    """The slice [start, stop) of the backend's get_sequences(num_sequences) (as GR1-Training draws them); each
    sequence keeps its index in the whole list."""
    start, stop = sequence_slice(cfg)
    if cfg.eval_backend == "calvin":
        from evaluation.sequences import official_sequences
        return [EvalSequence(s["index"], list(s["tasks"]), np.asarray(s["robot_obs"]), np.asarray(s["scene_obs"]),
                             dict(s["condition"])) for s in official_sequences(cfg.num_sequences, start, stop - start)]
    from evaluation.builtin_env.sequences import get_sequences
    drawn = get_sequences(cfg.num_sequences, seed=cfg.seed, tasks=builtin_tasks(cfg))
    return [EvalSequence(i, list(tasks), state["robot_obs"], state["scene_obs"])
            for i, (state, tasks) in enumerate(drawn)][start:stop]


def validation_instructions(backend: str) -> dict[str, str]:
    """The instruction the evaluation gives for each task (CALVIN's validation sentence)."""
    if backend == "calvin":
        from evaluation.sequences import load_validation_instructions
        return load_validation_instructions()
    from evaluation.builtin_env.tasks import validation_annotations
    return {task: sentences[0] for task, sentences in validation_annotations().items()}

"""The small interfaces the evaluation protocol is written against (structural typing, nothing to inherit).

Both environment backends (the real CALVIN simulator in evaluation/calvin_env.py and the built-in pybullet scene in
evaluation/builtin_env/) speak calvin_env's interface, and the GR-1 policy (evaluation/policy.py) speaks the policy
interfaces (one env: EvalPolicy; many envs with batched queries: BatchPolicy), so evaluation/protocol.py and
evaluation/pool.py never need to know which one they drive.

Observation dict (calvin_env's, raw): {'rgb_obs': {'rgb_static': uint8 (200, 200, 3), 'rgb_gripper': uint8 (84, 84, 3)},
'robot_obs': float64 (15,), 'scene_obs': float64 (24,) or the scene's own length, ...}.
Action: float (7,) relative action — x, y, z (x 0.02 m), Euler x, y, z (x 0.05 rad), gripper (> 0 open, else close).
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class EvalEnv(Protocol):
    def reset(self, robot_obs: np.ndarray | None = None, scene_obs: np.ndarray | None = None) -> dict: ...

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, dict]: ...

    def get_obs(self) -> dict: ...

    def get_info(self) -> dict: ...


class TaskOracle(Protocol):
    def get_task_info_for_set(self, start_info: dict, end_info: dict, tasks: set[str]) -> set[str]:
        """The subset of `tasks` achieved between the two infos."""
        ...


class EvalPolicy(Protocol):
    def reset(self) -> None:
        """Forget the history (called at the start of every subtask)."""
        ...

    def step(self, obs: dict, instruction: str) -> dict[str, Any]:
        """{'action': float (7,) np.ndarray} plus, when the policy records videos, 'rgb_static_pred' uint8 (S, S, 3)
        and 'rgb_gripper_pred' uint8 (S, S, 3): its prediction of the frame skip_frame steps ahead."""
        ...


class BatchPolicy(Protocol):
    """A policy serving many envs at once (evaluation/pool.py): per-env state, batched queries."""

    def reset(self, env_id: int) -> None:
        """Forget env_id's history (the start of a subtask there)."""
        ...

    def act(self, requests: dict[int, tuple[dict, str]]) -> dict[int, dict[str, Any]]:
        """{env_id: (observation, instruction)} -> {env_id: EvalPolicy.step's output} for every env in requests."""
        ...

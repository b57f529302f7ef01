"""Initial states and 5-task evaluation chains of the built-in scene (the role of CALVIN's multistep_sequences.py).

Symbolic world (the rule every chain obeys, like CALVIN's condition -> effect rules):
    led        0 or 1
    columns    per cube (red, blue, pink) -1, 0 or +1: which of the three x columns of its lane it stands in
    grasped    no cube, or the cube last lifted
    push_<c>_block_left   needs column(c) > -1 and nothing grasped; column(c) -= 1
    push_<c>_block_right  needs column(c) < +1 and nothing grasped; column(c) += 1
    lift_<c>_block_table  needs nothing grasped; grasps c (there is no place task, so a lift can only end a chain)
    turn_on_led / turn_off_led  need led 0 / 1 and nothing grasped; set led 1 / 0
A chain has distinct tasks (CALVIN never repeats one). Its tasks are drawn one at a time, each uniformly among the
allowed, not yet used tasks applicable in the current symbolic state; a dead end restarts the chain.
Initial conditions: led x columns = 2 x 27 = 54; each sequence draws one uniformly. The physical state puts each
cube at its column's x with a small random offset and yaw (MODEST randomisation, for learnability); the robot
always starts at home (HOME_ROBOT_OBS), as CALVIN's evaluation does.
Everything is drawn from one numpy Generator seeded by `seed`, so the list is the same on every machine.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np

from evaluation.builtin_env import scene as sc
from evaluation.builtin_env.tasks import TASK_NAMES, TASKS
from facts import CHAIN_LENGTH

POS_JITTER_X = 0.02  # m, uniform +- around the column's x
POS_JITTER_Y = 0.01  # m, uniform +- around the lane's y
YAW_JITTER = 0.25  # rad, uniform +- (a cube looks the same every 90 degrees)
_MAX_CHAIN_TRIES = 1000


@dataclass(frozen=True)
class Condition:
    """A symbolic state."""

    led: int
    columns: tuple[int, int, int]  # per cube, in scene.BLOCK_NAMES order
    grasped: str | None = None


INITIAL_CONDITIONS: tuple[Condition, ...] = tuple(
    Condition(led, columns) for led in (0, 1) for columns in itertools.product((-1, 0, 1), repeat=3))


def apply_task(state: Condition, task: str) -> Condition | None:
    """The state after `task`, or None where the task is not applicable."""
    spec = TASKS[task]
    if state.grasped is not None:
        return None
    if spec.kind == "led":
        return replace(state, led=spec.direction) if state.led == 1 - spec.direction else None
    index = sc.BLOCK_NAMES.index(spec.block)
    if spec.kind == "lift":
        return replace(state, grasped=spec.block)
    column = state.columns[index] + spec.direction
    if abs(column) > 1:
        return None
    columns = list(state.columns)
    columns[index] = column
    return replace(state, columns=tuple(columns))


def is_valid_chain(condition: Condition, tasks: list[str]) -> bool:
    state: Condition | None = condition
    for task in tasks:
        state = apply_task(state, task)
        if state is None:
            return False
    return len(set(tasks)) == len(tasks)


def sample_chain(rng: np.random.Generator, condition: Condition, length: int = CHAIN_LENGTH,
                 allowed: tuple[str, ...] = TASK_NAMES) -> list[str]:
    """A valid chain of `length` distinct tasks from `allowed`, starting in `condition` (see the module rule)."""
    for _ in range(_MAX_CHAIN_TRIES):
        state, chain = condition, []
        while len(chain) < length:
            options = [t for t in allowed if t not in chain and apply_task(state, t) is not None]
            if not options:
                break
            task = options[int(rng.integers(len(options)))]
            chain.append(task)
            state = apply_task(state, task)
        if len(chain) == length:
            return chain
    raise ValueError(f"no chain of {length} distinct tasks from {list(allowed)} starting in {condition}")


def scene_obs_for(condition: Condition, rng: np.random.Generator) -> np.ndarray:
    """(24,) scene_obs realising a symbolic condition (cubes resting on the table, button up)."""
    if condition.grasped is not None:
        raise ValueError("an initial condition cannot have a grasped cube")
    scene_obs = np.zeros(sc.SCENE_OBS_SIZE, dtype=np.float64)
    scene_obs[sc.SCENE_OBS_LED] = float(condition.led)
    for i, (name, column) in enumerate(zip(sc.BLOCK_NAMES, condition.columns)):
        x = sc.BLOCK_COLUMN_X[column + 1] + rng.uniform(-POS_JITTER_X, POS_JITTER_X)
        y = sc.BLOCK_LANE_Y[name] + rng.uniform(-POS_JITTER_Y, POS_JITTER_Y)
        yaw = rng.uniform(-YAW_JITTER, YAW_JITTER)
        scene_obs[sc.block_slice(i)] = (x, y, sc.BLOCK_REST_Z, 0.0, 0.0, yaw)
    return scene_obs


def random_condition(rng: np.random.Generator) -> Condition:
    return INITIAL_CONDITIONS[int(rng.integers(len(INITIAL_CONDITIONS)))]


def random_scene_obs(rng: np.random.Generator) -> np.ndarray:
    return scene_obs_for(random_condition(rng), rng)


def get_sequences(num_sequences: int, seed: int = 0, tasks: tuple[str, ...] = TASK_NAMES,
                  length: int = CHAIN_LENGTH) -> list[tuple[dict[str, np.ndarray], list[str]]]:
    """[(initial_state {'robot_obs': (15,), 'scene_obs': (24,)}, [length task names]), ...] for the protocol:
    deterministic given (num_sequences, seed, tasks, length); a longer list starts with the shorter one."""
    unknown = set(tasks) - set(TASK_NAMES)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; the built-in scene has {list(TASK_NAMES)}")
    rng = np.random.default_rng(seed)
    sequences = []
    for _ in range(num_sequences):
        condition = random_condition(rng)
        chain = sample_chain(rng, condition, length, tuple(tasks))
        state = {"robot_obs": sc.HOME_ROBOT_OBS.copy(), "scene_obs": scene_obs_for(condition, rng)}
        sequences.append((state, chain))
    return sequences

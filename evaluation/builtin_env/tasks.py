"""Tasks of the built-in scene: names (CALVIN's), instructions, and the task oracle (evaluation/interfaces.py
TaskOracle) with CALVIN's checks (calvin_env Tasks, conf/tasks/new_playtable_tasks.yaml) on this scene's info dicts.

Checks between start_info and end_info (CALVIN's):
- push_<colour>_block_right / _left: the cube moved > 0.1 m in +x / -x; it touched something other than the robot
  at the start and at the end, and its non-robot (body, link) contacts at the start are a subset of those at the end.
- lift_<colour>_block_table: the cube rose > 0.05 m; at the end it touches the robot and nothing else; at the start
  it touched the table top.
- turn_on_led / turn_off_led: the LED's logical state was 0 / 1 at the start and is 1 / 0 at the end.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

COLOURS = ("red", "blue", "pink")
PUSH_DISTANCE = 0.1  # m along x (CALVIN's push_object threshold)
LIFT_HEIGHT = 0.05  # m (CALVIN's lift_object threshold for the table)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # 'push', 'lift' or 'led'
    block: str | None = None  # 'block_red' ... for push / lift
    direction: int = 0  # push: +1 right (+x), -1 left; led: 1 turn on, 0 turn off


def _specs() -> dict[str, TaskSpec]:
    specs = []
    for colour in COLOURS:
        block = f"block_{colour}"
        specs.append(TaskSpec(f"push_{colour}_block_right", "push", block, +1))
        specs.append(TaskSpec(f"push_{colour}_block_left", "push", block, -1))
    for colour in COLOURS:
        specs.append(TaskSpec(f"lift_{colour}_block_table", "lift", f"block_{colour}"))
    specs.append(TaskSpec("turn_on_led", "led", None, 1))
    specs.append(TaskSpec("turn_off_led", "led", None, 0))
    return {spec.name: spec for spec in specs}


TASKS: dict[str, TaskSpec] = _specs()
TASK_NAMES: tuple[str, ...] = tuple(TASKS)

# The instruction the evaluation gives for each task: CALVIN's validation sentence for the same task
# (new_playtable_validation.yaml), so a policy sees the same words in both scenes.
VALIDATION_INSTRUCTIONS: dict[str, str] = {
    **{f"push_{c}_block_right": f"go push the {c} block right" for c in COLOURS},
    **{f"push_{c}_block_left": f"go push the {c} block left" for c in COLOURS},
    **{f"lift_{c}_block_table": f"grasp and lift the {c} block" for c in COLOURS},
    "turn_on_led": "press the button to turn on the led light",
    "turn_off_led": "press the button to turn off the led light",
}

# Paraphrases the demonstration recorder draws from (CALVIN's annotator draws from its training sentences); none of
# them equals a validation instruction.
_PUSH_RIGHT = ("push the {c} block to the right", "slide the {c} block towards the right",
               "move the {c} block to the right side", "shove the {c} block rightwards")
_PUSH_LEFT = ("push the {c} block to the left", "slide the {c} block towards the left",
              "move the {c} block to the left side", "shove the {c} block leftwards")
_LIFT = ("pick up the {c} block", "lift the {c} block off the table", "grab the {c} block and raise it",
         "take the {c} block up from the table")
TRAINING_INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    **{f"push_{c}_block_right": tuple(s.format(c=c) for s in _PUSH_RIGHT) for c in COLOURS},
    **{f"push_{c}_block_left": tuple(s.format(c=c) for s in _PUSH_LEFT) for c in COLOURS},
    **{f"lift_{c}_block_table": tuple(s.format(c=c) for s in _LIFT) for c in COLOURS},
    "turn_on_led": ("turn on the green light", "switch the led on", "push the button so that the light turns on",
                    "make the led light up"),
    "turn_off_led": ("turn off the green light", "switch the led off", "push the button so that the light goes out",
                     "press the button until the led is dark"),
}


def _contacts(info: dict, block: str) -> list[tuple]:
    return info["scene_info"]["movable_objects"][block]["contacts"]


def push_done(spec: TaskSpec, start_info: dict, end_info: dict) -> bool:
    robot = start_info["robot_info"]["uid"]
    start_surface = {(c[2], c[4]) for c in _contacts(start_info, spec.block) if c[2] != robot}
    end_surface = {(c[2], c[4]) for c in _contacts(end_info, spec.block) if c[2] != robot}
    if not start_surface or not end_surface or not start_surface <= end_surface:
        return False
    start_x = start_info["scene_info"]["movable_objects"][spec.block]["current_pos"][0]
    end_x = end_info["scene_info"]["movable_objects"][spec.block]["current_pos"][0]
    return (end_x - start_x) * spec.direction > PUSH_DISTANCE


def lift_done(spec: TaskSpec, start_info: dict, end_info: dict) -> bool:
    robot = start_info["robot_info"]["uid"]
    table = start_info["scene_info"]["fixed_objects"]["table"]
    table_top = (table["uid"], table["links"]["base_link"])
    start_z = start_info["scene_info"]["movable_objects"][spec.block]["current_pos"][2]
    end_z = end_info["scene_info"]["movable_objects"][spec.block]["current_pos"][2]
    end_bodies = {c[2] for c in _contacts(end_info, spec.block)}
    on_table = table_top in {(c[2], c[4]) for c in _contacts(start_info, spec.block)}
    return end_z - start_z > LIFT_HEIGHT and end_bodies == {robot} and on_table


def led_done(spec: TaskSpec, start_info: dict, end_info: dict) -> bool:
    start = start_info["scene_info"]["lights"]["led"]["logical_state"]
    end = end_info["scene_info"]["lights"]["led"]["logical_state"]
    return start == 1 - spec.direction and end == spec.direction


_CHECKS: dict[str, Callable[[TaskSpec, dict, dict], bool]] = {"push": push_done, "lift": lift_done, "led": led_done}


class BuiltinTaskOracle:
    """calvin_env's Tasks interface for the built-in scene."""

    def __init__(self, task_names: tuple[str, ...] = TASK_NAMES) -> None:
        unknown = set(task_names) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)}; the built-in scene has {list(TASK_NAMES)}")
        self.task_names = tuple(task_names)

    def get_task_info(self, start_info: dict, end_info: dict) -> set[str]:
        """All tasks achieved between the two infos."""
        return {name for name in self.task_names if _CHECKS[TASKS[name].kind](TASKS[name], start_info, end_info)}

    def get_task_info_for_set(self, start_info: dict, end_info: dict, tasks: set[str]) -> set[str]:
        """The subset of `tasks` achieved between the two infos (unknown names are never achieved, as calvin_env)."""
        return {name for name in self.task_names
                if name in tasks and _CHECKS[TASKS[name].kind](TASKS[name], start_info, end_info)}


def validation_annotations() -> dict[str, list[str]]:
    """task -> [instruction], the shape of CALVIN's val_annotations that the protocol indexes with [0]."""
    return {name: [sentence] for name, sentence in VALIDATION_INSTRUCTIONS.items()}


def training_instruction(task: str, rng: np.random.Generator) -> str:
    options = TRAINING_INSTRUCTIONS[task]
    return options[int(rng.integers(len(options)))]

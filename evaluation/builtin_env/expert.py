"""Scripted expert for the built-in scene: solves each task from privileged state and outputs the same (7,) relative
actions a policy would.

    expert = ScriptedExpert(env, "push_red_block_left")
    while not expert.done:
        env.step(expert.act())

The plan is a list of waypoints for the TCP (with a gripper command), made when the expert is created from the
cube / button positions (env.get_scene_obs()) and the controller's target pose (env.target_pose). Each step moves
the target towards the current waypoint by at most the waypoint's speed, so the commanded path is straight and the
arm follows it closely (the recorded relative actions, measured TCP displacements, then replay the same motion).
Every plan starts by rising to a safe height, so tasks can be chained from wherever the previous one ended.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evaluation.builtin_env import scene as sc
from evaluation.builtin_env.env import MAX_REL_ORN, MAX_REL_POS, BuiltinEnv
from evaluation.builtin_env.tasks import TASKS, TaskSpec

OPEN, CLOSE = 1.0, -1.0
SAFE_Z = sc.TABLE_TOP_Z + 0.12  # travel height: fingertips clear the cubes and the button
PUSH_Z = sc.TABLE_TOP_Z + 0.017  # TCP height for pushing: the fingertips (1 cm below the TCP) push low
GRASP_Z = sc.TABLE_TOP_Z + 0.022  # TCP height for grasping (fingers cover the cube's lower 4.5 cm)
LIFT_Z = sc.TABLE_TOP_Z + 0.14
PUSH_CLEARANCE = 0.058  # m from the cube's centre to the pusher before contact (a turned cube's corner + finger)
PUSH_TRAVEL = 0.15  # m the cube is pushed (the oracle wants > 0.1; the margin absorbs slips and turns)
FINGER_HALF = 0.01  # m, half the closed fingers' thickness along the push
PRESS_Z = sc.BUTTON_CAP_TOP_Z - 0.01  # fingertips (1 cm below the TCP) 2 cm into the cap: its full travel
FAST, SLOW = 0.014, 0.009  # m per step along a path (0.7 and 0.45 of the action unit)
REACH_TOLERANCE = 0.003  # m between the measured TCP and a waypoint before the next one starts
MAX_WAIT = 15  # steps a waypoint may wait for the arm to arrive


@dataclass(frozen=True)
class Waypoint:
    pos: tuple[float, float, float]
    gripper: float
    speed: float = FAST
    yaw: float = 0.0  # gripper yaw relative to the home pose (radians), reached at MAX_REL_ORN per step
    hold: int = 0  # extra steps to stay once there (e.g. to let the gripper close)
    precise: bool = False  # wait until the measured TCP is within REACH_TOLERANCE


class ScriptedExpert:
    """Solves one task of the built-in scene; see the module docstring."""

    def __init__(self, env: BuiltinEnv, task: str) -> None:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; the built-in scene has {list(TASKS)}")
        self.env = env
        self.task = task
        self._spec = TASKS[task]
        # Rise first (with the gripper as it is: opening beside a cube would shove it), then plan the task from
        # where the cubes are at that moment.
        gripper = OPEN if env.get_robot_obs()[14] > 0 else CLOSE
        self._plan = _rise(env.target_pose[0], gripper)
        self._task_planned = False
        self._index = 0
        self._waited = 0

    @property
    def done(self) -> bool:
        return self._task_planned and self._index >= len(self._plan)

    def act(self) -> np.ndarray:
        """The next (7,) relative action; after the plan ends, a zero motion that keeps the last gripper command."""
        target_pos, target_euler = self.env.target_pose
        if not self._task_planned and self._index >= len(self._plan):
            self._plan += _task_plan(self._spec, self.env.get_scene_obs())
            self._task_planned = True
        if self.done:
            return np.array([0, 0, 0, 0, 0, 0, self._plan[-1].gripper])
        waypoint = self._plan[self._index]
        delta = np.array(waypoint.pos) - target_pos
        distance = float(np.linalg.norm(delta))
        move = delta if distance <= waypoint.speed else delta * (waypoint.speed / distance)
        euler = np.array(sc.HOME_TCP_EULER) + (0.0, 0.0, waypoint.yaw)
        turn = np.clip(_wrap(euler - target_euler), -MAX_REL_ORN, MAX_REL_ORN)
        if distance <= waypoint.speed and np.all(np.abs(turn) < MAX_REL_ORN):
            self._advance_when_there(waypoint)
        return np.concatenate([move / MAX_REL_POS, turn / MAX_REL_ORN, [waypoint.gripper]])

    def _advance_when_there(self, waypoint: Waypoint) -> None:
        tcp = self.env.get_robot_obs()[:3]
        arrived = not waypoint.precise or np.linalg.norm(tcp - np.array(waypoint.pos)) < REACH_TOLERANCE
        if (arrived and self._waited >= waypoint.hold) or self._waited >= waypoint.hold + MAX_WAIT:
            self._index += 1
            self._waited = 0
        else:
            self._waited += 1


def _wrap(angle: np.ndarray) -> np.ndarray:
    return (angle + np.pi) % (2 * np.pi) - np.pi


def _rise(start: np.ndarray, gripper: float) -> list[Waypoint]:
    """Straight up to the travel height first, unless already there."""
    if start[2] >= SAFE_Z - 0.01:
        return []
    return [Waypoint((start[0], start[1], SAFE_Z), gripper)]


def _task_plan(spec: TaskSpec, scene_obs: np.ndarray) -> list[Waypoint]:
    """Waypoints from the travel height to the task's end."""
    if spec.kind == "led":
        x, y = sc.BUTTON_XY
        return [Waypoint((x, y, SAFE_Z), CLOSE),
                Waypoint((x, y, PRESS_Z), CLOSE, SLOW, precise=True),
                Waypoint((x, y, SAFE_Z), CLOSE)]
    block = scene_obs[sc.block_slice(sc.BLOCK_NAMES.index(spec.block))]
    x, y, yaw = float(block[0]), float(block[1]), float(block[5])
    if spec.kind == "push":
        side = x - spec.direction * PUSH_CLEARANCE
        end = x + spec.direction * (PUSH_TRAVEL - sc.BLOCK_HALF - FINGER_HALF)  # pusher stops where the cube should
        return [Waypoint((side, y, SAFE_Z), CLOSE),
                Waypoint((side, y, PUSH_Z), CLOSE, precise=True),
                Waypoint((end, y, PUSH_Z), CLOSE, SLOW),
                Waypoint((end, y, PUSH_Z + 0.06), CLOSE)]
    # lift: turn the fingers square to the cube's faces (a cube looks the same every 90 degrees)
    turn = (yaw + np.pi / 4) % (np.pi / 2) - np.pi / 4
    return [Waypoint((x, y, SAFE_Z), OPEN, yaw=turn),
            Waypoint((x, y, GRASP_Z), OPEN, SLOW, turn, precise=True),
            Waypoint((x, y, GRASP_Z), CLOSE, yaw=turn, hold=6),
            Waypoint((x, y, LIFT_Z), CLOSE, SLOW, turn)]

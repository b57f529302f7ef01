"""Speed of the built-in scene on ONE CPU core: env steps per second with both cameras rendered every step (the
issue asks for >= 30), side by side with the same steps without cameras, plus where the time goes.

    python bench/bench_builtin_env.py [--steps 300] [--cpu 0]

The scripted expert drives the arm (contacts, grasps and the button happen as in real use); the oracle is checked
every step, as the evaluation protocol does.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluation.builtin_env.env import BuiltinEnv  # noqa: E402
from evaluation.builtin_env.expert import ScriptedExpert  # noqa: E402
from evaluation.builtin_env.sequences import get_sequences  # noqa: E402
from evaluation.builtin_env.tasks import BuiltinTaskOracle  # noqa: E402


def run(env: BuiltinEnv, steps: int) -> tuple[float, float, int]:
    """(seconds in env.step + oracle, seconds in resets, resets) over `steps` expert steps through 5-task chains."""
    oracle = BuiltinTaskOracle()
    stepping = resetting = 0.0
    done = resets = 0
    for initial, chain in get_sequences(1000, seed=0):
        t0 = time.perf_counter()
        env.reset(initial["robot_obs"], initial["scene_obs"])
        resetting += time.perf_counter() - t0
        resets += 1
        for task in chain:
            start = env.get_info()
            expert = ScriptedExpert(env, task)
            while not expert.done and done < steps:
                t0 = time.perf_counter()
                info = env.step(expert.act())[3]
                oracle.get_task_info_for_set(start, info, {task})
                stepping += time.perf_counter() - t0
                done += 1
            if done >= steps:
                return stepping, resetting, resets
    return stepping, resetting, resets


def camera_times(env: BuiltinEnv, repeats: int = 50) -> tuple[float, float]:
    """Mean seconds to render the static and the gripper camera once."""
    from evaluation.builtin_env import scene as sc

    env.reset()
    t0 = time.perf_counter()
    for _ in range(repeats):
        env._render(env._static_view, env._static_projection, sc.STATIC_SIZE, sc.STATIC_NEAR, sc.STATIC_FAR)
    static = (time.perf_counter() - t0) / repeats
    view, projection = sc.gripper_camera_matrices(np.zeros(3), (0.0, 0.0, 0.0, 1.0))
    t0 = time.perf_counter()
    for _ in range(repeats):
        env._render(view, projection, sc.GRIPPER_SIZE, sc.GRIPPER_NEAR, sc.GRIPPER_FAR)
    return static, (time.perf_counter() - t0) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--cpu", type=int, default=0, help="the one core to run on")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    print(f"cores allowed: {sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}")
    with BuiltinEnv(render=True) as rendered, BuiltinEnv(render=False) as blind:
        with_cameras, reset_seconds, resets = run(rendered, args.steps)
        without_cameras, _, _ = run(blind, args.steps)
        static, gripper = camera_times(rendered)
    print(f"{'':28s}{'steps/s':>10s}{'ms/step':>10s}")
    print(f"{'both cameras every step':28s}{args.steps / with_cameras:10.1f}{1000 * with_cameras / args.steps:10.2f}")
    print(f"{'no cameras (baseline)':28s}{args.steps / without_cameras:10.1f}"
          f"{1000 * without_cameras / args.steps:10.2f}")
    print(f"ratio (cameras / baseline time): {with_cameras / without_cameras:.1f}x; "
          f"static camera {1000 * static:.1f} ms, gripper camera {1000 * gripper:.1f} ms per render; "
          f"reset (rebuild + render) {1000 * reset_seconds / resets:.0f} ms")


if __name__ == "__main__":
    main()

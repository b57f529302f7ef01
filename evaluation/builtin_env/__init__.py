"""The built-in pybullet scene: CALVIN's env / oracle interfaces on a table with a Franka Panda, red, blue and pink
cubes and a button with a green LED, built only from pybullet_data assets and primitive shapes.

    from evaluation.builtin_env import BuiltinEnv, BuiltinTaskOracle, get_sequences, validation_annotations

Modules: scene.py (geometry, cameras, scene_obs layout), env.py (BuiltinEnv), tasks.py (task names, instructions,
oracle), sequences.py (initial states and 5-task chains), expert.py (scripted expert), record.py (demonstration
recorder, ``python -m evaluation.builtin_env.record``).
"""
from evaluation.builtin_env.env import BuiltinEnv
from evaluation.builtin_env.expert import ScriptedExpert
from evaluation.builtin_env.sequences import get_sequences
from evaluation.builtin_env.tasks import (
    TASK_NAMES,
    TRAINING_INSTRUCTIONS,
    VALIDATION_INSTRUCTIONS,
    BuiltinTaskOracle,
    validation_annotations,
)

__all__ = ["BuiltinEnv", "BuiltinTaskOracle", "ScriptedExpert", "TASK_NAMES", "TRAINING_INSTRUCTIONS",
           "VALIDATION_INSTRUCTIONS", "get_sequences", "validation_annotations"]

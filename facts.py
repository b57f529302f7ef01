"""Facts about CALVIN and GR-1 that several layers use, each defined once here and imported everywhere else.

Standard library only, and no project imports: config, data, models, evaluation and the entry points may all import it
(it sits below config in the import direction; README "Architecture").

Camera vocabularies: the model names a camera by ``CAMERAS`` ('static', 'gripper'; also the order of their tokens);
observations (``obs['rgb_obs']``), LMDB keys and data batches name its images by ``CAMERA_KEYS`` ('rgb_static',
'rgb_gripper'); predicted frames are ``PREDICTION_KEYS``. Translate with these mappings, never by string editing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

# ---------------------------------------------------------------- cameras

CAMERAS = ("static", "gripper")  # GR-1's two cameras, in token order
CAMERA_KEYS = {"static": "rgb_static", "gripper": "rgb_gripper"}  # camera -> observation / LMDB / batch image key
PREDICTION_KEYS = {cam: f"{key}_pred" for cam, key in CAMERA_KEYS.items()}  # camera -> predicted-frame key
CAMERA_SIZES = {"static": 200, "gripper": 84}  # CALVIN's square RGB frames, pixels per side

# ---------------------------------------------------------------- CALVIN observations, robot state and actions

ROBOT_OBS_DIM = 15  # robot_obs: TCP position (3), TCP Euler (3), gripper width (1), arm joints (7), gripper action (1)
SCENE_OBS_DIM = 24  # scene_obs: CALVIN's articulated objects (6) and three blocks' poses (3 x 6)

ARM_DIM = 6  # TCP position (3) + Euler angles (3), in actions and in the robot state GR-1 reads
ACTION_DIM = ARM_DIM + 1  # arm + gripper (-1 close, +1 open); also the width of the state GR-1 reads
GRIPPER_STATE_CLASSES = 2  # the gripper state enters GR-1 one-hot: [closed, open]
GRIPPER_OPEN_THRESHOLD = 0.5  # the policy opens the gripper iff sigmoid(gripper logit) > this (GR1-Training's rule)

Number = TypeVar("Number")  # float, numpy array or torch tensor: the mappings below are plain arithmetic


def gripper_to_binary(gripper: Number) -> Number:
    """CALVIN's gripper code -1 (closed / close) / +1 (open) -> 0 / 1, as (g + 1) / 2 in the input's dtype.

    The same code is used by actions (the training target) and by the robot state's last entry (robot_obs[-1])."""
    return (gripper + 1) / 2


def binary_to_gripper(binary: Number) -> Number:
    """0 / 1 -> CALVIN's gripper action -1 (close) / +1 (open): the inverse of gripper_to_binary."""
    return binary * 2 - 1


def gripper_state_index(robot_obs_last: float) -> int:
    """Column of the one-hot gripper state: 0 = closed (-1), 1 = open (+1), as int((g + 1) / 2) in float64."""
    index = int(gripper_to_binary(float(robot_obs_last)))  # Faithful to GR1-Training: .long() truncates towards zero
    if index not in (0, 1):
        raise ValueError(f"gripper state {robot_obs_last!r} (robot_obs[-1]) is not -1 or +1")
    return index


# ---------------------------------------------------------------- evaluation

CHAIN_LENGTH = 5  # subtasks per CALVIN evaluation sequence (the built-in scene's chains too)

# ---------------------------------------------------------------- GR-1's token block


@dataclass(frozen=True)
class TokenLayout:
    """Named slices of one timestep's token block of GR-1 (models/gr1.py's docstring draws it); the only place the
    number of tokens per timestep is computed (config.py checks seq_len x per_step against n_positions with it)."""

    n_latents: int  # Q
    chunk_size: int  # K

    @property
    def frame(self) -> int:  # tokens of one camera frame: Q patch latents + cls
        return self.n_latents + 1

    @property
    def n_obs(self) -> int:  # lang + state + one frame per camera
        return 2 + len(CAMERAS) * self.frame

    @property
    def per_step(self) -> int:  # M: observation tokens, action queries, one observation query block per camera
        return self.n_obs + self.chunk_size + len(CAMERAS) * self.frame

    def camera(self, cam: str) -> slice:
        start = 2 + CAMERAS.index(cam) * self.frame
        return slice(start, start + self.frame)

    @property
    def action_queries(self) -> slice:
        return slice(self.n_obs, self.n_obs + self.chunk_size)

    def obs_queries(self, cam: str) -> slice:
        start = self.n_obs + self.chunk_size + CAMERAS.index(cam) * self.frame
        return slice(start, start + self.frame)

"""The real CALVIN simulator backend (calvin_env): the only module of this project that imports calvin_env.

`make_calvin_env` builds calvin_env's PlayTableSimEnv the way GR1-Training's evaluation does (its
`CalvinEnvWrapperRaw` over `<dataset>/validation`): cameras `rgb_static` and `rgb_gripper`, scene info on, raw
observations, relative actions with the gripper binarised. `make_calvin_oracle` builds CALVIN's task oracle. Both
speak the interfaces of evaluation/interfaces.py, so evaluation/protocol.py drives them like the built-in scene.

calvin_env, hydra, omegaconf and gym are imported inside the functions that need them: importing this module never
fails, and using it without calvin_env raises `CalvinEnvNotInstalledError` with installation instructions
(also in scripts/install_calvin_env.sh).
"""
from __future__ import annotations

import importlib
import logging
import os
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

# Cameras GR1-Training's evaluation asks for (its `observation_space['rgb_obs']`); get_env keeps the cameras whose
# name is the part after "rgb_"/"depth_" and drops the rest (the tactile camera, which would need tacto).
CAMERAS = ("rgb_static", "rgb_gripper")
# The rendering config shipped with this project (scene D, both cameras), used when no dataset folder is given.
MINIMAL_CONFIG = Path(__file__).resolve().with_name("calvin_scene_D.yaml")
# calvin_env's own task definitions (relative to its checkout), as CALVIN's evaluation instantiates them.
TASKS_CONFIG = Path("conf") / "tasks" / "new_playtable_tasks.yaml"
PINNED_COMMIT = "797142c"  # 2022-12-23 "fix bug in button during rollouts" (mees/calvin#32), see README

INSTALL_HELP = (
    "The real CALVIN simulator (calvin_env) is not installed. Install it from a git clone, in editable mode so that "
    "its data/ and conf/ folders stay beside the package, and with its dependencies (calvin_env logs its git commit, "
    "so a plain archive extraction does not work): `git clone https://github.com/mees/calvin_env && "
    f"git -C calvin_env checkout {PINNED_COMMIT} && pip install --no-deps -e calvin_env && pip install hydra-core "
    "omegaconf gym scipy opencv-python-headless numpy-quaternion GitPython pybullet` (or run "
    "scripts/install_calvin_env.sh). The tacto submodule is not needed: the tactile camera is never built. "
    "Without calvin_env, use eval_backend=builtin."
)


class CalvinEnvNotInstalledError(ImportError):
    """calvin_env (or one of its dependencies) cannot be imported; the message says how to install it."""


def _import(name: str) -> ModuleType:
    """Import calvin_env or one of its dependencies, turning a failure into installation instructions."""
    try:
        with warnings.catch_warnings():
            # calvin_env's own data-collection script is decorated with @hydra.main without version_base, and
            # gym 0.26 warns about numpy at import: neither concerns evaluation.
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except ImportError as error:
        raise CalvinEnvNotInstalledError(f"{INSTALL_HELP} (import of {name!r} failed: {error})") from error


def calvin_env_available() -> bool:
    """Whether calvin_env and the modules it needs to build an env import here."""
    try:
        for name in ("calvin_env.envs.play_table_env", "calvin_env.envs.tasks", "hydra", "omegaconf"):
            _import(name)
    except CalvinEnvNotInstalledError:
        return False
    return True


def calvin_env_root() -> Path:
    """The calvin_env checkout (the folder holding data/ and conf/ beside the calvin_env package)."""
    package = _import("calvin_env")
    root = Path(package.__file__).resolve().parents[1]
    missing = [name for name in ("data", "conf") if not (root / name).is_dir()]
    if missing:
        raise CalvinEnvNotInstalledError(
            f"calvin_env is imported from {Path(package.__file__).parent} but {', '.join(missing)} is not beside it "
            f"in {root}: calvin_env must be installed from a git clone with `pip install -e`. {INSTALL_HELP}"
        )
    return root


def load_render_config(dataset_path: str) -> Any:
    """The rendering config (an OmegaConf DictConfig): `<dataset_path>/validation/.hydra/merged_config.yaml`,
    or the shipped scene-D config (its data_path set to calvin_env's data/ folder) when dataset_path is ''."""
    omegaconf = _import("omegaconf")
    if not dataset_path:
        config = omegaconf.OmegaConf.load(MINIMAL_CONFIG)
        config.data_path = str(calvin_env_root() / "data")
        return config
    path = Path(dataset_path) / "validation" / ".hydra" / "merged_config.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: calvin_dataset_path must be a CALVIN split folder (e.g. task_ABC_D) whose "
            "validation/.hydra/merged_config.yaml holds the rendering config; use '' for the shipped scene-D config"
        )
    calvin_env_root()  # the dataset config names data/ relative to the calvin_env checkout: check it is there
    return omegaconf.OmegaConf.load(path)


def set_egl_device(device: torch.device | str) -> int | None:
    """Render on the GPU that runs the policy: set EGL_VISIBLE_DEVICES to the EGL device of `device` when it is a
    CUDA device and CUDA exists; return that EGL id, or None (CPU: EGL picks its default, e.g. Mesa llvmpipe)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    utils = _import("calvin_env.utils.utils")
    cuda_id = device.index if device.index is not None else torch.cuda.current_device()
    if "EGL_VISIBLE_DEVICES" in os.environ:
        logger.warning("EGL_VISIBLE_DEVICES=%s is already set; overriding it for cuda:%d",
                       os.environ["EGL_VISIBLE_DEVICES"], cuda_id)
    try:
        egl_id = utils.get_egl_device_id(cuda_id)
    except (utils.EglDeviceNotFoundError, OSError, IndexError, ValueError) as error:
        # Faithful to GR1-Training: fall back to EGL device 0 (all processes then render on one GPU). Unlike it,
        # also when calvin_env's EGL probe (egl_check/, built with g++ on first use) cannot be built or run.
        logger.warning("No EGL device found for cuda:%d (%r); using EGL device 0 (see calvin_env's README on EGL)",
                       cuda_id, error)
        egl_id = 0
    os.environ["EGL_VISIBLE_DEVICES"] = str(egl_id)
    logger.info("EGL device %d <-> CUDA device %d", egl_id, cuda_id)
    return egl_id


def _build_sim(render_config: Any) -> Any:
    """calvin_env's PlayTableSimEnv from a rendering config, as calvin_env's `get_env(path, obs_space,
    show_gui=False)` builds it: only the requested cameras, no GUI, no VR, scene info on."""
    hydra_utils = _import("hydra.utils")
    _import("calvin_env.envs.play_table_env")  # the module hydra instantiates
    kept = {name.split("_", 1)[1] for name in CAMERAS}
    for name in [name for name in render_config.cameras if name not in kept]:
        del render_config.cameras[name]
    absent = kept - set(render_config.cameras)
    if absent:
        raise ValueError(
            f"the rendering config has no camera(s) {sorted(absent)}; it has {list(render_config.cameras)}"
        )
    return hydra_utils.instantiate(render_config.env, show_gui=False, use_vr=False, use_scene_info=True)


def binarize_gripper(action: Any) -> np.ndarray:
    """A (7,) float relative action with its gripper entry set to 1 (open) if > 0, else -1 (close).
    A float input keeps its dtype (GR1 policies give float32, as the reference passes them); others become float64."""
    action = np.array(action, copy=True)
    if not np.issubdtype(action.dtype, np.floating):
        action = action.astype(np.float64)
    action = action.reshape(-1)
    if action.shape != (7,):
        raise ValueError(f"expected a relative action of 7 values (xyz, Euler xyz, gripper), got shape {action.shape}")
    action[-1] = 1 if action[-1] > 0 else -1
    return action


class CalvinEnv:
    """calvin_env's PlayTableSimEnv behind the EvalEnv interface; observations are calvin_env's raw dicts
    ({'rgb_obs': {'rgb_static', 'rgb_gripper'}, 'depth_obs': {...}, 'robot_obs', 'scene_obs'})."""

    def __init__(self, sim: Any) -> None:
        self.sim = sim  # the PlayTableSimEnv itself, for anything not covered here

    def reset(self, robot_obs: np.ndarray | None = None, scene_obs: np.ndarray | None = None) -> dict:
        """Set the robot and scene state (random block placement for a missing scene_obs) and render."""
        return self.sim.reset(robot_obs=robot_obs, scene_obs=scene_obs)

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, dict]:
        """One 30 Hz control step (8 physics substeps) with a relative action: xyz (x 0.02 m), Euler xyz
        (x 0.05 rad), unclipped as in the reference; gripper binarised (> 0 open, else close)."""
        return self.sim.step(binarize_gripper(action))

    def get_obs(self) -> dict:
        return self.sim.get_obs()

    def get_info(self) -> dict:
        """{'robot_info': ..., 'scene_info': ...}: what the task oracle compares."""
        return self.sim.get_info()

    def close(self) -> None:
        """Disconnect from the physics server. Idempotent: PlayTableSimEnv.close disconnects its client id again
        when it is garbage-collected, and pybullet reuses ids, so a second env built after a closed one would
        lose its connection; forgetting the id after closing prevents that."""
        if self.sim.cid >= 0:
            self.sim.close()
            self.sim.cid = -1


def make_calvin_env(dataset_path: str, device: torch.device | str = "cpu") -> CalvinEnv:
    """The real CALVIN env for evaluation: the rendering config of `dataset_path` (a CALVIN split folder with
    validation/.hydra/merged_config.yaml) or, when dataset_path is '', the shipped scene-D config; rendering is
    pinned to `device`'s GPU when it is a CUDA device (EGL), else EGL's default renderer is used.
    Build one env per process (as GR1-Training does) and close it before building another: calvin_env talks to
    pybullet's default client in places, so two live envs in one process would interfere."""
    render_config = load_render_config(dataset_path)
    set_egl_device(device)
    return CalvinEnv(_build_sim(render_config))


def make_calvin_oracle() -> Any:
    """CALVIN's task oracle (calvin_env `Tasks` from its conf/tasks/new_playtable_tasks.yaml, instantiated as
    CALVIN's evaluation does); `get_task_info_for_set(start_info, end_info, tasks)` -> the tasks achieved."""
    path = calvin_env_root() / TASKS_CONFIG
    if not path.is_file():
        raise CalvinEnvNotInstalledError(
            f"{path} not found: this calvin_env checkout has no task config. {INSTALL_HELP}"
        )
    omegaconf = _import("omegaconf")
    hydra_utils = _import("hydra.utils")
    _import("calvin_env.envs.tasks")
    return hydra_utils.instantiate(omegaconf.OmegaConf.load(path))

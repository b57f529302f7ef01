"""The real CALVIN simulator backend (calvin_env): the only module of this project that imports calvin_env.

`make_calvin_env` builds calvin_env's PlayTableSimEnv the way GR1-Training's evaluation does (its
`CalvinEnvWrapperRaw` over `<dataset>/validation`): cameras `rgb_static` and `rgb_gripper`, scene info on, raw
observations, relative actions with the gripper binarised. `make_calvin_oracle` builds CALVIN's task oracle. Both
speak the interfaces of evaluation/interfaces.py, so evaluation/protocol.py drives them like the built-in scene.

Deterministic reset (the default): calvin_env's reset sets the joints and object poses but keeps what the previous
sequence left behind: block velocities, the last gripper command (robot_obs[14]) and bullet's contact manifolds
(warm-started contact impulses, which restoreState does not touch either). Zeroing the velocities and the gripper
command is not enough: a block resting where a block rested before keeps its old contact points, and the states drift
apart from the first contact on. So each reset rebuilds the world as a fresh env does (PlayTableSimEnv.load(): reset
the bullet simulation, reload robot and scene, ~0.15-0.3 s), sets the gripper command from robot_obs, then resets as
calvin_env. One more thing carries over: loading a block places it at a pose drawn from the scene's random generator
before reset moves it, and bullet's broadphase tree (so the order in which contacts are solved, so the last bits of
the states) depends on where bodies were inserted. The rebuild therefore draws those poses from the generator state
a fresh env starts from (the config's seed), and leaves the generator where it was (random layouts of
reset(scene_obs=None) go on as before). A sequence's states and images then equal those of a fresh env, whatever ran
before (tested, bit for bit). pybullet's EGL plugin keeps ~12 MB per reload (textures), which only a new physics
client frees, so every RENEW_EVERY deterministic resets the env also replaces its physics client (~1 s), which gives
the same world. reset='reference' keeps calvin_env's plain reset, for comparisons with numbers measured that way.

calvin_env, hydra, omegaconf, gym and torch are imported inside the functions that need them: importing this module
never fails and stays light (env worker processes import it), and using it without calvin_env raises
`CalvinEnvNotInstalledError` with installation instructions (also in scripts/install_calvin_env.sh).
"""
from __future__ import annotations

import ctypes
import importlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import numpy as np

from facts import CAMERAS

logger = logging.getLogger(__name__)

# GR1-Training's evaluation asks for the cameras facts.CAMERA_KEYS (its `observation_space['rgb_obs']`); calvin_env's
# rendering config names those cameras as facts.CAMERAS does ('static', 'gripper'). get_env keeps them and drops
# the rest (the tactile camera, which would need tacto).
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


# OpenGL renderers that draw on the CPU. Scores move with the renderer (Seer#7, OpenHelix#18), and they are ~10x slower.
SOFTWARE_RENDERERS = ("llvmpipe", "softpipe", "swrast", "osmesa", "software rasterizer")
SOFTWARE_RENDERER_HELP = (
    "calvin_env renders with the software OpenGL renderer {renderer!r} although CUDA is available: images (and so "
    "scores) differ from GPU rendering, which CALVIN's data was rendered with, and it is ~10x slower. Make EGL find "
    "the NVIDIA driver: install the driver's EGL/GL libraries (Debian/Ubuntu: libnvidia-gl-<driver version>, which "
    "provides /usr/share/glvnd/egl_vendor.d/10_nvidia.json; in Docker run with "
    "NVIDIA_DRIVER_CAPABILITIES=compute,utility,graphics) and libegl1 (glvnd)."
)
RESETS = ("deterministic", "reference")
RENEW_EVERY = 10  # deterministic resets between two new physics clients (bounds the EGL plugin's memory growth)
T = TypeVar("T")


class CalvinEnvNotInstalledError(ImportError):
    """calvin_env (or one of its dependencies) cannot be imported; the message says how to install it."""


TARGET_PREFIX = "calvin_env."  # what a rendering config may instantiate


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
    config = omegaconf.OmegaConf.load(path)
    check_targets(omegaconf.OmegaConf.to_container(config, resolve=False), str(path))
    return config


def check_targets(node: Any, source: str) -> None:
    """Every `_target_` of a rendering config names a calvin_env class: hydra instantiates whatever a `_target_`
    names, so a crafted dataset config could otherwise run any function (os.system, ...)."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None and not (isinstance(target, str) and target.startswith(TARGET_PREFIX)):
            raise ValueError(f"{source}: _target_ {target!r} is not a {TARGET_PREFIX}* class; refusing to "
                             "instantiate it (hydra would call it)")
        children = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return
    for child in children:
        check_targets(child, source)


def set_egl_device(device: Any) -> int | None:
    """Render on the GPU that runs the policy: set EGL_VISIBLE_DEVICES to the EGL device of `device` (a
    torch.device or its name) when it is a CUDA device and CUDA exists; return that EGL id, or None (CPU: EGL picks
    its default, e.g. Mesa llvmpipe). Env worker processes inherit the variable."""
    if not str(device).startswith("cuda"):
        return None
    import torch

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
    kept = set(CAMERAS)
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


def software_renderer(renderer: str) -> bool:
    """Whether an OpenGL renderer string (GL_RENDERER) names a renderer that draws on the CPU."""
    return any(name in renderer.lower() for name in SOFTWARE_RENDERERS)


def _capture_c_stdout(build: Callable[[], T]) -> tuple[T, str]:
    """(build(), what it printed to the process's stdout, C code included: pybullet's EGL plugin prints its renderer
    there). The output is shown on stderr if build() raises."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        try:
            result = build()
        except BaseException:
            libc.fflush(None)
            os.dup2(saved, 1)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
        sink.seek(0)
        return result, sink.read().decode(errors="replace")


def _renderer_name(printed: str) -> str:
    """The GL_RENDERER line pybullet's EGL plugin prints while loading ('' with another renderer)."""
    for line in printed.splitlines():
        for prefix in ("GL_RENDERER=", "Renderer = "):
            if line.startswith(prefix):
                return line[len(prefix):].strip()
    return ""


class CalvinEnv:
    """calvin_env's PlayTableSimEnv behind the EvalEnv interface; observations are calvin_env's raw dicts
    ({'rgb_obs': {'rgb_static', 'rgb_gripper'}, 'depth_obs': {...}, 'robot_obs', 'scene_obs'})."""

    def __init__(self, sim: Any, reset: str = "deterministic", renderer: str = "",
                 load_rng_state: dict | None = None, build: Callable[[], Any] | None = None) -> None:
        if reset not in RESETS:
            raise ValueError(f"reset must be one of {RESETS}, got {reset!r}")
        self.sim = sim  # the PlayTableSimEnv itself, for anything not covered here
        self.reset_mode = reset
        self.renderer = renderer  # OpenGL renderer of the EGL plugin ('' when unknown)
        # The scene generator's state when a fresh env loaded its world (block load poses are drawn from it)
        self.load_rng_state = load_rng_state or sim.scene.np_random.bit_generator.state
        self._build = build  # a new PlayTableSimEnv (None: never renewed)
        self.renew_every, self._rebuilds = RENEW_EVERY, 0

    def reset(self, robot_obs: np.ndarray | None = None, scene_obs: np.ndarray | None = None) -> dict:
        """Set the robot and scene state (random block placement for a missing scene_obs) and render. Deterministic
        mode first rebuilds the world and restores the gripper command (see the module docstring)."""
        if self.reset_mode == "deterministic":
            self._rebuild()
            if robot_obs is not None:
                # robot_obs[14] is the last gripper command; calvin_env's reset keeps the previous sequence's
                self.sim.robot.gripper_action = 1 if robot_obs[14] > 0 else -1
        return self.sim.reset(robot_obs=robot_obs, scene_obs=scene_obs)

    def _rebuild(self) -> None:
        """The world of a fresh env: reset the bullet simulation and load robot and scene as its constructor did,
        with the blocks' load poses drawn as then (every renew_every times in a new physics client)."""
        self._rebuilds += 1
        if self._build is not None and self._rebuilds % self.renew_every == 0:
            self.close()
            self.sim = self._build()
        rng = self.sim.scene.np_random.bit_generator
        current, rng.state = rng.state, self.load_rng_state
        try:
            self.sim.load()
        finally:
            rng.state = current

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


def make_calvin_env(dataset_path: str, device: Any = "cpu", reset: str = "deterministic") -> CalvinEnv:
    """The real CALVIN env for evaluation: the rendering config of `dataset_path` (a CALVIN split folder with
    validation/.hydra/merged_config.yaml) or, when dataset_path is '', the shipped scene-D config; rendering is
    pinned to `device`'s GPU when it is a CUDA device (EGL), else EGL's default renderer is used. `reset`:
    'deterministic' or 'reference' (see the module docstring). The env's `renderer` is the OpenGL renderer name.
    Build one env per process (as GR1-Training does) and close it before building another: calvin_env talks to
    pybullet's default client in places, so two live envs in one process would interfere."""
    render_config = load_render_config(dataset_path)
    set_egl_device(device)

    def build() -> Any:
        return _capture_c_stdout(lambda: _build_sim(render_config))

    sim, printed = build()
    # PlayTableSimEnv seeds its generator with gym's np_random(env.seed), then loads the world from it
    fresh_rng = _import("gym.utils.seeding").np_random(render_config.env.get("seed"))[0]
    return CalvinEnv(sim, reset, _renderer_name(printed), fresh_rng.bit_generator.state, lambda: build()[0])


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

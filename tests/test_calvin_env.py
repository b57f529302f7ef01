"""evaluation/calvin_env.py: the real CALVIN simulator backend.

The first group runs everywhere (no calvin_env needed): the module imports without side effects, says how to install
calvin_env when it is missing, binarises the gripper and picks no EGL device on CPU. The rest needs the real simulator
(calvin_env installed with scripts/install_calvin_env.sh) and skips, saying so, where it is absent (as in CI):
- the golden rollout of ../shared/calvin/golden_rollout_seq0.json (60 fixed actions from sequence 0's reset) is
  reproduced from a fresh env built from the shipped scene-D config and from mini_calvin's dataset config;
- the task oracle labels the two mini_calvin validation windows (and their reversals) from re-simulated states;
- the shipped config equals the dataset rendering config; resets and the gripper binarisation behave as calvin_env's;
- deterministic reset: official sequence k gives the same states and images whether it runs first in a fresh env or
  after others, while calvin_env's own reset does not; 3 env workers give the sequential protocol's results.
Only one env is alive at a time in this process: calvin_env addresses pybullet's default client in places.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

from conftest import ROOT, shared_path
from evaluation import calvin_env as backend

needs_calvin_env = pytest.mark.skipif(
    not backend.calvin_env_available(),
    reason="calvin_env (the real CALVIN simulator) is not installed; see scripts/install_calvin_env.sh",
)

STATE_ATOL = 1e-6  # the rollout is bit-identical on the machine that wrote the golden file
SAME_RENDERER_ATOL = 0.05  # image means (0..255) when rendering with the golden file's renderer (EGL on llvmpipe)
OTHER_RENDERER_ATOL = 10.0  # another renderer (e.g. a GPU's EGL) draws the same scene slightly differently
GOLDEN_RENDERER = "llvmpipe"


# ---------------------------------------------------------------------------------------------------------------
# Without calvin_env


def test_import_has_no_side_effects() -> None:
    code = (
        "import os, sys; before = dict(os.environ); import evaluation.calvin_env; "
        "assert not {'calvin_env', 'hydra', 'omegaconf', 'gym', 'torch'} & set(sys.modules), sorted(sys.modules); "
        "assert dict(os.environ) == before"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_missing_calvin_env_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in sys.modules if name.split(".")[0] == "calvin_env"] + ["calvin_env"]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import calvin_env...` raise ImportError
    assert not backend.calvin_env_available()
    for build in (lambda: backend.make_calvin_env("", "cpu"), backend.make_calvin_oracle):
        with pytest.raises(backend.CalvinEnvNotInstalledError) as error:
            build()
        message = str(error.value)
        for needed in ("git clone https://github.com/mees/calvin_env", "pip install --no-deps -e", "hydra-core",
                       "numpy-quaternion", "GitPython", "tacto", "eval_backend=builtin"):
            assert needed in message


def test_binarize_gripper() -> None:
    action = np.array([0.1, -0.2, 0.3, 0.4, -0.5, 0.6, 0.3], dtype=np.float32)
    out = backend.binarize_gripper(action)
    assert out.dtype == np.float32 and out[-1] == 1 and np.array_equal(out[:6], action[:6])
    assert action[-1] == np.float32(0.3)  # the caller's array is not modified
    assert backend.binarize_gripper([0, 0, 0, 0, 0, 0, 0])[-1] == -1  # 0 closes, as in the reference
    assert backend.binarize_gripper(np.zeros((1, 7)) - 0.2)[-1] == -1
    assert backend.binarize_gripper([0, 0, 0, 0, 0, 0, 1]).dtype == np.float64
    with pytest.raises(ValueError, match="7 values"):
        backend.binarize_gripper(np.zeros(8))


def test_no_egl_device_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EGL_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backend.set_egl_device("cpu") is None
    assert backend.set_egl_device("cuda:0") is None  # asked for CUDA but there is none: build, do not crash
    assert "EGL_VISIBLE_DEVICES" not in os.environ


class FakeEglUtils:
    """Stands in for calvin_env.utils.utils: EGL device of each CUDA device (or none found)."""

    class EglDeviceNotFoundError(Exception):
        pass

    def __init__(self, egl_of_cuda: dict[int, int]) -> None:
        self.egl_of_cuda = egl_of_cuda

    def get_egl_device_id(self, cuda_id: int) -> int:
        if cuda_id not in self.egl_of_cuda:
            raise self.EglDeviceNotFoundError(cuda_id)
        return self.egl_of_cuda[cuda_id]


def test_egl_device_follows_the_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EGL_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    monkeypatch.setattr(backend, "_import", lambda name: FakeEglUtils({1: 5, 2: 7}))
    assert backend.set_egl_device("cuda:1") == 5 and os.environ["EGL_VISIBLE_DEVICES"] == "5"
    assert backend.set_egl_device("cuda") == 7 and os.environ["EGL_VISIBLE_DEVICES"] == "7"  # current device
    assert backend.set_egl_device("cuda:3") == 0 and os.environ["EGL_VISIBLE_DEVICES"] == "0"  # not found: 0
    assert backend.set_egl_device("cpu") is None and os.environ["EGL_VISIBLE_DEVICES"] == "0"  # CPU: untouched


# ---------------------------------------------------------------------------------------------------------------
# With the real simulator


@needs_calvin_env
def test_dataset_folder_without_config_is_explained(tmp_path: Any) -> None:
    with pytest.raises(FileNotFoundError, match="validation/.hydra/merged_config.yaml"):
        backend.make_calvin_env(str(tmp_path), "cpu")


def golden_actions(golden: dict) -> np.ndarray:
    """The golden rollout's 60 actions as they were applied. The file stores them rounded to 6 decimals; they are
    these smooth functions of the step t (with the stored gripper signs), which the test asserts. Replaying the
    rounded values moves the states by ~1e-3 once the gripper touches the scene (contacts amplify a 1e-7 error)."""
    stored = np.array([step["action"] for step in golden["steps"]])
    t = np.array([step["t"] for step in golden["steps"]], dtype=np.float64)
    exact = np.stack(
        [np.sin(t / 7), np.cos(t / 9), -0.5 * np.sin(t / 11), 0.3 * np.sin(t / 5), 0 * t, 0.4 * np.cos(t / 6),
         stored[:, 6]],
        axis=1,
    )
    assert np.array_equal(np.round(exact, 6), stored), "golden actions are not the expected smooth functions"
    return exact


def golden_run(dataset_path: str, golden: dict, n_steps: int = 60) -> Iterator[dict[str, Any]]:
    """A fresh env, reset to sequence 0's initial state, get_obs(), then the first n_steps golden actions (the golden
    file's recipe: a fresh env matters with calvin_env's own reset, which does not clear all simulator state)."""
    env = backend.make_calvin_env(dataset_path, "cpu")
    renderer = env.renderer  # the OpenGL renderer pybullet's EGL plugin printed while loading
    try:
        env.reset(robot_obs=np.array(golden["reset_robot_obs"]), scene_obs=np.array(golden["reset_scene_obs"]))
        first = env.get_obs()
        start_info = env.get_info()
        steps = [env.step(action) for action in golden_actions(golden)[:n_steps]]
        yield {"env": env, "renderer": renderer, "first": first, "start_info": start_info, "steps": steps}
    finally:
        env.close()


def check_golden(run: dict[str, Any], golden: dict) -> None:
    golden = {"steps": golden["steps"][: len(run["steps"])]}
    robot = np.array([obs["robot_obs"] for obs, *_ in run["steps"]])
    scene = np.array([obs["scene_obs"] for obs, *_ in run["steps"]])
    np.testing.assert_allclose(robot, [s["robot_obs"] for s in golden["steps"]], rtol=0, atol=STATE_ATOL)
    np.testing.assert_allclose(scene, [s["scene_obs"] for s in golden["steps"]], rtol=0, atol=STATE_ATOL)
    atol = SAME_RENDERER_ATOL if GOLDEN_RENDERER in run["renderer"] else OTHER_RENDERER_ATOL
    for key in ("rgb_static", "rgb_gripper"):
        means = [obs["rgb_obs"][key].mean() for obs, *_ in run["steps"]]
        np.testing.assert_allclose(means, [s[f"{key}_mean"] for s in golden["steps"]], rtol=0, atol=atol,
                                   err_msg=f"{key} means, renderer {run['renderer']!r}")


@pytest.fixture(scope="module")
def golden() -> dict:
    with open(shared_path("calvin", "golden_rollout_seq0.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def oracle() -> Any:
    return backend.make_calvin_oracle()


@needs_calvin_env
class TestShippedConfig:
    """The env built from the scene-D config shipped in evaluation/ (calvin_dataset_path '')."""

    @pytest.fixture(scope="class")
    def run(self, golden: dict) -> Iterator[dict[str, Any]]:
        yield from golden_run("", golden)

    def test_golden_rollout(self, run: dict[str, Any], golden: dict) -> None:
        check_golden(run, golden)

    def test_golden_oracle(self, run: dict[str, Any], golden: dict, oracle: Any) -> None:
        achieved = [oracle.get_task_info(run["start_info"], info) for *_, info in run["steps"]]
        assert achieved == [set(step["oracle"]) for step in golden["steps"]]

    def test_observation_layout(self, run: dict[str, Any]) -> None:
        obs, reward, done, info = run["steps"][0]
        assert obs["rgb_obs"]["rgb_static"].shape == (200, 200, 3) and obs["rgb_obs"]["rgb_static"].dtype == np.uint8
        assert obs["rgb_obs"]["rgb_gripper"].shape == (84, 84, 3) and obs["rgb_obs"]["rgb_gripper"].dtype == np.uint8
        assert obs["robot_obs"].shape == (15,) and obs["scene_obs"].shape == (24,)
        assert (reward, done) == (0, False)
        assert {"robot_info", "scene_info"} <= set(info)
        assert set(run["env"].get_obs()["rgb_obs"]) == {"rgb_static", "rgb_gripper"}  # no tactile camera

    def test_gripper_is_binarised(self, run: dict[str, Any]) -> None:
        env = run["env"]
        for gripper, expected in ((0.3, 1), (0.0, -1), (-0.01, -1), (2.5, 1)):
            obs, *_ = env.step(np.array([0, 0, 0, 0, 0, 0, gripper]))
            assert obs["robot_obs"][14] == expected

    def test_reset_restores_last_gripper_action(self, run: dict[str, Any], golden: dict) -> None:
        """calvin_env's own reset (eval_reset=reference) restores joints and gripper width but not the commanded
        gripper action reported in robot_obs[14]; the deterministic reset (the default) restores it too."""
        env = run["env"]
        assert env.renderer and env.reset_mode == "deterministic"
        reset = {"robot_obs": np.array(golden["reset_robot_obs"]), "scene_obs": np.array(golden["reset_scene_obs"])}
        for mode, expected in (("reference", -1), ("deterministic", 1)):
            env.reset_mode = mode
            env.step(np.array([0, 0, 0, 0, 0, 0, -1.0]))
            obs = env.reset(**reset)
            np.testing.assert_allclose(obs["robot_obs"][7:14], golden["reset_robot_obs"][7:14], atol=1e-4)
            assert golden["reset_robot_obs"][14] == 1 and obs["robot_obs"][14] == expected, mode


@needs_calvin_env
def test_shipped_config_equals_dataset_config() -> None:
    omegaconf = pytest.importorskip("omegaconf").OmegaConf
    shipped = omegaconf.to_container(backend.load_render_config(""), resolve=True)
    dataset = omegaconf.load(os.path.join(shared_path("calvin", "mini_calvin"), "validation", ".hydra",
                                          "merged_config.yaml"))
    dataset.show_gui = False
    dataset = omegaconf.to_container(dataset, resolve=True)
    assert os.path.isfile(os.path.join(shipped["data_path"], "calvin_table_D", "urdf", "calvin_table_D.urdf"))
    assert shipped["scene"].pop("data_path") == shipped["data_path"]
    assert dataset["scene"].pop("data_path") == "data"  # calvin_env resolves it against its checkout
    for config in (shipped, dataset):  # the env's sub-configs are the sections compared below
        assert config["env"].pop("scene_cfg") == {**config["scene"], "data_path": shipped["data_path"]
                                                   if config is shipped else "data"}
        assert config["env"].pop("robot_cfg") == config["robot"]
        del config["env"]["cameras"]
    for section in ("env", "scene", "robot"):
        assert shipped[section] == dataset[section], section
    assert shipped["cameras"] == {name: dataset["cameras"][name] for name in ("static", "gripper")}


@needs_calvin_env
class TestDatasetConfig:
    """The env built from a dataset folder's validation/.hydra/merged_config.yaml (mini_calvin, scene D)."""

    @pytest.fixture(scope="class")
    def run(self, golden: dict) -> Iterator[dict[str, Any]]:
        # 30 steps (the gripper closes at step 20) keep it short: test_shipped_config_equals_dataset_config and the
        # full rollout of TestShippedConfig cover the rest.
        yield from golden_run(shared_path("calvin", "mini_calvin"), golden, n_steps=30)

    @pytest.fixture(scope="class")
    def frame(self) -> Callable[[int], dict]:
        folder = os.path.join(shared_path("calvin", "mini_calvin"), "validation")
        return lambda i: dict(np.load(os.path.join(folder, f"episode_{i:07d}.npz")))

    def test_golden_rollout(self, run: dict[str, Any], golden: dict) -> None:
        check_golden(run, golden)

    def test_oracle_labels_validation_windows(self, run: dict[str, Any], frame: Callable, oracle: Any) -> None:
        """Each mini_calvin window, re-simulated from its first and last frames' states, is exactly its task;
        reversed, it is the opposite task."""
        env = run["env"]
        annotations = np.load(os.path.join(shared_path("calvin", "mini_calvin"), "validation", "lang_annotations",
                                           "auto_lang_ann.npy"), allow_pickle=True).item()
        opposite = {"turn_on_led": "turn_off_led", "push_blue_block_right": "push_blue_block_left"}
        windows = list(zip(annotations["info"]["indx"], annotations["language"]["task"]))
        assert [task for _, task in windows] == list(opposite)
        for (start, end), task in windows:
            infos = []
            for i in (start, end):
                env.reset(robot_obs=frame(i)["robot_obs"], scene_obs=frame(i)["scene_obs"])
                infos.append(env.get_info())
            assert oracle.get_task_info(infos[0], infos[1]) == {task}
            assert oracle.get_task_info(infos[1], infos[0]) == {opposite[task]}
            assert oracle.get_task_info_for_set(infos[0], infos[1], {task, opposite[task]}) == {task}
            assert oracle.get_task_info_for_set(infos[0], infos[1], {opposite[task]}) == set()

    def test_reset_rerenders_recorded_frame(self, run: dict[str, Any], frame: Callable) -> None:
        """Resetting to a recorded frame's state renders that frame again. Frames 241 and 337 have the arm at rest
        (a moving arm's recorded TCP pose lags its joints by one physics substep, so its gripper view differs by a
        few levels). mini_calvin was rendered by EGL on llvmpipe; with another renderer only states are compared."""
        for i in (241, 337):
            recorded = frame(i)
            obs = run["env"].reset(robot_obs=recorded["robot_obs"], scene_obs=recorded["scene_obs"])
            np.testing.assert_allclose(obs["robot_obs"][:14], recorded["robot_obs"][:14], atol=1e-4)
            # reset takes one physics step: the blocks settle a little
            np.testing.assert_allclose(obs["scene_obs"], recorded["scene_obs"], atol=0.05)
            if GOLDEN_RENDERER in run["renderer"]:
                for key in ("rgb_static", "rgb_gripper"):
                    diff = np.abs(obs["rgb_obs"][key].astype(np.float64) - recorded[key]).mean()
                    assert diff < 0.1, (i, key, diff)


@needs_calvin_env
def test_oracle_has_the_34_evaluation_tasks(oracle: Any) -> None:
    import yaml

    with open(shared_path("calvin", "new_playtable_validation.yaml")) as f:
        instructions = yaml.safe_load(f)
    assert set(oracle.tasks) == set(instructions) and len(oracle.tasks) == 34



class SinePolicy:
    """Actions that depend only on the step since the subtask began: the gripper sweeps down onto the table and the
    blocks (contacts within ~9 steps) and closes at steps 10-19. Records, per subtask, robot_obs and checksums of
    both images; speaks EvalPolicy (one env) and BatchPolicy (env workers; .pool is set by the test)."""

    def __init__(self) -> None:
        self.pool, self.steps = None, defaultdict(int)
        self.traces: dict[Any, list] = {}
        self.key: dict[Any, Any] = {}

    def reset(self, env_id: Any = None) -> None:
        seq = None if env_id is None else self.pool.workers[env_id].seq.index
        self.steps[env_id], self.key[env_id] = 0, (seq, len(self.traces))
        self.traces[self.key[env_id]] = []

    def _action(self, env_id: Any, obs: dict) -> dict:
        t = self.steps[env_id]
        self.steps[env_id] += 1
        images = [zlib.crc32(np.ascontiguousarray(obs["rgb_obs"][k]).tobytes()) for k in ("rgb_static", "rgb_gripper")]
        self.traces[self.key[env_id]].append(np.concatenate([obs["robot_obs"], images]))
        return {"action": np.array([np.sin(t / 7), np.cos(t / 9), -0.6, 0.3 * np.sin(t / 5), 0.0, 0.4 * np.cos(t / 6),
                                    1.0 if (t // 10) % 2 == 0 else -1.0])}

    def step(self, obs: dict, instruction: str) -> dict:
        return self._action(None, obs)

    def act(self, requests: dict) -> dict:
        return {slot: self._action(slot, obs) for slot, (obs, _) in requests.items()}

    def subtask_traces(self) -> list[np.ndarray]:
        """Traces in the order they started (sequential) or by sequence (env workers)."""
        keys = sorted(self.traces, key=lambda k: (k[0] is not None and k[0], k[1]))
        return [np.stack(self.traces[k]) for k in keys]


@needs_calvin_env
def test_deterministic_reset_and_env_workers(tmp_path: Any) -> None:
    """Official sequences 0-2 (ep_len 15, so each fails its first subtask after 15 steps of SinePolicy):
    sequence 2 run first in a fresh env, then after sequences 2, 0 and 1 in the same env, gives the same states and
    images at every step, while calvin_env's own reset (eval_reset=reference) does not; 2 env workers (the policy
    served by this process) give the sequential run's results and traces."""
    from evaluation.backends import EnvSpec, validation_instructions
    from evaluation.pool import EnvPool
    from evaluation.protocol import EvalSequence, evaluate_sequence, run_protocol, run_sharded
    from evaluation.sequences import official_sequences

    seqs = [EvalSequence(s["index"], s["tasks"], s["robot_obs"], s["scene_obs"], s["condition"])
            for s in official_sequences(1000, 0, 3)]
    instructions, ep_len = validation_instructions("calvin"), 15
    oracle = backend.make_calvin_oracle()
    env = backend.make_calvin_env("", "cpu")
    env.renew_every = 3  # the third reset (sequence 1 below) replaces the physics client: the world must not change
    try:
        first = SinePolicy()
        evaluate_sequence(env, oracle, first, seqs[2], instructions, ep_len)
        sequential = SinePolicy()
        run_protocol(env, oracle, sequential, seqs, instructions, ep_len, str(tmp_path / "one"), progress=False)
        after = sequential.subtask_traces()
        np.testing.assert_array_equal(after[2], first.subtask_traces()[0])
        assert np.abs(after[2][-1, :3] - after[2][0, :3]).max() > 0.05  # the arm moved (and touched the scene)

        env.reset_mode = "reference"  # sequence 2 again, right after itself
        plain = SinePolicy()
        evaluate_sequence(env, oracle, plain, seqs[2], instructions, ep_len)
        assert not np.array_equal(plain.subtask_traces()[0], after[2])  # calvin_env's reset keeps state
    finally:
        env.close()

    pooled = SinePolicy()  # 2 workers: one of them runs 2 sequences
    with EnvPool(2, EnvSpec(backend="calvin"), pooled, instructions, ep_len) as pool:
        pooled.pool = pool
        run_sharded(pool.evaluate, seqs, str(tmp_path / "three"), progress=False)
    assert open(tmp_path / "three" / "sequences.jsonl").read() == open(tmp_path / "one" / "sequences.jsonl").read()
    for a, b in zip(pooled.subtask_traces(), after, strict=True):
        np.testing.assert_array_equal(a, b)

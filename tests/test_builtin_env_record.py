"""The demonstration recorder writes CALVIN's raw split layout (keys, shapes, dtypes and meaning as calvin_env's
datarenderer and CALVIN's annotator; see ../shared/reference/CALVIN.md section 3), so calvin2lmdb.py converts it
unchanged. One small recording is shared by the tests of this module."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml

from evaluation.builtin_env.env import BuiltinEnv
from evaluation.builtin_env.record import main, record_dataset, to_relative_action
from evaluation.builtin_env.tasks import TASK_NAMES, TRAINING_INSTRUCTIONS, BuiltinTaskOracle

# CALVIN's frame file: key -> (shape, dtype)
FRAME_LAYOUT = {
    "actions": ((7,), np.float64), "rel_actions": ((7,), np.float64),
    "robot_obs": ((15,), np.float64), "scene_obs": ((24,), np.float64),
    "rgb_static": ((200, 200, 3), np.uint8), "rgb_gripper": ((84, 84, 3), np.uint8),
    "rgb_tactile": ((160, 120, 6), np.uint8),
    "depth_static": ((200, 200), np.float32), "depth_gripper": ((84, 84), np.float32),
    "depth_tactile": ((160, 120, 2), np.float32),
}


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("builtin_demos"))
    main(["--output_dir", root, "--episodes", "1", "--val_episodes", "1", "--tasks_per_episode", "2",
          "--seed", "5"])
    return root


def _frame(split_dir: str, frame_id: int) -> dict[str, np.ndarray]:
    with np.load(os.path.join(split_dir, f"episode_{frame_id:07d}.npz")) as f:
        return {key: f[key] for key in f.files}


def _episodes(split_dir: str) -> np.ndarray:
    return np.load(os.path.join(split_dir, "ep_start_end_ids.npy"))


def test_split_layout(recording: str) -> None:
    next_id = 0
    for split in ("training", "validation"):
        split_dir = os.path.join(recording, split)
        episodes = _episodes(split_dir)
        lens = np.load(os.path.join(split_dir, "ep_lens.npy"))
        assert episodes.dtype == np.int64 and episodes.shape == (1, 2)
        assert lens.dtype == np.int64 and list(lens) == [episodes[0, 1] - episodes[0, 0] + 1]
        assert episodes[0, 0] == next_id  # global, contiguous frame ids: training first, then validation
        frame_ids = sorted(int(n[8:15]) for n in os.listdir(split_dir) if n.startswith("episode_"))
        assert frame_ids == list(range(episodes[0, 0], episodes[0, 1] + 1))
        next_id = episodes[0, 1] + 1
        scene_info = np.load(os.path.join(split_dir, "scene_info.npy"), allow_pickle=True).item()
        assert scene_info == {"builtin_scene": [int(episodes[0, 0]), int(episodes[0, 1])]}
        with open(os.path.join(split_dir, "statistics.yaml")) as f:
            stats = yaml.safe_load(f)
        assert len(stats["robot_obs"][0]["mean"]) == 15 and len(stats["scene_obs"][0]["std"]) == 24
        assert min(stats["scene_obs"][0]["std"]) > 0 and len(stats["act_min_bound"]) == 7
        assert stats["act_min_bound"][6] == -1.0 and stats["act_max_bound"][6] == 1.0
    embeddings = np.load(os.path.join(recording, "validation", "lang_annotations", "embeddings.npy"),
                         allow_pickle=True).item()
    assert set(embeddings) == set(TASK_NAMES)
    assert embeddings["turn_on_led"]["emb"].shape == (1, 1, 384)
    assert embeddings["turn_on_led"]["ann"] == ["press the button to turn on the led light"]
    manifest = json.load(open(os.path.join(recording, "manifest.json")))
    assert manifest["splits"]["training"]["windows"] == 2


def test_frame_files_have_calvins_keys_and_meaning(recording: str) -> None:
    split_dir = os.path.join(recording, "training")
    first, last = _episodes(split_dir)[0]
    frames = [_frame(split_dir, i) for i in range(first, last + 1)]
    for frame in frames:
        assert set(frame) == set(FRAME_LAYOUT)
        for key, (shape, dtype) in FRAME_LAYOUT.items():
            assert frame[key].shape == shape and frame[key].dtype == dtype, key
        assert not frame["rgb_tactile"].any() and not frame["depth_tactile"].any()
        np.testing.assert_array_equal(frame["rel_actions"], to_relative_action(frame["actions"], frame["robot_obs"]))
        assert np.all(np.abs(frame["rel_actions"]) <= 1.0) and frame["actions"][6] in (-1.0, 1.0)
    for current, following in zip(frames, frames[1:]):  # actions = the next frame's TCP pose and gripper action
        np.testing.assert_array_equal(current["actions"][:6], following["robot_obs"][:6])
        assert current["actions"][6] == following["robot_obs"][14]
    depth = frames[0]["depth_static"]  # metres; the background (sky) is at the far plane, 10 m
    assert 0.3 < depth.min() < 1.5 and depth.max() < 10.01


def test_language_windows(recording: str) -> None:
    for split in ("training", "validation"):
        split_dir = os.path.join(recording, split)
        lang = np.load(os.path.join(split_dir, "lang_annotations", "auto_lang_ann.npy"), allow_pickle=True).item()
        assert lang["info"]["episodes"] == []
        indx, anns, tasks = lang["info"]["indx"], lang["language"]["ann"], lang["language"]["task"]
        assert len(indx) == len(anns) == len(tasks) == 2
        assert lang["language"]["emb"].shape == (2, 1, 384) and lang["language"]["emb"].dtype == np.float32
        first, last = _episodes(split_dir)[0]
        assert indx[0][0] == first and indx[-1][1] == last
        for (start, end), ann, task in zip(indx, anns, tasks):
            assert isinstance(start, int) and isinstance(end, int) and first <= start < end <= last
            assert ann in TRAINING_INSTRUCTIONS[task]
            for frame_id in range(start, end + 1):  # GR1-Training's calvin2lmdb reads start..end inclusive
                assert os.path.exists(os.path.join(split_dir, f"episode_{frame_id:07d}.npz"))


def test_recorded_window_replays(recording: str) -> None:
    """Replaying a window's rel_actions from its first frame's state achieves its task again."""
    split_dir = os.path.join(recording, "training")
    lang = np.load(os.path.join(split_dir, "lang_annotations", "auto_lang_ann.npy"), allow_pickle=True).item()
    (start, end), task = lang["info"]["indx"][0], lang["language"]["task"][0]
    frames = [_frame(split_dir, i) for i in range(start, end + 1)]
    with BuiltinEnv(render=False) as env:
        env.reset(frames[0]["robot_obs"], frames[0]["scene_obs"])
        start_info = env.get_info()
        achieved = set()
        for frame in frames:
            achieved |= BuiltinTaskOracle().get_task_info_for_set(start_info, env.step(frame["rel_actions"])[3],
                                                                  {task})
    assert achieved == {task}


def test_recording_does_not_depend_on_workers(tmp_path: str) -> None:
    tasks = ("turn_on_led", "turn_off_led")
    one = record_dataset(os.path.join(tmp_path, "one"), 1, 1, seed=1, tasks_per_episode=1, tasks=tasks, workers=1)
    two = record_dataset(os.path.join(tmp_path, "two"), 1, 1, seed=1, tasks_per_episode=1, tasks=tasks, workers=2)
    assert one["episodes"] == two["episodes"]
    last = two["splits"]["validation"]["frame_ids"][1]
    for frame_id in (0, last):
        split = "training" if frame_id == 0 else "validation"
        a = _frame(os.path.join(tmp_path, "one", split), frame_id)
        b = _frame(os.path.join(tmp_path, "two", split), frame_id)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(FileExistsError):
        record_dataset(os.path.join(tmp_path, "one"), 1, 1)


def test_matches_mini_calvin_layout(recording: str) -> None:
    """Same keys, shapes and dtypes as a frame and an annotation file of the real simulator's mini_calvin."""
    from conftest import shared_path

    mini = shared_path("calvin", "mini_calvin", "training")
    reference = _frame(mini, 0)
    ours = _frame(os.path.join(recording, "training"), 0)
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in reference.items()}
    ref_lang = np.load(os.path.join(mini, "lang_annotations", "auto_lang_ann.npy"), allow_pickle=True).item()
    our_lang = np.load(os.path.join(recording, "training", "lang_annotations", "auto_lang_ann.npy"),
                       allow_pickle=True).item()
    assert {k: set(v) for k, v in our_lang.items()} == {k: set(v) for k, v in ref_lang.items()}
    assert type(our_lang["info"]["indx"][0]) is type(ref_lang["info"]["indx"][0])
    for name in ("ep_start_end_ids.npy", "ep_lens.npy"):
        assert np.load(os.path.join(recording, "training", name)).dtype == np.load(os.path.join(mini, name)).dtype
    with open(os.path.join(mini, "statistics.yaml")) as f:
        ref_stats = yaml.safe_load(f)
    with open(os.path.join(recording, "training", "statistics.yaml")) as f:
        our_stats = yaml.safe_load(f)
    assert set(our_stats) == set(ref_stats)
    assert our_stats["robot_obs"][0]["_target_"] == ref_stats["robot_obs"][0]["_target_"]


def test_recorded_demos_convert_with_calvin2lmdb_and_load_in_the_dataset(recording: str, tmp_path) -> None:
    import subprocess
    import sys

    from config import load_config
    from conftest import ROOT
    from data.lmdb_dataset import make_datasets
    lmdb_dir = str(tmp_path / "lmdb")
    subprocess.run([sys.executable, "calvin2lmdb.py", "--input_dir", recording, "--output_dir", lmdb_dir,
                    "--no_progress"], cwd=ROOT, check=True, capture_output=True)
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.json"), [f"LMDB_path={lmdb_dir}", "split=calvin"])
    train, val = make_datasets(cfg)
    windows = json.load(open(os.path.join(recording, "manifest.json")))["splits"]
    assert len(train) > 0 and len(val) > 0 and windows["training"]["windows"] == 2
    item = train[0]
    T, K = cfg.seq_len, cfg.chunk_size
    assert item["rgb_static"].shape == (T, 3, 200, 200) and item["rgb_gripper"].shape == (T, 3, 84, 84)
    assert item["actions"].shape == (T, K, 7) and set(item["actions"][..., 6].unique().tolist()) <= {0.0, 1.0}
    first = _frame(os.path.join(recording, "training"), 0)
    assert np.array_equal(item["rgb_static"][0].permute(1, 2, 0).numpy().shape, first["rgb_static"].shape)
    np.testing.assert_allclose(item["arm_state"][0].numpy(), first["robot_obs"][:6], rtol=0, atol=1e-6)


def test_validation_annotations_option(tmp_path) -> None:
    from evaluation.builtin_env.tasks import validation_annotations
    manifest = record_dataset(str(tmp_path), 1, 1, seed=5, tasks_per_episode=2, annotations="validation")
    sentences = {s[0] for s in validation_annotations().values()}
    assert all(a in sentences for ep in manifest["episodes"] for a in ep["annotations"])
    with pytest.raises(ValueError, match="annotations"):
        record_dataset(str(tmp_path / "x"), 1, 1, annotations="paraphrase")

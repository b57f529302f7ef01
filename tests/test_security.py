"""Nothing the project reads runs code from it. Crafted LMDB values (every kind the loader reads) and crafted weight
files in every place one is read (ckpt_path, save_path/GR1_<n>.pth, mae_ckpt, clip_ckpt, the Bytedance snapshot, the
training state) are refused with a one-line error naming the file (and the key); the marker file that the crafted
pickle would create never appears. Unloadable files are one-line errors too."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from config import Config
from conftest import ROOT
from crafted import Run, crafted_pth, crafted_values, put_value, replace_zip_entry
from data.lmdb_dataset import make_datasets
from data.lmdb_reader import DatasetError, close_lmdb
from data_helpers import copy_lmdb, mini_lmdb  # noqa: F401 (fixture)
from models.build import build_encoders, build_model
from models.encoders import CLIPTextEncoder
from models.files import CheckpointError, load_file, read_torchscript_tensors
from training.state import FORMAT, TrainState, read_training_state

TINY = os.path.join(ROOT, "configs", "tiny.json")


def _tiny(**changes) -> Config:
    from config import load_config
    return load_config(TINY).replace(**changes)


def _one_line(error: BaseException, *needles: str) -> None:
    text = str(error)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, text


# ---------------------------------------------------------------- LMDB values

@pytest.mark.parametrize("key", ["cur_step", "cur_episode_5", "robot_obs_0", "rel_action_0", "inst_token_0",
                                 "rgb_static_0", "rgb_gripper_0"])
def test_crafted_lmdb_values_run_no_code(mini_lmdb, tmp_path, key):
    path = copy_lmdb(mini_lmdb, str(tmp_path / "lmdb"))
    marker = tmp_path / "pwned"
    kind = "value" if key.startswith("cur_") else "blob_magic"  # a plain pickle, or inside a tensor's storage
    put_value(path, key, crafted_values(str(marker), 77 if key.startswith("inst") else 7)[kind])
    try:
        with pytest.raises(DatasetError) as error:
            train, _ = make_datasets(_tiny(LMDB_path=path))
            train[0]  # the window at step 0 reads every per-step kind of step 0 and instruction 0
    finally:
        close_lmdb(path)
    _one_line(error.value, path, f"key {key}")
    assert not marker.exists()


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, script, "--config", TINY, *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=300)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_training_on_a_crafted_lmdb_is_a_one_line_error(mini_lmdb, tmp_path):
    path = copy_lmdb(mini_lmdb, str(tmp_path / "lmdb"))
    marker = tmp_path / "pwned"
    for episode in range(6):  # every window reads its instruction's tokens
        put_value(path, f"inst_token_{episode}", crafted_values(str(marker), 77)["blob_sys_info"])
    proc = _run("Main.py", f"LMDB_path={path}", f"save_path={tmp_path / 'run'}")
    _assert_one_line_error(proc, "key inst_token_", "unsupported pickle global posix.system")
    assert not marker.exists()


# ---------------------------------------------------------------- weight files

def _state_dir(path, cfg: Config, crafted: str, marker: str) -> str:
    """A training state folder whose file `crafted` is a crafted torch file (the others are plausible)."""
    os.makedirs(path)
    run = {"format": FORMAT, "train": dataclasses.asdict(TrainState()), "scheduler": {}, "scaler": None,
           "num_processes": 1, "lmdb": "fp", "config": cfg.to_dict()}
    with open(os.path.join(path, "run.json"), "w") as f:
        json.dump(run, f)
    with open(os.path.join(path, "rng_0.json"), "w") as f:
        json.dump({"python": [], "numpy": []}, f)
    for name in ("model.pt", "optimizer.pt", "rng_0.pt"):
        if name == crafted:
            crafted_pth(os.path.join(path, name), marker)
        else:
            torch.save({"torch": torch.zeros(1)}, os.path.join(path, name))
    return path


@pytest.mark.parametrize("place", ["ckpt_path", "GR1_0.pth", "load_epoch", "bytedance", "mae_ckpt", "clip_ckpt",
                                   "clip_ckpt_legacy", "state/model.pt", "state/optimizer.pt", "state/rng_0.pt"])
def test_crafted_weight_files_run_no_code(tmp_path, place):
    marker = str(tmp_path / "pwned")
    evil = crafted_pth(str(tmp_path / "evil.pth"), marker, legacy=place.endswith("legacy"))
    cfg = _tiny(save_path=str(tmp_path))
    with pytest.raises(CheckpointError) as error, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if place.startswith("state/"):
            state = _state_dir(str(tmp_path / "state"), cfg, place.split("/")[1], marker)
            read_training_state(state, cfg, 1, 0, "fp")
        elif place.startswith(("mae", "clip")):
            build_encoders(cfg.replace(**{place.replace("_legacy", ""): evil}))
        else:
            if place in ("GR1_0.pth", "load_epoch"):  # found by the naming rule, as training does automatically
                os.replace(evil, tmp_path / ("GR1_0.pth" if place == "GR1_0.pth" else "GR1_3.pth"))
            changes = {"ckpt_path": {"ckpt_path": evil}, "bytedance": {"load_bytedance_ckpt": True,
                                                                        "bytedance_ckpt_path": evil},
                       "load_epoch": {"load_epoch": 3}}.get(place, {})
            build_model(cfg.replace(**changes))
    _one_line(error.value, "posix.system", "nothing in the file was run")
    assert not os.path.exists(marker)


def test_evaluation_refuses_a_crafted_checkpoint(tmp_path):
    """The evaluation entry point (it exited 0 after running the file's code). Training's automatic load of
    save_path/GR1_<n>.pth is the same loader (test_crafted_weight_files_run_no_code; the entry point's one-line
    report of checkpoint errors: test_training.py::test_wrong_shape_checkpoint_fails_before_training)."""
    marker = tmp_path / "pwned"
    crafted_pth(str(tmp_path / "GR1_0.pth"), str(marker))
    proc = _run("evaluate_calvin.py", f"ckpt_path={tmp_path / 'GR1_0.pth'}", f"save_path={tmp_path}")
    _assert_one_line_error(proc, "GR1_0.pth", "posix.system")
    assert not marker.exists()


def test_unloadable_files_are_one_line_errors(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, good)
    data = good.read_bytes()
    cases = {"empty.pth": (b"", "empty"), "truncated.pth": (data[:len(data) // 2], "truncated"),
             "garbage.pth": (b"not a torch file " * 20, "not a torch weights file"),
             "pickle.pth": (pickle.dumps({"w": [1, 2]}), "not a torch weights file")}
    for name, (content, reason) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError) as error:
            load_file(str(tmp_path / name))
        _one_line(error.value, name, reason)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_file(str(tmp_path / "nowhere.pth"))
    state = tmp_path / "state"
    state.mkdir()
    (state / "run.json").write_text("{not json")
    with pytest.raises(CheckpointError) as error:
        read_training_state(str(state), Config(), 1, 0, "fp")
    _one_line(error.value, "run.json")


# ---------------------------------------------------------------- CLIP's TorchScript archive, read as data

class FakeCLIP(nn.Module):
    """OpenAI CLIP's layout: the text tower beside a visual tower, logit_scale and an int buffer."""

    def __init__(self):
        super().__init__()
        text = CLIPTextEncoder(16, 16, 1, 2)
        self.transformer, self.token_embedding, self.ln_final = text.transformer, text.token_embedding, text.ln_final
        self.positional_embedding, self.text_projection = text.positional_embedding, text.text_projection
        self.visual = nn.Linear(3, 3)
        self.logit_scale = nn.Parameter(torch.ones([]))
        self.register_buffer("context_length", torch.tensor(77))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.ln_final(self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2))
        return x[:, 0] @ self.text_projection * self.logit_scale + self.visual(x[:, 0, :3]).sum()


class Scriptable(nn.Module):
    """A scripted module keeps tensor attributes in its archive; state_dict() (and our reader) leaves them out."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.ones(2))
        self.register_buffer("count", torch.tensor(3))
        self.mask = torch.ones(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.scale * self.mask + self.count


@pytest.fixture(scope="module")
def clip_archives(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    model = FakeCLIP()
    paths = {"traced": str(folder / "traced.pt"), "scripted": str(folder / "scripted.pt")}
    torch.jit.trace(model, torch.zeros(1, 77, dtype=torch.long)).half().save(paths["traced"])  # OpenAI's is fp16
    torch.jit.script(Scriptable()).save(paths["scripted"])
    return paths


@pytest.mark.parametrize("kind", ["traced", "scripted"])
def test_torchscript_archive_reads_as_its_state_dict(clip_archives, kind, monkeypatch):
    path = clip_archives[kind]
    expected = torch.jit.load(path).state_dict()  # our own archive, trusted here
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load must not be used"))
    ours = read_torchscript_tensors(path)
    assert list(ours) == list(expected) and "mask" not in ours
    for k, v in expected.items():
        assert ours[k].dtype == v.dtype and torch.equal(ours[k], v), k
    if kind == "scripted":
        return
    cfg = _tiny(clip_ckpt=path, lang_feat_dim=16, clip_text_width=16, clip_text_layers=1, clip_text_heads=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoders = build_encoders(cfg)
    for k, v in encoders.clip_text.state_dict().items():
        assert torch.equal(v, expected[k].float()), k


def test_crafted_torchscript_archive_runs_no_code(clip_archives, tmp_path):
    marker = tmp_path / "pwned"
    evil = replace_zip_entry(clip_archives["traced"], str(tmp_path / "evil.pt"), "/data.pkl",
                             pickle.dumps(Run(f"touch {marker}"), protocol=2))
    with pytest.raises(CheckpointError) as error:
        build_encoders(_tiny(clip_ckpt=evil))
    _one_line(error.value, "evil.pt", "posix.system")
    assert not marker.exists()


def test_extra_globals_are_allowed_per_file_kind_only(tmp_path):
    """A Bytedance-era snapshot may hold numpy scalar counters and the run's argparse.Namespace: allowed for that
    kind of file (by name, models/files.py SAFE_GLOBALS), refused for our checkpoints."""
    import argparse

    import numpy as np
    path = str(tmp_path / "snapshot.pt")
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": np.int64(3), "args": argparse.Namespace(lr=1e-3)}, path)
    assert load_file(path, "bytedance")["epoch"] == 3
    with pytest.raises(CheckpointError, match="numpy"):
        load_file(path)


def test_a_crafted_language_annotation_file_runs_no_code(tmp_path):
    """calvin2lmdb reads each split's lang_annotations/auto_lang_ann.npy, a pickled dict: np.load(allow_pickle=True)
    would run what a crafted file names; only numpy arrays, scalars and plain data are read."""
    from data import calvin_format as cf
    marker = tmp_path / "ran"
    folder = tmp_path / "training" / "lang_annotations"
    folder.mkdir(parents=True)
    np.save(folder / "auto_lang_ann.npy", np.array(Run(f"touch {marker}"), dtype=object), allow_pickle=True)
    with pytest.raises(cf.CalvinFormatError, match="os.system|posix.system"):
        cf.load_segments(str(tmp_path / "training"), "training")
    assert not marker.exists()
    # A genuine file: numpy arrays and numpy integers inside plain dicts, lists and tuples, as CALVIN's
    genuine = {"language": {"ann": ["push the block"], "task": ["push"], "emb": np.ones((1, 1, 4), np.float32)},
               "info": {"episodes": [], "indx": [(np.int64(3), np.int64(9))]}}
    np.save(folder / "auto_lang_ann.npy", genuine, allow_pickle=True)
    read = cf.read_object_npy(str(folder / "auto_lang_ann.npy"))
    assert read["info"]["indx"] == [(3, 9)] and np.array_equal(read["language"]["emb"], genuine["language"]["emb"])
    assert cf.load_segments(str(tmp_path / "training"), "training") == [cf.Segment("training", 3, 9, "push the block")]


def test_a_crafted_calvin_rendering_config_is_not_instantiated():
    """eval_backend=calvin instantiates <calvin_dataset_path>/validation/.hydra/merged_config.yaml with hydra, which
    calls whatever a `_target_` names: only calvin_env classes pass."""
    from evaluation.calvin_env import check_targets
    genuine = {"env": {"_target_": "calvin_env.envs.play_table_env.PlayTableSimEnv"},
               "cameras": {"static": {"_target_": "calvin_env.camera.static_camera.StaticCamera", "fov": 10}},
               "robot": [{"_target_": "calvin_env.robot.robot.Robot"}]}
    check_targets(genuine, "merged_config.yaml")
    crafted = {**genuine, "scene": {"objects": [{"_target_": "os.system", "command": "touch x"}]}}
    with pytest.raises(ValueError, match="merged_config.yaml: _target_ 'os.system' is not a calvin_env"):
        check_targets(crafted, "merged_config.yaml")

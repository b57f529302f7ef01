"""Checkpoints describe themselves: evaluate_calvin.py and fine-tuning rebuild the model from a checkpoint's saved
config, without --config, and an explicit key that contradicts the checkpoint is a one-line error. Training logs go
through accelerate's trackers and training_curves.png is drawn."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from config import ConfigError, adopt_checkpoint_config, load_config
from conftest import ROOT
from data_helpers import mini_lmdb  # noqa: F401 (session fixture)

TINY = os.path.join(ROOT, "configs", "tiny.json")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mini_lmdb):  # noqa: F811
    """The tiny config trained for 2 optimiser steps (one epoch of 2 large batches) by Main.py."""
    save = str(tmp_path_factory.mktemp("run"))
    proc = _run("Main.py", "--config", TINY, f"LMDB_path={mini_lmdb}", f"save_path={save}", "num_epochs=1",
                "bs_per_gpu=96", "print_steps=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(open(os.path.join(save, "metrics.jsonl")).readlines()[-1])["update"] == 2
    return os.path.join(save, "GR1_1.pth")


def test_training_logs_through_the_trackers_and_draws_its_curves(trained):
    from PIL import Image
    save = os.path.dirname(trained)
    events = [f for _, _, files in os.walk(os.path.join(save, "logs", "gr1")) for f in files
              if f.startswith("events.out.tfevents")]
    assert events, "no TensorBoard event file from accelerate's tracker"
    with Image.open(os.path.join(save, "training_curves.png")) as image:
        image.verify()
    with Image.open(os.path.join(save, "training_curves.png")) as image:
        assert image.size == (1280, 600) and image.mode in ("RGB", "RGBA")


def test_fine_tuning_from_a_checkpoint_needs_no_config(trained, mini_lmdb, tmp_path):  # noqa: F811
    """Main.py ckpt_path=<tiny checkpoint> with the default configs.json: the tiny architecture comes from the file;
    training keys (here bs_per_gpu, num_epochs) from the command line and configs.json."""
    save = str(tmp_path / "finetune")
    proc = _run("Main.py", f"ckpt_path={trained}", f"LMDB_path={mini_lmdb}", f"save_path={save}", "num_epochs=1",
                "bs_per_gpu=96", "gradient_accumulation_steps=1", "workers_per_gpu=0", "log_with=none",
                "evaluate_during_training=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_config(os.path.join(save, "config.json")).embed_dim == 32
    assert not os.path.isdir(os.path.join(save, "logs"))  # log_with=none: no tracker
    bad = _run("Main.py", f"ckpt_path={trained}", f"LMDB_path={mini_lmdb}", f"save_path={save}", "n_layer=3")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "n_layer=3" in bad.stderr


def test_an_unknown_tracker_is_a_one_line_error(mini_lmdb, tmp_path):  # noqa: F811
    proc = _run("Main.py", "--config", TINY, f"LMDB_path={mini_lmdb}", f"save_path={tmp_path}", "log_with=tensorbord")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "unknown tracker 'tensorbord'" in proc.stderr


def test_evaluate_calvin_needs_only_the_checkpoint(trained, tmp_path):
    """No --config: configs.json (full size) gives the evaluation keys; the architecture and the random encoders
    the tiny model was trained on come from the checkpoint."""
    out = tmp_path / "eval"
    proc = _run("evaluate_calvin.py", f"ckpt_path={trained}", f"eval_dir={out}", "num_sequences=1", "ep_len=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = load_config(str(out / "config.json"))
    assert (saved.embed_dim, saved.seq_len, saved.mae_ckpt) == (32, 4, "")
    assert saved.num_sequences == 1 and saved.ep_len == 3


def test_a_contradicting_key_is_a_one_line_error(trained, tmp_path):
    proc = _run("evaluate_calvin.py", f"ckpt_path={trained}", f"eval_dir={tmp_path}", "seq_len=5")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "seq_len=5" in lines[0] and "seq_len=4" in lines[0] and trained in lines[0], lines


def test_adopting_a_saved_config():
    cfg, tiny = load_config(None), load_config(TINY)
    saved = tiny.to_dict()
    adopted = adopt_checkpoint_config(cfg, saved, frozenset({"ep_len", "embed_dim"} - {"embed_dim"}), "x.pth")
    assert (adopted.embed_dim, adopted.rgb_shape, adopted.mae_ckpt, adopted.clip_ckpt) == (32, 32, "", "")
    assert adopted.ep_len == cfg.ep_len and adopted.bs_per_gpu == cfg.bs_per_gpu  # not architecture keys
    explicit_mae = adopt_checkpoint_config(cfg, saved, frozenset({"mae_ckpt"}), "x.pth")
    assert explicit_mae.mae_ckpt == cfg.mae_ckpt  # an explicit weights file wins over the random encoder
    assert adopt_checkpoint_config(tiny, saved, frozenset({"embed_dim"}), "x.pth").embed_dim == 32  # agrees: fine
    with pytest.raises(ConfigError, match=r"embed_dim=384 was given, but x.pth was trained with embed_dim=32"):
        adopt_checkpoint_config(cfg, saved, frozenset({"embed_dim"}), "x.pth")
    # The demo's checkpoint: seq_len 3 fits configs.json's skip_frame 3 only with the checkpoint's skip_frame too
    demo = {**saved, "seq_len": 3, "skip_frame": 2}
    assert adopt_checkpoint_config(cfg, demo, frozenset(), "x.pth").skip_frame == 2
    given = adopt_checkpoint_config(cfg.replace(skip_frame=1), demo, frozenset({"skip_frame"}), "x.pth")
    assert given.skip_frame == 1  # given explicitly: it may differ from the checkpoint's

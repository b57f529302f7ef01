"""Main.py end to end on the mini_calvin LMDB with the tiny config: the loss goes down, two CPU processes (gloo)
train and save, a run killed after a save resumes exactly, the checkpoint loads strictly in the evaluation builder,
and bad input fails with a one-line message before training starts."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from config import load_config
from conftest import DEVICES, ROOT, shared_path
from helpers import free_port
from models.build import build_model, load_file
from training.logs import read_metrics

TINY = os.path.join(ROOT, "configs", "tiny.json")


@pytest.fixture(scope="module")
def lmdb_path(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lmdb") / "mini_calvin")
    subprocess.run([sys.executable, "calvin2lmdb.py", "--input_dir", shared_path("calvin", "mini_calvin"),
                    "--output_dir", out, "--no_progress"], cwd=ROOT, check=True, capture_output=True)
    return out


def train_cmd(lmdb: str, save: str, *overrides: str, processes: int = 1) -> list[str]:
    # accelerate's --cpu flag starts one process unless MPI is set up; --multi_gpu starts torchrun workers, which
    # Main.py runs on CPU with gloo when there is no CUDA
    launcher = ([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                 str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                 "--main_process_port", str(free_port())] if processes > 1 else [sys.executable])
    return launcher + ["Main.py", "--config", TINY, f"LMDB_path={lmdb}", f"save_path={save}", *overrides]


def train_env(device: str = "") -> dict[str, str]:
    """The training processes' environment; device 'cpu' hides any GPU (Main.py trains on CUDA where it exists)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return {**env, "CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else env


def run_training(*args, device: str = "", **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_cmd(*args, **kwargs), cwd=ROOT, capture_output=True, text=True,
                          env=train_env(device), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(save: str) -> list[dict]:
    with open(os.path.join(save, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_training_lowers_the_loss_and_saves_a_loadable_checkpoint(lmdb_path, tmp_path):
    save = str(tmp_path / "run")
    run_training(lmdb_path, save, "num_epochs=1", "print_steps=10", "evaluate_during_training=true",
                 "num_sequences=2", "ep_len=3")
    logged = metrics(save)
    assert len(logged) >= 5
    first, last = logged[0]["train/total"], min(r["train/total"] for r in logged[-2:])
    assert last < 0.8 * first, f"training loss did not go down: {first:.3f} -> {last:.3f}"
    assert all(k in logged[0] for k in ("lr", "samples_per_s", "data_loading_share", "val/total"))
    assert os.path.isdir(os.path.join(save, "logs")) and os.listdir(os.path.join(save, "logs"))
    assert load_config(os.path.join(save, "config.json")).LMDB_path == lmdb_path
    ckpt = load_file(os.path.join(save, "GR1_1.pth"))
    assert not any(k.startswith(("model_mae", "model_clip")) for k in ckpt["state_dict"])
    cfg = load_config(TINY)
    _, gr1, report = build_model(cfg, "cpu", weights=os.path.join(save, "GR1_1.pth"))
    assert report.format == "gr1-training"
    assert torch.equal(gr1.state_dict()["embed_lang.weight"], ckpt["state_dict"]["embed_lang.weight"])
    # evaluate_during_training ran the evaluation module on the saved weights
    result = json.load(open(os.path.join(save, "eval", "epoch_1", "result.txt")))["null"]
    assert set(result) == {"avg_seq_len", "chain_sr", "task_info"}
    assert len(open(os.path.join(save, "eval", "epoch_1", "success_rate.txt")).read().splitlines()) == 2


def test_two_cpu_processes_train_and_save_one_checkpoint(lmdb_path, tmp_path):
    save = str(tmp_path / "ddp")
    proc = run_training(lmdb_path, save, "num_epochs=1", "print_steps=10", processes=2)
    assert os.path.isfile(os.path.join(save, "GR1_1.pth"))
    assert proc.stdout.count("done:") == 1  # printed by the main process only
    from data.lmdb_dataset import make_datasets
    train_set, _ = make_datasets(load_config(TINY, [f"LMDB_path={lmdb_path}"]))
    # each process trains on its own half of the windows
    assert metrics(save)[-1]["batches"] == len(train_set) // 2 // load_config(TINY).bs_per_gpu
    state = os.path.join(save, "state")
    assert {"rng_0.pt", "rng_0.json", "rng_1.pt", "rng_1.json", "model.pt", "optimizer.pt", "run.json"} <= set(
        os.listdir(state)) and not any(name.endswith(".pkl") for name in os.listdir(state))


def _final_weights(save: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(save, "state", "model.pt"))


@pytest.mark.parametrize("device", DEVICES)
def test_killed_run_resumes_exactly(lmdb_path, tmp_path, device):
    """SIGKILL after the state of update 8 was saved; the resumed run matches an uninterrupted one exactly. On CUDA
    (`pytest -m cuda`: bf16, pinned memory and the prefetcher's side stream, fused AdamW) the steps are fast, so the
    runs are longer, to leave time for the kill."""
    steps = 16 if device == "cpu" else 40
    common = ("num_epochs=1", "print_steps=1", "save_steps=4", f"max_train_steps={steps}")
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    run_training(lmdb_path, full, *common, device=device)

    proc = subprocess.Popen(train_cmd(lmdb_path, killed, *common), cwd=ROOT, env=train_env(device),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        path = os.path.join(killed, "metrics.jsonl")
        if os.path.isfile(path) and any(r["batches"] >= 9 for r in read_metrics(path)):  # skips a line being written
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    run_training(lmdb_path, killed, *common, "resume=true", device=device)

    by_batch = {r["batches"]: r["train/total"] for r in metrics(full)}
    resumed = {r["batches"]: r["train/total"] for r in metrics(killed)}  # later records win
    assert max(resumed) == steps
    for b in range(9, steps + 1):
        assert resumed[b] == by_batch[b], f"batch {b}: {resumed[b]} != {by_batch[b]}"
    a, b = _final_weights(full), _final_weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("override, message", [
    ("LMDB_path=/nonexistent/lmdb", "/nonexistent/lmdb"),
    ("bs_per_gpu=ten", "'bs_per_gpu' must be an integer"),
    ("bs_per_gpus=4", "did you mean 'bs_per_gpu'"),
])
def test_bad_input_is_a_one_line_error(lmdb_path, tmp_path, override, message):
    cmd = [sys.executable, "Main.py", "--config", TINY, f"LMDB_path={lmdb_path}", f"save_path={tmp_path}", override]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_wrong_shape_checkpoint_fails_before_training(lmdb_path, tmp_path):
    save = tmp_path / "run"
    save.mkdir()
    torch.save({"state_dict": {"embed_lang.weight": torch.zeros(3, 3)}}, save / "GR1_0.pth")
    cmd = [sys.executable, "Main.py", "--config", TINY, f"LMDB_path={lmdb_path}", f"save_path={save}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "error:" in proc.stderr and "GR1_0.pth" in proc.stderr
    assert "embed_lang.weight: file (3, 3)" in proc.stderr
    assert not (save / "metrics.jsonl").exists()

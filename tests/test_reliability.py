"""Runs that survive interruptions and careless input: exact resume over many steps, resume refused for another run,
NaN caught in conversion and in training (nothing corrupt saved), SIGTERM handled like SIGINT and no process left
behind, one-line errors for bad settings and outputs."""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

import data_helpers as helpers
import Main
from config import ConfigError, from_dict, load_config
from conftest import ROOT
from crafted import put_value
from data import calvin_format as cf
from data.codec import dumps_value
from data.convert import ConversionError, convert
from data.lmdb_dataset import make_datasets
from data.lmdb_reader import DatasetError, close_lmdb
from data.loader import EpochSampler
from data_helpers import mini_lmdb  # noqa: F401 (fixture)
from helpers import free_port
from models.build import build_gr1, build_model, save_checkpoint
from models.encoders import CLIPTextEncoder, FrozenEncoders, MAEEncoder, tokenize
from models.files import CheckpointError, load_file
from training.state import lmdb_fingerprint, read_training_state
from training.step import NonFiniteLossError
from training.trainer import check_save_path, error_line

TINY = os.path.join(ROOT, "configs", "tiny.json")


def _train(lmdb: str, save: str, *overrides: str) -> None:
    """Main.py's training, in this process (one thread, as the subprocess tests run it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random frozen encoders
            Main.main(load_config(TINY, [f"LMDB_path={lmdb}", f"save_path={save}", *overrides]))
    finally:
        torch.set_num_threads(threads)


def _metrics(save: str) -> dict[int, tuple[float, float | None]]:
    with open(os.path.join(save, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["batches"]: (r["train/total"], r.get("val/total")) for r in records}  # later records win


# ---------------------------------------------------------------- exact resume

def test_text_embeddings_do_not_depend_on_the_batch():
    """An instruction's cached CLIP embedding is the same whichever batch first met it (4 rows round differently
    from 1 in the text tower's matmuls)."""
    torch.manual_seed(0)
    encoders = FrozenEncoders(MAEEncoder(32, 16, 32, 1, 2), CLIPTextEncoder(64, 64, 1, 4))
    tokens = tokenize(["open the drawer", "push the red block left", "turn on the led", "lift the blue block"])
    batched = encoders.encode_text(tokens)
    for i in range(len(tokens)):
        encoders._text_cache = {}
        assert torch.equal(encoders.encode_text(tokens[i:i + 1])[0], batched[i]), i


@pytest.fixture(scope="module")
def resumed_runs(mini_lmdb, tmp_path_factory):
    """60 steps straight, and 10 steps then resumed to 60 (bs_per_gpu=2, state saved every 10 steps)."""
    root = tmp_path_factory.mktemp("resume")
    common = ("bs_per_gpu=2", "save_steps=10", "print_steps=1", "num_epochs=1")  # test_resume_refuses_another_run
    straight, resumed = str(root / "straight"), str(root / "resumed")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):  # resume=true without a saved state: a warning, then a fresh start
        _train(mini_lmdb, straight, *common, "max_train_steps=60", "resume=true")
    assert "warning: resume=true but" in stderr.getvalue() and "holds no saved training state" in stderr.getvalue()
    _train(mini_lmdb, resumed, *common, "max_train_steps=10")
    _train(mini_lmdb, resumed, *common, "max_train_steps=60", "resume=true")
    return straight, resumed


def test_resume_gives_the_same_weights_losses_and_validation(resumed_runs):
    straight, resumed = resumed_runs
    a, b = _metrics(straight), _metrics(resumed)
    assert max(a) == max(b) == 60
    for batch in range(11, 61):  # training and validation losses after the resume
        assert a[batch] == b[batch], f"batch {batch}: {a[batch]} != {b[batch]}"
    wa, wb = (load_file(os.path.join(run, "state", "model.pt")) for run in resumed_runs)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not any(name.endswith(".pkl") for name in os.listdir(os.path.join(resumed, "state")))


def test_resume_refuses_another_run(resumed_runs, mini_lmdb):
    state = os.path.join(resumed_runs[1], "state")
    cfg = load_config(TINY, [f"LMDB_path={mini_lmdb}", "bs_per_gpu=2", "num_epochs=1", "print_steps=1"])
    train, _ = make_datasets(cfg)
    fingerprint = lmdb_fingerprint(train.index.episode_of_step, train.index.info)
    _, changed = read_training_state(state, cfg.replace(lr_max=0.01, max_train_steps=99), 1, 0, fingerprint)
    assert changed == ["lr_max"]  # said in a warning; max_train_steps changes nothing
    refusals = [((cfg.replace(embed_dim=64), 1, fingerprint), "embed_dim=32 (now 64)"),
                ((cfg.replace(bs_per_gpu=4), 1, fingerprint), "bs_per_gpu=2 (now 4)"),
                ((cfg.replace(frame_sharing=2), 1, fingerprint), "frame_sharing=1 (now 2)"),
                ((cfg, 2, fingerprint), "saved by 1 processes"),
                ((cfg, 1, "another"), "another LMDB")]
    for (other, processes, fp), message in refusals:
        with pytest.raises(CheckpointError) as error:
            read_training_state(state, other, processes, 0, fp)
        assert message in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------- NaN

def test_converter_rejects_non_finite_actions_and_states(tmp_path):
    root = helpers.make_split_root(str(tmp_path / "in"), {"training": [(0, 5, "a")], "validation": [(241, 244, "b")]},
                           helpers.mini_calvin())
    frame = os.path.join(root, "training", "episode_0000003.npz")
    arrays = dict(np.load(frame))
    os.remove(frame)
    arrays["rel_actions"][2] = np.nan
    np.savez_compressed(frame, **arrays)
    with pytest.raises(cf.CalvinFormatError, match=r"episode_0000003.npz: 'rel_actions' holds a non-finite value"):
        convert(root, str(tmp_path / "out"), progress=False)
    arrays["rel_actions"][2], arrays["scene_obs"][0] = 0.0, np.inf
    np.savez_compressed(frame, **arrays)
    with pytest.raises(cf.CalvinFormatError, match=r"'scene_obs' holds a non-finite value \(inf at index 0\)"):
        convert(root, str(tmp_path / "out"), progress=False)


def test_training_stops_at_the_first_non_finite_loss(mini_lmdb, tmp_path):
    """A NaN in one rel_action of the LMDB: training stops before the optimiser step with a message naming the
    batch's windows; the states saved before it are finite and nothing is saved after it."""
    path = helpers.copy_lmdb(mini_lmdb, str(tmp_path / "lmdb"))
    cfg = load_config(TINY, [f"LMDB_path={path}", "bs_per_gpu=2"])
    train, _ = make_datasets(cfg)
    order = EpochSampler(len(train), cfg.seed).epoch_indices(0)
    step = train.first_step + order[4 * 2]  # the first window of batch 4
    put_value(path, f"rel_action_{step}", dumps_value(np.full(7, np.nan)))
    close_lmdb(path)
    save = str(tmp_path / "run")
    with pytest.raises(NonFiniteLossError) as error:
        _train(path, save, "bs_per_gpu=2", "save_steps=2", "print_steps=1")
    message = str(error.value)
    assert "\n" not in message and "non-finite training loss" in message, message
    starts = [int(s) for s in message.split("LMDB steps ")[1].split(")")[0].split(", ")]
    span = cfg.seq_len + cfg.chunk_size - 1
    assert any(s <= step < s + span for s in starts), message  # the named batch reads the NaN
    run = json.load(open(os.path.join(save, "state", "run.json")))
    assert run["train"]["update"] <= 4 and not any(name.startswith("GR1_") for name in os.listdir(save))
    assert all(bool(torch.isfinite(v).all()) for v in load_file(os.path.join(save, "state", "model.pt")).values())


# ---------------------------------------------------------------- signals and orphans

def _descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc (no psutil)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


def _wait_gone(pids: set[int], seconds: float) -> set[int]:
    deadline = time.time() + seconds
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return {p for p in pids if _alive(p)}


def _wait_for(condition, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert proc.poll() is None, f"ended early: {proc.communicate()}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_converter_sigterm_and_sigkill_leave_no_process(mini_lmdb, tmp_path):
    out = str(tmp_path / "out")
    cmd = [sys.executable, "calvin2lmdb.py", "--input_dir", helpers.mini_calvin(), "--output_dir", out,
           "--workers", "2", "--commit_every", "1", "--no_progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: helpers.segments_done(out) >= 1, proc)
    kids = _descendants(proc.pid)
    assert len(kids) >= 2, "no worker processes"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted; committed segments are kept" in err, err
    assert not _wait_gone(kids, 10), "processes left behind after SIGTERM"

    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: len(_descendants(proc.pid)) >= 2, proc)
    kids = _descendants(proc.pid)
    proc.kill()  # SIGKILL: the converter cannot clean up; its workers must notice by themselves
    proc.wait()
    assert not _wait_gone(kids, 15), "processes left behind after SIGKILL"
    convert(helpers.mini_calvin(), out, workers=1, progress=False)  # what was committed resumes to the same bytes
    assert helpers.lmdb_contents(out) == helpers.lmdb_contents(mini_lmdb)


def _train_cmd(lmdb: str, save: str, processes: int = 1) -> list[str]:
    launcher = ([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                 str(free_port())] if processes > 1 else [sys.executable])
    return launcher + ["Main.py", "--config", TINY, f"LMDB_path={lmdb}", f"save_path={save}", "workers_per_gpu=1",
                       "print_steps=1", "save_steps=0", "num_epochs=1"]


def _logged_batches(save: str) -> int:
    path = os.path.join(save, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        return len(f.read().splitlines())


def test_a_killed_launcher_leaves_no_training_process(mini_lmdb, tmp_path):
    """accelerate launch with 2 processes, each with DataLoader workers; SIGKILL of the launcher. The training
    processes get SIGTERM (their parent-death signal) and handle it as SIGINT: they stop after the next optimiser
    step, save the state and exit 130; their workers end with them; no process is left."""
    save = str(tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    log = tmp_path / "log.txt"
    with open(log, "w") as out:  # the training processes keep writing here after the launcher is gone
        proc = subprocess.Popen(_train_cmd(mini_lmdb, save, processes=2), cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        _wait_for(lambda: _logged_batches(save) >= 2, proc)
        kids = _descendants(proc.pid)
        assert len(kids) >= 4, "expected 2 training processes and their DataLoader workers"
        proc.kill()
        proc.wait()
        assert not _wait_gone(kids, 60), "processes left behind after the launcher was killed"
    text = log.read_text()
    assert "interrupted by SIGTERM" in text and "run again with resume=true" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert json.load(open(os.path.join(save, "state", "run.json")))["train"]["update"] >= 2


# ---------------------------------------------------------------- one-line errors

@pytest.mark.parametrize("key, value, message", [
    ("lr_max", -1, "'lr_max' must be > 0"), ("weight_decay", -1, "'weight_decay' must be >= 0"),
    ("arm_loss_ratio", -1, "'arm_loss_ratio' must be >= 0"), ("num_warmup_epochs", -1, "'num_warmup_epochs' must"),
])
def test_bad_float_settings_are_config_errors(key, value, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({key: value})


def test_converter_output_errors(mini_lmdb, tmp_path):
    cases = {}
    (tmp_path / "a_file").write_text("x")
    cases["a_file"] = "is a file, not a directory"
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "data.mdb").write_bytes(b"garbage" * 1000)
    cases["garbage"] = "holds a file that is not an LMDB"
    foreign = helpers.copy_lmdb(mini_lmdb, str(tmp_path / "foreign"))
    put_value(foreign, "conversion_info", b"another application's record")
    cases["foreign"] = "did not write"
    for name, message in cases.items():
        with pytest.raises(ConversionError, match=message) as error:
            convert(helpers.mini_calvin(), str(tmp_path / name), progress=False)
        assert "\n" not in str(error.value)
    with pytest.raises(ConversionError, match="map size.*--map_size_gb") as error:
        convert(helpers.mini_calvin(), str(tmp_path / "small"), progress=False, map_size=1 << 20)


def test_converter_cli_config_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "calvin2lmdb.py", "--input_dir", helpers.mini_calvin(), "--output_dir",
                           str(tmp_path / "out"), "bs_per_gpu=ten"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("calvin2lmdb: error: ")
    assert "'bs_per_gpu' must be an integer" in lines[0]


def test_corrupt_lmdb_pages_are_named(mini_lmdb, tmp_path):
    path = helpers.copy_lmdb(mini_lmdb, str(tmp_path / "lmdb"))
    with open(os.path.join(path, "data.mdb"), "r+b") as f:
        f.seek(4096 * 3)
        f.write(np.random.default_rng(0).integers(0, 256, 4096 * 8, dtype=np.uint8).tobytes())
    with pytest.raises(DatasetError) as error:
        train, val = make_datasets(load_config(TINY, [f"LMDB_path={path}"]))
        for dataset in (train, val):
            for i in range(len(dataset)):
                dataset[i]
    close_lmdb(path)
    assert str(error.value).startswith(f"LMDB {path}") and "\n" not in str(error.value)


def test_weights_and_save_path_rules(tmp_path):
    cfg = load_config(TINY, [f"save_path={tmp_path}"])
    with pytest.raises(CheckpointError, match="load_epoch=7 but .*GR1_7.pth does not exist"):
        build_model(cfg.replace(load_epoch=7))
    gr1 = build_gr1(cfg.replace(seed=5))
    (tmp_path / "GR1_2.pth.tmp999999").write_bytes(b"left by a killed save")
    save_checkpoint(gr1, str(tmp_path / "GR1_2.pth"), cfg)
    assert os.listdir(tmp_path) == ["GR1_2.pth"]  # the stale temporary file is gone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, trained, report = build_model(cfg.replace(ckpt_path=str(tmp_path / "GR1_2.pth")))  # training's rule
    assert report.path.endswith("GR1_2.pth") and all(
        torch.equal(a, b) for a, b in zip(trained.state_dict().values(), gr1.state_dict().values()))
    with torch.no_grad():
        next(gr1.parameters())[0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN or inf"):
        save_checkpoint(gr1, str(tmp_path / "GR1_3.pth"), cfg)
    assert not (tmp_path / "GR1_3.pth").exists()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match="is not a writable directory"):
        check_save_path(str(tmp_path / "a_file" / "run"))


def test_error_line_reduces_worker_tracebacks():
    wrapped = DatasetError("Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                         "last):\n  File \"x.py\", line 1\ndata.lmdb_reader.DatasetError: LMDB /x, key rgb_static_3: "
                         "bad\n")
    assert error_line(wrapped) == "LMDB /x, key rgb_static_3: bad"
    assert error_line(ValueError("one\ntwo")) == "one two"

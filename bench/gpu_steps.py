"""The steps of bench/gpu_check.sh, each run in its own process by bench/gpu_check.py:

    python bench/gpu_steps.py STEP --json FILE [--dry_run] [--work DIR] [--lmdb PATH] [--reference_dir DIR]

A step writes its result to FILE as it goes, so that a step stopped at its time limit keeps the rows it finished:
{"status": "running" | "ok" | "skipped" | "failed", "reason": "...", "rows": [{...}, ...], "notes": ["..."]}.
A step that cannot import what it needs (ModuleNotFoundError) is skipped, naming the module.

The measurements reuse the benchmarks (bench_train.py's synthetic batches, optimiser step and alternating timer;
bench_eval.py's observations; bench_eval_envs.py's env-pool rows; bench_train.py's CLI for the real GR1-Training step)
and the project's own loader, policy and Main.py. The speed steps are in bench/gpu_speed.py.
--dry_run: tiny sizes on whatever device there is (configs/tiny.json, batch 2, a few steps, N = 1, 2 envs).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import subprocess
import sys
import traceback
from importlib import metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TINY = os.path.join(ROOT, "configs", "tiny.json")
FULL = os.path.join(ROOT, "configs.json")
# Distributions whose versions the report lists (what a step may need beyond torch).
PACKAGES = ("numpy", "transformers", "accelerate", "openai-clip", "lmdb", "simplejpeg", "pillow", "pybullet", "pytest",
            "flamingo-pytorch", "einops", "einops-exts", "hydra-core", "gym", "numpy-quaternion", "calvin_env")


class SkipStepError(Exception):
    """The step cannot run here; the message says why."""


class StepResult:
    """The step's JSON result, rewritten (atomically) after every change."""

    def __init__(self, path: str):
        self.path = path
        self.data: dict = {"status": "running", "reason": "", "rows": [], "notes": []}
        self.save()

    def save(self) -> None:
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)

    def row(self, **row) -> None:
        self.data["rows"].append(row)
        print("row:", json.dumps(row, default=str), flush=True)
        self.save()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        print("note:", text, flush=True)
        self.save()

    def finish(self, status: str, reason: str = "") -> None:
        if self.data["status"] == "running":
            self.data.update(status=status, reason=reason)
            self.save()


def cores() -> int:
    from evaluation.pool import available_cores  # numpy, no torch
    return available_cores()


def step_device(opts):
    """CUDA if there is one; the CPU only in a dry run (full-size figures on a CPU would take the whole budget)."""
    import torch
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not opts.dry_run:
        raise SkipStepError("torch.cuda is not available (on a CPU, bench/gpu_check.sh --dry-run runs every step at "
                            "tiny size)")
    return torch.device("cpu")


def model_config(opts) -> str:
    return TINY if opts.dry_run else FULL


# ---------------------------------------------------------------- environment

def _nvidia_smi() -> dict:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return {"nvidia_smi": "not available"}
    return {"nvidia_smi": "; ".join(out)} if out else {"nvidia_smi": "no output"}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        return names[0] if names else platform.processor()
    except OSError:
        return platform.processor()


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


def environment(opts, result: StepResult) -> None:
    """GPU name, driver, torch and CUDA versions, CPU cores, and the versions of what the other steps need."""
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "torch CUDA": torch.version.cuda,
            "cuDNN": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "CUDA available": torch.cuda.is_available(), "GPUs": torch.cuda.device_count(),
            "CPU": _cpu_model(), "CPU cores (usable)": cores(), "CPU cores (machine)": os.cpu_count()}
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        info[f"GPU {i}"] = f"{p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}"
    if torch.cuda.is_available():
        info.update(_nvidia_smi())
        info["bf16 supported"] = torch.cuda.is_bf16_supported()
    info.update({f"package {name}": _version(name) for name in PACKAGES})
    for key, value in info.items():
        result.row(key=key, value=value)


# ---------------------------------------------------------------- correctness: pytest -m cuda

_OUTCOME = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
_NOT_COLLECTED = re.compile(r"^ERROR (tests/\S+\.py)(?: - (.*))?$")  # a test module that did not import


def _junit_messages(path: str) -> dict[str, str]:
    """test id -> the skip or failure message, from pytest's JUnit XML (written when pytest ends)."""
    import xml.etree.ElementTree as ET
    try:
        cases = ET.parse(path).getroot().iter("testcase")
    except (OSError, ET.ParseError):
        return {}
    messages = {}
    for case in cases:
        test = case.get("classname", "").replace(".", "/") + ".py::" + case.get("name", "")
        for child in case:
            if child.tag in ("skipped", "failure", "error"):
                messages[test] = (child.get("message") or "").split("\n")[0][:300]
    return messages


def correctness(opts, result: StepResult) -> None:
    """`pytest -m cuda tests`: the CUDA half of every test that takes a device; one row per test as it finishes."""
    junit = os.path.join(opts.work, "correctness.xml")
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "tests", "-v", "-p", "no:cacheprovider", "--color=no",
           "--continue-on-collection-errors", f"--junitxml={junit}"]  # a module missing pybullet stops no other
    print(" ".join(cmd), flush=True)
    rows: dict[str, dict] = {}
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            if match := _OUTCOME.match(line):
                result.row(test=match[1], outcome=match[2].lower(), message="")
                rows[match[1]] = result.data["rows"][-1]
            elif match := _NOT_COLLECTED.match(line.strip()):
                result.note(f"not collected: {match[1]} ({match[2] or 'import error'})")
    for test, message in _junit_messages(junit).items():
        if test in rows:
            rows[test]["message"] = message
    result.save()
    outcomes = [r["outcome"] for r in rows.values()]
    if not rows:
        result.finish("failed", f"pytest collected no cuda test (exit code {proc.returncode})")
    elif bad := [name for name, r in rows.items() if r["outcome"] in ("failed", "error")]:
        result.finish("failed", f"{len(bad)} of {len(rows)} failed: " + ", ".join(n.split("::")[-1] for n in bad))
    elif proc.returncode != 0 and not result.data["notes"]:
        result.finish("failed", f"pytest exit code {proc.returncode}")
    elif outcomes.count("passed") == 0:
        reasons = sorted({r["message"] for r in rows.values()})
        result.finish("skipped", f"all {len(rows)} cuda tests skipped: {'; '.join(reasons)}")
    else:
        missed = f"; {len(result.data['notes'])} test modules not collected" if result.data["notes"] else ""
        result.finish("ok", f"{outcomes.count('passed')} passed, {outcomes.count('skipped')} skipped{missed}")


# ---------------------------------------------------------------- data for the data and DDP steps

def _synthetic_split_root(root: str, frames: int = 120) -> str:
    """A CALVIN split root of random frames (noise compresses worse than camera images: JPEG decoding costs more)."""
    import numpy as np

    from data import calvin_format as cf
    rng = np.random.default_rng(0)
    for split, first in (("training", 0), ("validation", frames)):
        folder = os.path.join(root, split)
        os.makedirs(os.path.join(folder, "lang_annotations"), exist_ok=True)
        for i in range(first, first + frames):
            arrays = {k: rng.integers(0, 256, shape, dtype=np.uint8) if k in cf.CAMERA_SIZES else rng.normal(size=shape)
                      for k, shape in cf.FRAME_ARRAYS.items()}
            np.savez(cf.episode_path(folder, i), **arrays)
        windows = [(s, s + 59) for s in range(first, first + frames - 59, 30)]
        ann = {"language": {"ann": ["lift the red block"] * len(windows)}, "info": {"indx": windows}}
        np.save(os.path.join(folder, cf.ANNOTATION_FILE), ann, allow_pickle=True)
    return root


def prepare_lmdb(opts, result: StepResult) -> str:
    """--lmdb, else mini_calvin (../shared or $GR1_SHARED) converted once into the work folder, else synthetic frames
    converted there."""
    if opts.lmdb:
        result.note(f"data: {opts.lmdb}")
        return opts.lmdb
    from bench.bench_data import MINI_CALVIN, repeated_input
    from data.convert import convert
    path, repeat = os.path.join(opts.work, "lmdb"), 2 if opts.dry_run else 16
    real = os.path.isdir(MINI_CALVIN)
    kind = "mini_calvin (real rendered CALVIN frames)" if real else "synthetic noise frames (no mini_calvin here)"
    if not os.path.isfile(os.path.join(path, "data.mdb")):
        raw = MINI_CALVIN if real else _synthetic_split_root(os.path.join(opts.work, "raw"))
        # windows repeated: an epoch long enough that the loader's epoch starts do not dominate
        convert(repeated_input(raw, repeat, os.path.join(opts.work, "input")), path, workers=min(8, cores()),
                progress=False)
    result.note(f"data: {kind}, windows x {repeat}, converted to {path}")
    return path


# ---------------------------------------------------------------- multi-GPU DDP

def ddp(opts, result: StepResult) -> None:
    """A few optimiser steps of Main.py under `accelerate launch --multi_gpu` on every GPU (2 or more); in a dry run
    2 CPU processes (gloo)."""
    import torch
    gpus = torch.cuda.device_count()
    if not opts.dry_run and gpus < 2:
        raise SkipStepError(f"{gpus} GPU on this machine: DDP needs 2 or more")
    processes = gpus if gpus >= 2 else 2
    lmdb = prepare_lmdb(opts, result)
    save = os.path.join(opts.work, "ddp_run")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "bf16" if gpus else "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), "Main.py", "--config", model_config(opts), f"LMDB_path={lmdb}",
           f"save_path={save}", "max_train_steps=4", "print_steps=1", "num_epochs=1", "bs_per_gpu=2",
           "workers_per_gpu=2", "evaluate_during_training=false", "mae_ckpt=", "clip_ckpt=", "log_with=none"]
    print(" ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1"})
    records = []
    if os.path.isfile(os.path.join(save, "metrics.jsonl")):
        with open(os.path.join(save, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
    last = records[-1] if records else {}
    result.row(processes=processes, device="cuda" if gpus else "cpu (gloo)", exit_code=proc.returncode,
               steps=last.get("batches"), samples_per_s=last.get("samples_per_s"), loss=last.get("train/total"))
    if proc.returncode != 0 or not records:
        result.finish("failed", f"Main.py under accelerate launch exited with {proc.returncode}")


# ---------------------------------------------------------------- entry point

def step_functions() -> dict:
    from bench import gpu_speed
    return {"environment": environment, "correctness": correctness, "ddp": ddp, **gpu_speed.STEPS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step")
    parser.add_argument("--json", required=True, help="the step's result file")
    parser.add_argument("--dry_run", action="store_true", help="tiny sizes on any device")
    parser.add_argument("--work", default="", help="scratch folder (LMDB, runs)")
    parser.add_argument("--lmdb", default="", help="LMDB for the data and DDP steps (default: mini_calvin)")
    parser.add_argument("--reference_dir", default="", help="a GR1-Training clone for the reference step")
    opts = parser.parse_args()
    result = StepResult(opts.json)
    opts.work = opts.work or os.path.dirname(os.path.abspath(opts.json))
    os.makedirs(opts.work, exist_ok=True)
    try:
        functions = step_functions()
        if opts.step not in functions:
            raise SystemExit(f"error: unknown step {opts.step!r} (one of {', '.join(functions)})")
        functions[opts.step](opts, result)
        result.finish("ok")
    except SkipStepError as reason:
        result.finish("skipped", str(reason))
    except ModuleNotFoundError as e:
        result.finish("skipped", f"the Python module {e.name!r} is not importable here (carry its wheel: --wheels)")
    except Exception as e:  # the report says what broke; the traceback goes to the step's log
        traceback.print_exc()
        result.finish("failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
        sys.exit(1)


if __name__ == "__main__":
    from bench import gpu_steps  # one copy of this module: bench/gpu_speed.py imports it by that name (SkipStepError)
    gpu_steps.main()

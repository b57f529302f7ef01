"""GPU readiness check: runs every step of bench/gpu_steps.py in its own process with its own time limit and writes
report.json and report.md. Started by bench/gpu_check.sh (which first installs carried wheels); standard library only,
so that a report is written even where torch itself fails to import.

    python bench/gpu_check.py [--dry-run] [--out DIR] [--reference_dir DIR] [--lmdb PATH] [--only a,b] [--keep_work]

Each step has a time budget (BUDGETS_S on a GPU, at most TOTAL_BUDGET_S together, counted from --started; DRY_BUDGETS_S
in a dry run). A step that runs past its budget is stopped with its whole process group and reported as failed, with
the rows it had finished; a step whose modules are missing is skipped, saying which. Exit code 0 when no step failed,
1 when one did, 2 when the report is not valid (a step missing, a status without a reason; a dry run also checks the
report logic on made-up step endings, self_check).

--out receives three files (what a device machine's $OUT brings back): report.json, report.md and steps.log (every
step's output, one section each). Steps work in a scratch folder (converted LMDB, runs), removed at the end.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATUSES = ("ok", "skipped", "failed")
TOTAL_BUDGET_S = 470  # the 8 minutes on one GPU, less the wheel install and the report


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    budget_s: int  # on a GPU
    dry_budget_s: int  # --dry-run on 2 CPU cores
    needs: tuple[str, ...] = ("torch",)  # modules, checked before the step starts


MODEL = ("torch", "transformers", "clip")
STEPS = (  # in order of importance: the last ones are cut first when time runs out
    Step("environment", "Environment: GPU, driver, torch, CUDA, CPU cores, packages", 20, 60),
    Step("correctness", "Correctness on CUDA: pytest -m cuda (parity fp32 within 1e-4, preprocessing, bf16 full-size "
         "step, killed run + exact resume, cached vs uncached policy)", 100, 150, MODEL + ("pytest",)),
    Step("train", "Training samples/s and peak GPU memory, full size, bf16, batch 8 / 16 / 32", 55, 150, MODEL),
    Step("data", "Training loader samples/s, workers = cores, pinned memory, prefetcher to the GPU", 25, 120,
         MODEL + ("lmdb",)),
    Step("eval_policy", "Cached policy query latency, fp32, batch 1 and 8 / 16 envs", 25, 90, MODEL),
    Step("eval_envs", "Built-in scene evaluation steps/s, N = 1 / 4 / 8 / 16 envs per process", 50, 150,
         MODEL + ("pybullet",)),
    Step("train_compile", "Training with compile_model (torch.compile), batch 8 / 16 / 32", 85, 300, MODEL),
    Step("train_reference", "GR1-Training's real training step beside ours (--reference_dir), bf16", 40, 200, MODEL),
    Step("calvin_egl", "calvin_env evaluation with EGL rendering on the GPU", 40, 150, MODEL + ("pybullet",)),
    Step("ddp", "Multi-GPU DDP: Main.py under accelerate launch --multi_gpu (2+ GPUs)", 40, 150,
         MODEL + ("accelerate", "lmdb")),
)


def missing_modules(step: Step) -> list[str]:
    return [name for name in step.needs if importlib.util.find_spec(name) is None]


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the step's process group (its DataLoader workers, env workers, pytest's children), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def read_result(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def step_record(step: Step, result: dict | None, code: int | None, seconds: float, limit: float,
                log_tail: str = "") -> dict:
    """The report's entry for a step from what its process wrote and how it ended (code None: stopped at its limit)."""
    result, last = result or {}, log_tail.rsplit("\n", 1)[-1]
    status, reason = result.get("status", "running"), result.get("reason", "")
    if code is None:
        status, reason = "failed", f"stopped at its time limit of {limit:.0f} s (rows finished so far are kept)"
    elif status not in STATUSES:
        status, reason = "failed", f"ended (exit code {code}) without a result: {last or 'no output'}"
    elif code != 0 and status != "failed":
        status, reason = "failed", f"exit code {code}: {last or 'no output'}"
    return {"name": step.name, "title": step.title, "status": status, "reason": reason,
            "seconds": round(seconds, 1), "limit_s": round(limit, 1), "rows": result.get("rows", []),
            "notes": result.get("notes", []), "log_tail": log_tail if status == "failed" else ""}


def skipped_record(step: Step, reason: str) -> dict:
    return {"name": step.name, "title": step.title, "status": "skipped", "reason": reason, "seconds": 0.0,
            "limit_s": 0.0, "rows": [], "notes": [], "log_tail": ""}


def log_tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            kept = [line.rstrip() for line in f if line.strip()]
    except OSError:
        return ""
    return "\n".join(line[:300] for line in kept[-lines:])


def run_step(step: Step, args, limit: float) -> dict:
    """The step in its own process group, stopped at `limit` seconds; its output goes to <work>/logs/<name>.log."""
    result_path = os.path.join(args.work, "steps", f"{step.name}.json")
    log_path = os.path.join(args.work, "logs", f"{step.name}.log")
    work = os.path.join(args.work, "data" if step.name in ("data", "ddp") else step.name)  # one LMDB for both
    cmd = [sys.executable, os.path.join(ROOT, "bench", "gpu_steps.py"), step.name, "--json", result_path,
           "--work", work]
    cmd += ["--dry_run"] if args.dry_run else []
    cmd += ["--lmdb", args.lmdb] if args.lmdb else []
    cmd += ["--reference_dir", os.path.abspath(args.reference_dir)] if args.reference_dir else []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    start = time.monotonic()
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code: int | None = proc.wait(limit)
        except subprocess.TimeoutExpired:
            code = None
        stop_group(proc)  # also what a finished step left behind
    return step_record(step, read_result(result_path), code, time.monotonic() - start, limit, log_tail(log_path))


def run_all(args) -> list[dict]:
    selected = set(args.only.split(",")) if args.only else {s.name for s in STEPS}
    records = []
    for step in STEPS:
        left = TOTAL_BUDGET_S - (time.time() - args.started)
        limit = step.dry_budget_s if args.dry_run else min(step.budget_s, left)
        if step.name not in selected:
            records.append(skipped_record(step, "not selected (--only)"))
        elif missing := missing_modules(step):
            records.append(skipped_record(step, f"needs {', '.join(missing)}, not importable here (carry wheels: "
                                                "--wheels DIR)"))
        elif limit < 10:
            records.append(skipped_record(step, f"no time left of the {TOTAL_BUDGET_S} s budget"))
        else:
            print(f"[{time.time() - args.started:5.0f} s] {step.name}: {step.title} (limit {limit:.0f} s)", flush=True)
            records.append(run_step(step, args, limit))
        r = records[-1]
        print(f"        {r['status']}{': ' + r['reason'] if r['reason'] else ''}", flush=True)
    return records


# ---------------------------------------------------------------- the report

def build_report(records: list[dict], mode: str, started: float, setup: list[str], argv: list[str]) -> dict:
    counts = {status: sum(r["status"] == status for r in records) for status in STATUSES}
    return {"check": "bench/gpu_check.sh", "mode": mode, "argv": argv,
            "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
            "seconds": round(time.time() - started, 1), "budget_s": TOTAL_BUDGET_S if mode == "gpu" else None,
            "setup": setup, "summary": counts, "findings": findings(records, mode), "steps": records}


def findings(records: list[dict], mode: str = "gpu") -> list[str]:
    """Conclusions drawn across steps: does the loader keep the GPU busy?"""
    by_name = {r["name"]: r for r in records}
    train = [row.get("samples_per_s") or 0 for name in ("train", "train_compile")
             for row in by_name.get(name, {}).get("rows", [])]
    loader = [row["samples_per_s"] for row in by_name.get("data", {}).get("rows", []) if "samples_per_s" in row]
    if not train or not loader or not max(train):
        return ["loader vs training: not measured (a step was skipped or failed)"]
    ratio = loader[0] / max(train)
    verdict = "keeps the GPU busy" if ratio >= 1.2 else "may starve the GPU" if ratio < 1 else "barely keeps up"
    if mode != "gpu":
        verdict = "(a dry run: tiny sizes on the CPU, no conclusion)"
    return [f"loader vs training: the loader gives {loader[0]:.0f} samples/s, the fastest training step takes "
            f"{max(train):.0f} samples/s: {ratio:.2f}x, the loader {verdict}"]


def validate(report: dict) -> list[str]:
    """What makes a report unusable: a step missing or repeated, an unknown status, a skip or failure without a
    reason, a malformed entry."""
    problems = []
    names = [r.get("name") for r in report.get("steps", [])]
    for step in STEPS:
        if names.count(step.name) != 1:
            problems.append(f"step {step.name}: {names.count(step.name)} entries")
    for r in report.get("steps", []):
        if r.get("status") not in STATUSES:
            problems.append(f"step {r.get('name')}: status {r.get('status')!r} is not one of {STATUSES}")
        elif r["status"] != "ok" and not str(r.get("reason", "")).strip():
            problems.append(f"step {r.get('name')}: {r['status']} without a reason")
        if not isinstance(r.get("rows"), list) or not all(isinstance(row, dict) for row in r.get("rows", [])):
            problems.append(f"step {r.get('name')}: rows are not a list of objects")
    return problems


def self_check() -> list[str]:
    """The report logic on made-up step endings (a dry run runs it: tests/ do not import bench/): what it gets wrong."""
    step, ok = STEPS[2], {"status": "ok", "reason": "", "rows": [{"batch": 8, "samples_per_s": 40.0}], "notes": []}
    running = {"status": "running", "reason": "", "rows": [{"batch": 8}]}
    cases = {"ok": (step_record(step, ok, 0, 1, 60), "ok"),
             "stopped at its limit, rows kept": (step_record(step, running, None, 61, 60), "failed"),
             "crashed while running": (step_record(step, running, 1, 2, 60, "RuntimeError: CUDA error"), "failed"),
             "killed before writing": (step_record(step, None, -9, 2, 60), "failed"),
             "said ok, exited 1": (step_record(step, ok, 1, 2, 60), "failed")}
    wrong = [name for name, (record, status) in cases.items() if record["status"] != status or
             (status == "failed" and not record["reason"])]
    wrong += [] if cases["stopped at its limit, rows kept"][0]["rows"] == [{"batch": 8}] else ["rows of a stopped step"]
    report = build_report([step_record(s, ok, 0, 1, 60) for s in STEPS], "dry-run", time.time(), [], [])
    wrong += [f"a valid report: {p}" for p in validate(report)]
    report["steps"] = report["steps"][1:] + [skipped_record(STEPS[1], "")]
    found = validate(report)
    wrong += [] if len(found) == 3 else [f"an invalid report gave {found}"]  # missing, repeated, no reason
    data = step_record(STEPS[3], {**ok, "rows": [{"samples_per_s": 30.0}]}, 0, 1, 60)
    if "may starve" not in findings([data if s.name == "data" else step_record(s, ok, 0, 1, 60) for s in STEPS])[0]:
        wrong.append("the loader finding")
    return [f"self-check: {name}" for name in wrong]


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "/").replace("\n", " ") if value is not None else ""


def markdown_table(rows: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return lines + ["| " + " | ".join(_cell(row.get(k)) for k in keys) + " |" for row in rows]


def markdown(report: dict) -> str:
    env = {row.get("key"): row.get("value") for r in report["steps"] if r["name"] == "environment" for row in r["rows"]}
    gpu = env.get("GPU 0", "no GPU")
    lines = [f"# GPU check ({report['mode']}), {report['started']}", "",
             f"GPU: {gpu}; driver: {env.get('nvidia_smi', '-')}; torch {env.get('torch', '?')} (CUDA "
             f"{env.get('torch CUDA', '-')}); CPU: {env.get('CPU', '?')}, {env.get('CPU cores (usable)', '?')} cores.",
             f"Total {report['seconds']} s; {report['summary']['ok']} ok, {report['summary']['skipped']} skipped, "
             f"{report['summary']['failed']} failed.", ""]
    lines += [f"- {line}" for line in report["findings"] + report["setup"]] + [""]
    lines += markdown_table([{"step": r["name"], "status": r["status"], "seconds": r["seconds"],
                              "limit s": r["limit_s"], "reason": r["reason"]} for r in report["steps"]])
    for r in report["steps"]:
        if r["rows"] or r["notes"] or r["log_tail"]:
            lines += ["", f"## {r['name']}: {r['title']}", ""]
            lines += [f"- {note}" for note in r["notes"]] + ([""] if r["notes"] else [])
            lines += markdown_table(r["rows"]) if r["rows"] else []
            lines += ["", "End of its log (steps.log has all of it):", "```", r["log_tail"], "```"] if r["log_tail"] \
                else []
    return "\n".join(lines) + "\n"


def join_logs(work: str, path: str) -> None:
    """Every step's log in one file, a section per step, in the order they ran."""
    with open(path, "w") as out:
        for step in STEPS:
            log = os.path.join(work, "logs", f"{step.name}.log")
            if os.path.isfile(log):
                out.write(f"\n===== {step.name} =====\n")
                with open(log, errors="replace") as f:
                    shutil.copyfileobj(f, out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", dest="dry_run", action="store_true", help="every step at tiny size, any device")
    parser.add_argument("--out", default="", help="report folder (default bench/results/gpu_check-<date>/)")
    parser.add_argument("--reference_dir", default="", help="a GR1-Training clone for the reference step")
    parser.add_argument("--lmdb", default="", help="an LMDB for the data and DDP steps (default: mini_calvin)")
    parser.add_argument("--only", default="", help="comma-separated steps to run (the others are reported skipped)")
    parser.add_argument("--keep_work", action="store_true", help="keep the scratch folder (its path is printed)")
    parser.add_argument("--started", type=float, default=time.time(), help=argparse.SUPPRESS)  # from gpu_check.sh
    parser.add_argument("--setup_log", default="", help=argparse.SUPPRESS)  # gpu_check.sh's wheel install notes
    args = parser.parse_args()
    unknown = set(filter(None, args.only.split(","))) - {s.name for s in STEPS}
    if unknown:
        print(f"error: unknown step(s) {', '.join(sorted(unknown))} in --only", file=sys.stderr)
        return 2
    stamp = datetime.datetime.fromtimestamp(args.started).strftime("%Y%m%d-%H%M%S")
    out = os.path.abspath(args.out or os.path.join(ROOT, "bench", "results", f"gpu_check-{stamp}"))
    args.work = tempfile.mkdtemp(prefix="gr1_gpu_check_")
    for folder in (out, os.path.join(args.work, "steps"), os.path.join(args.work, "logs")):
        os.makedirs(folder, exist_ok=True)
    setup = []
    if args.setup_log and os.path.isfile(args.setup_log):
        with open(args.setup_log) as f:
            setup = [line.strip() for line in f if line.strip()]
    print(f"GPU check ({'dry run' if args.dry_run else 'GPU'}): report in {out}", flush=True)
    try:
        records = run_all(args)
        join_logs(args.work, os.path.join(out, "steps.log"))
    finally:
        if args.keep_work:
            print(f"scratch folder kept: {args.work}")
        else:
            shutil.rmtree(args.work, ignore_errors=True)
    report = build_report(records, "dry-run" if args.dry_run else "gpu", args.started, setup, sys.argv[1:])
    problems = validate(report) + (self_check() if args.dry_run else [])
    report["problems"] = problems
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(markdown(report))
    print(f"report: {os.path.join(out, 'report.md')} ({report['seconds']} s; {report['summary']})")
    for problem in problems:
        print(f"error: invalid report: {problem}", file=sys.stderr)
    return 2 if problems else 1 if report["summary"]["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

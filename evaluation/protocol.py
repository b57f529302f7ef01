"""CALVIN's multi-step evaluation protocol, independent of the environment backend and the policy.

Per sequence: env.reset(robot_obs, scene_obs); per subtask: obs = env.get_obs(), policy.reset(),
start_info = env.get_info(), then at most ep_len steps of action = policy.step(obs, instruction)['action'],
obs, _, _, info = env.step(action), success as soon as oracle.get_task_info_for_set(start_info, info, {task}) is
non-empty (checked after every step). No reset between subtasks; the first failure ends the sequence, whose result
is the number of consecutive successes (0-5). `evaluate_sequence` is that loop; it runs in the calling process
(run_protocol) or inside env worker processes (evaluation/env_worker.py, driven by evaluation/pool.py).

Sharding: process r of P evaluates a contiguous block of the sequence list (sizes differ by at most one; nothing is
dropped), in any order and with any number of envs. Results are gathered and the main process writes, for ALL
sequences in list order:
- success_rate.txt: the reference's line format, "{i}/{num_sequences}: " + five "{sr:.3f} | ", one line per
  sequence, with the running chain success rates over sequences 0..i;
- result.txt: the reference's JSON {"null": {"avg_seq_len", "chain_sr": {"1".."5"}, "task_info": {task: {"success",
  "total"}}}}, plus a "run" entry (wall time, env steps, env steps/s, policy share) that the reference's readers
  ignore;
- sequences.jsonl: one record per sequence (index, tasks, result, per-subtask success and steps, error);
- chain_success.png and task_success.png (evaluation/charts.py).
While running, each process appends its finished sequences to sequences_rank<r>.jsonl, whose first line records the
run's identity (policy, checkpoint, sequence list, ep_len, ...): nothing finished is lost in a crash, and resume
skips every sequence found in any process's file, after checking that the files belong to the same evaluation. An
exception inside a sequence is recorded in its "error" field, the sequence counts as failed at the subtask where it
happened, and the run goes on.
"""
from __future__ import annotations

import glob
import json
import os
import re
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from config import ConfigError
from evaluation.interfaces import EvalEnv, EvalPolicy, TaskOracle
from facts import CAMERA_KEYS, CAMERAS, CHAIN_LENGTH, PREDICTION_KEYS

PARTIAL_FILE = "sequences_rank{rank}.jsonl"
_PARTIAL_NAME = re.compile(r"^sequences_rank(\d+)\.jsonl$")


@dataclass
class EvalSequence:
    index: int  # position in the evaluated list (global, across processes)
    tasks: list[str]
    robot_obs: np.ndarray
    scene_obs: np.ndarray
    condition: dict | None = None  # CALVIN's symbolic initial condition, when known


@dataclass
class SequenceResult:
    index: int
    tasks: list[str]
    result: int = 0  # consecutive successes
    subtasks: list[dict] = field(default_factory=list)  # {"task", "success", "steps"}
    error: str | None = None
    condition: dict | None = None


@dataclass
class RunStats:
    """Where the time of a run went, summed over its envs."""

    env_steps: int = 0
    env_seconds: float = 0.0  # env.step and the oracle check
    policy_seconds: float = 0.0  # policy.step (a policy in another process: from the request to the action)

    def add(self, other: dict[str, Any]) -> None:
        self.env_steps += int(other["env_steps"])
        self.env_seconds += float(other["env_seconds"])
        self.policy_seconds += float(other["policy_seconds"])


# ---------------------------------------------------------------- rollout

def rollout(env: EvalEnv, oracle: TaskOracle, policy: EvalPolicy, task: str, instruction: str, ep_len: int,
            video: list | None = None, stats: RunStats | None = None) -> tuple[bool, int]:
    """One subtask from the current state: (success, steps taken)."""
    obs = env.get_obs()
    policy.reset()
    start_info = env.get_info()
    stats = stats if stats is not None else RunStats()
    for step in range(1, ep_len + 1):
        t0 = time.perf_counter()
        output = policy.step(obs, instruction)
        t1 = time.perf_counter()
        obs, _, _, info = env.step(np.asarray(output["action"], dtype=np.float64))
        success = bool(oracle.get_task_info_for_set(start_info, info, {task}))
        stats.policy_seconds += t1 - t0
        stats.env_seconds += time.perf_counter() - t1
        stats.env_steps += 1
        if video is not None:
            video.append(video_frame(obs, output))
        if success:
            return True, step
    return False, ep_len


def evaluate_sequence(env: EvalEnv, oracle: TaskOracle, policy: EvalPolicy, seq: EvalSequence,
                      instructions: dict[str, str], ep_len: int, video_dir: str | None = None,
                      stats: RunStats | None = None,
                      on_subtask: Callable[[dict], None] | None = None) -> SequenceResult:
    """All subtasks of one sequence until the first failure; exceptions are recorded, not raised.
    on_subtask(record) is called after each subtask (env workers report progress with it)."""
    res = SequenceResult(seq.index, list(seq.tasks), condition=seq.condition)
    try:
        env.reset(robot_obs=seq.robot_obs, scene_obs=seq.scene_obs)
        for i, task in enumerate(seq.tasks):
            frames = [] if video_dir else None
            success, steps = rollout(env, oracle, policy, task, instructions[task], ep_len, frames, stats)
            res.subtasks.append({"task": task, "success": success, "steps": steps})
            if on_subtask is not None:
                on_subtask(res.subtasks[-1])
            if frames:
                name = f"seq{seq.index:04d}_sub{i}_{task}_{'succ' if success else 'fail'}"
                write_video(os.path.join(video_dir, name), frames)
            if not success:
                break
            res.result += 1
    except Exception:  # one broken sequence must not end a multi-hour evaluation
        res.error = traceback.format_exc(limit=8)
    return res


# ---------------------------------------------------------------- counting

def count_success(results: Sequence[int]) -> list[float]:
    """SR_i for i = 1..5: the share of sequences with at least i consecutive successes."""
    n = max(1, len(results))
    return [sum(r >= i for r in results) / n for i in range(1, CHAIN_LENGTH + 1)]


def task_info(results: Sequence[SequenceResult]) -> dict[str, dict[str, int]]:
    """Per task: successes (tasks before the failure) and totals (those plus the failed task), as CALVIN."""
    success, total = Counter(), Counter()
    for r in results:
        for task in r.tasks[:r.result]:
            success[task] += 1
            total[task] += 1
        if r.result < len(r.tasks):
            total[r.tasks[r.result]] += 1
    return {task: {"success": success[task], "total": total[task]} for task in total}


def summarize(results: Sequence[SequenceResult]) -> dict:
    counts = [r.result for r in results]
    return {"avg_seq_len": float(np.mean(counts)) if counts else 0.0,
            "chain_sr": {str(i + 1): sr for i, sr in enumerate(count_success(counts))},
            "task_info": task_info(results),
            "num_sequences": len(results), "errors": sum(r.error is not None for r in results)}


def shard(n: int, rank: int, world: int) -> range:
    """Contiguous block of process `rank`: sizes differ by at most one, all n indices covered once."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


# ---------------------------------------------------------------- files

def success_rate_line(i: int, num_sequences: int, rates: Sequence[float]) -> str:
    return f"{i}/{num_sequences}: " + "".join(f"{sr:.3f} | " for sr in rates) + "\n"


def run_summary(per_process: Sequence[dict[str, Any]], envs_per_process: int = 1) -> dict[str, Any]:
    """Wall time, env steps, env steps/s and the policy's share of the envs' time over all processes; per_process
    holds each process's {'wall_seconds', 'env_steps', 'env_seconds', 'policy_seconds'}."""
    total = RunStats()
    for stats in per_process:
        total.add(stats)
    wall = max((float(s["wall_seconds"]) for s in per_process), default=0.0)
    busy = total.env_seconds + total.policy_seconds
    return {"wall_seconds": round(wall, 3), "env_steps": total.env_steps,
            "env_steps_per_second": round(total.env_steps / wall, 3) if wall > 0 else 0.0,
            "policy_share": round(total.policy_seconds / busy, 4) if busy > 0 else 0.0,
            "processes": len(per_process), "envs_per_process": envs_per_process}


def write_results(out_dir: str, results: Sequence[SequenceResult], run: dict[str, Any] | None = None) -> dict:
    """The merged result files for all sequences (see the module docstring); `run` (run_summary) is added to
    result.txt and to the returned summary."""
    from evaluation.charts import draw_chain_success, draw_task_success

    os.makedirs(out_dir, exist_ok=True)
    results = sorted(results, key=lambda r: r.index)
    counts = [r.result for r in results]
    with open(os.path.join(out_dir, "success_rate.txt"), "w") as f:
        for i in range(len(results)):
            f.write(success_rate_line(i, len(results), count_success(counts[:i + 1])))
    summary = summarize(results)
    reference = {"avg_seq_len": summary["avg_seq_len"], "chain_sr": summary["chain_sr"],
                 "task_info": summary["task_info"]}
    with open(os.path.join(out_dir, "result.txt"), "w") as f:
        json.dump({"null": reference, **({"run": run} if run else {})}, f)
    with open(os.path.join(out_dir, "sequences.jsonl"), "w") as f:
        for r in results:
            f.write(json.dumps(asdict(r)) + "\n")
    draw_chain_success(os.path.join(out_dir, "chain_success.png"), summary)
    draw_task_success(os.path.join(out_dir, "task_success.png"), summary)
    if run:
        summary["run"] = run
    return summary


def partial_path(out_dir: str, rank: int) -> str:
    return os.path.join(out_dir, PARTIAL_FILE.format(rank=rank))


def partial_files(out_dir: str) -> dict[int, str]:
    """Every process's running file in out_dir: {rank: path}, by rank."""
    found = {}
    for path in glob.glob(os.path.join(out_dir, "sequences_rank*.jsonl")):
        match = _PARTIAL_NAME.match(os.path.basename(path))
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def read_partial(path: str) -> list[SequenceResult]:
    """Finished sequences from a rank's running file (its identity line and a line cut by a crash are ignored)."""
    if not os.path.isfile(path):
        return []
    done = []
    with open(path) as f:
        for line in f:
            try:
                done.append(SequenceResult(**json.loads(line)))
            except (json.JSONDecodeError, TypeError):
                continue
    return done


def _identity_line(path: str) -> dict | None:
    """The run identity recorded on a running file's first line; None if the file has no such line."""
    with open(path) as f:
        first = f.readline()
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return None
    return record.get("run") if isinstance(record, dict) else None


def check_resume(out_dir: str, identity: dict[str, Any]) -> None:
    """Refuse (ConfigError, one line) to resume from running files written by another evaluation."""
    ours = json.loads(json.dumps(identity))  # tuples -> lists, as the files hold them
    for path in partial_files(out_dir).values():
        if os.path.getsize(path) == 0:
            continue
        theirs = _identity_line(path)
        if theirs is None:
            raise ConfigError(f"resume=true, but {path} does not record which evaluation wrote it (an older version "
                              "of this project): use another eval_dir, or resume=false to start again")
        if theirs != ours:
            key = next(k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k))
            raise ConfigError(f"resume=true, but {out_dir} holds a partial evaluation with another {key} "
                              f"({theirs.get(key)!r} there, {ours.get(key)!r} now): use another eval_dir, or "
                              "resume=false to start again")


def format_summary(summary: dict) -> str:
    rates = " ".join(f"{k}/{CHAIN_LENGTH}: {v * 100:.1f}%" for k, v in summary["chain_sr"].items())
    text = (f"average successful sequence length {summary['avg_seq_len']:.3f} over {summary['num_sequences']} "
            f"sequences; chain success {rates}" + (f"; {summary['errors']} sequences raised errors"
                                                   if summary["errors"] else ""))
    run = summary.get("run")
    if run:
        text += (f"\nwall time {run['wall_seconds']:.1f} s, {run['env_steps']} env steps, "
                 f"{run['env_steps_per_second']:.1f} env steps/s ({run['processes']} process(es) x "
                 f"{run['envs_per_process']} env(s)), policy {run['policy_share'] * 100:.0f}% of the envs' time")
    return text


# ---------------------------------------------------------------- videos

def _fit(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image
    image = np.asarray(image, dtype=np.uint8)
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def video_frame(obs: dict, output: dict, size: int = 200) -> np.ndarray:
    """Real static | predicted static | real gripper | predicted gripper (predictions black when absent)."""
    tiles = []
    for cam in CAMERAS:
        tiles.append(_fit(obs["rgb_obs"][CAMERA_KEYS[cam]], size))
        pred = output.get(PREDICTION_KEYS[cam])
        tiles.append(_fit(pred, size) if pred is not None else np.zeros((size, size, 3), np.uint8))
    return np.concatenate(tiles, axis=1)


def write_video(path_without_ext: str, frames: list[np.ndarray], fps: int = 15) -> str:
    """mp4 through imageio-ffmpeg when it works, else an animated gif. Returns the path written."""
    import imageio
    os.makedirs(os.path.dirname(path_without_ext) or ".", exist_ok=True)
    try:
        path = path_without_ext + ".mp4"
        imageio.mimwrite(path, frames, fps=fps, macro_block_size=8)
    except Exception:  # no ffmpeg backend: gif needs only Pillow
        path = path_without_ext + ".gif"
        imageio.mimwrite(path, frames, duration=1000 / fps, loop=0)
    return path


# ---------------------------------------------------------------- driver

EvaluateMany = Callable[[list[EvalSequence], RunStats], Iterable[SequenceResult]]


def _prepare_partials(out_dir: str, rank: int, world: int, resume: bool, identity: dict[str, Any]
                      ) -> dict[int, SequenceResult]:
    """Results already in the running files (resume) or none (the files of this run's ranks are removed); this
    process's file starts with the identity line."""
    done: dict[int, SequenceResult] = {}
    if resume:
        check_resume(out_dir, identity)
        for path in partial_files(out_dir).values():  # any process count before: look in every file
            for r in read_partial(path):
                done.setdefault(r.index, r)
    else:
        stale = [partial_path(out_dir, rank)]
        if rank == 0:  # files of ranks this run does not have (an earlier run with more processes)
            stale += [p for r, p in partial_files(out_dir).items() if r >= world]
        for path in stale:
            if os.path.exists(path):
                os.remove(path)
    path = partial_path(out_dir, rank)
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        with open(path, "w") as f:
            f.write(json.dumps({"run": identity}) + "\n")
    return done


def run_sharded(evaluate_many: EvaluateMany, sequences: Sequence[EvalSequence], out_dir: str, rank: int = 0,
                world: int = 1, gather: Callable[[list], list] = lambda x: x, resume: bool = False,
                progress: bool = True, identity: dict[str, Any] | None = None,
                envs_per_process: int = 1) -> dict | None:
    """Evaluate this process's shard with `evaluate_many` (which yields results in any order and adds its time to
    the RunStats it is given), gather all results, and (main process) write the merged files.

    Returns the summary on the main process (rank 0), None elsewhere. `gather` concatenates a list across processes
    (accelerate.utils.gather_object); the default is the single-process identity.
    """
    os.makedirs(out_dir, exist_ok=True)
    identity = identity or {}
    done = _prepare_partials(out_dir, rank, world, resume, identity)
    mine = [sequences[i] for i in shard(len(sequences), rank, world)]
    results = [done[s.index] for s in mine if s.index in done]
    todo = [s for s in mine if s.index not in done]
    bar = tqdm(total=len(mine), initial=len(results), desc=f"eval [{rank}]", disable=not progress,
               dynamic_ncols=True, position=rank)
    stats, start = RunStats(), time.perf_counter()
    with open(partial_path(out_dir, rank), "a") as partial:
        for res in evaluate_many(todo, stats):
            results.append(res)
            partial.write(json.dumps(asdict(res)) + "\n")
            partial.flush()
            bar.update(1)
            rates = count_success([r.result for r in results])
            bar.set_description(f"eval [{rank}] " + " ".join(
                f"{i + 1}/{CHAIN_LENGTH}:{sr * 100:.0f}%" for i, sr in enumerate(rates)))
    bar.close()
    mine_stats = {"wall_seconds": time.perf_counter() - start, **asdict(stats)}
    everything = gather([{"results": [asdict(r) for r in results], "stats": mine_stats}])
    if rank != 0:
        return None
    merged: dict[int, SequenceResult] = {}
    for part in everything:
        for r in part["results"]:
            merged.setdefault(r["index"], SequenceResult(**r))
    run = run_summary([part["stats"] for part in everything], envs_per_process)
    return write_results(out_dir, list(merged.values()), run)


def evaluate_inline(env: EvalEnv, oracle: TaskOracle, policy: EvalPolicy, instructions: dict[str, str],
                    ep_len: int, video_dir: str | None = None) -> EvaluateMany:
    """evaluate_many for one env and one policy in this process: the sequences one after the other."""
    def evaluate_many(todo: list[EvalSequence], stats: RunStats) -> Iterator[SequenceResult]:
        for seq in todo:
            yield evaluate_sequence(env, oracle, policy, seq, instructions, ep_len, video_dir, stats)
    return evaluate_many


def run_protocol(env: EvalEnv, oracle: TaskOracle, policy: EvalPolicy, sequences: Sequence[EvalSequence],
                 instructions: dict[str, str], ep_len: int, out_dir: str, rank: int = 0, world: int = 1,
                 gather: Callable[[list], list] = lambda x: x, record_video: bool = False, resume: bool = False,
                 progress: bool = True, identity: dict[str, Any] | None = None) -> dict | None:
    """The sequential protocol: this process's shard on one env in this process (see run_sharded)."""
    video_dir = os.path.join(out_dir, "videos") if record_video else None
    return run_sharded(evaluate_inline(env, oracle, policy, instructions, ep_len, video_dir), sequences, out_dir,
                       rank, world, gather, resume, progress, identity)

"""CALVIN's multi-step evaluation protocol, independent of the environment backend and the policy.

Per sequence: env.reset(robot_obs, scene_obs); per subtask: obs = env.get_obs(), policy.reset(),
start_info = env.get_info(), then at most ep_len steps of action = policy.step(obs, instruction)['action'],
obs, _, _, info = env.step(action), success as soon as oracle.get_task_info_for_set(start_info, info, {task}) is
non-empty (checked after every step). No reset between subtasks; the first failure ends the sequence, whose result
is the number of consecutive successes (0-5).

Sharding: process r of P evaluates a contiguous block of the sequence list (sizes differ by at most one; nothing is
dropped). Results are gathered and the main process writes, for ALL sequences in list order:
- success_rate.txt: the reference's line format, "{i}/{num_sequences}: " + five "{sr:.3f} | ", one line per
  sequence, with the running chain success rates over sequences 0..i;
- result.txt: the reference's JSON {"null": {"avg_seq_len", "chain_sr": {"1".."5"}, "task_info": {task: {"success",
  "total"}}}};
- sequences.jsonl: one record per sequence (index, tasks, result, per-subtask success and steps, error);
- chain_success.png: a bar chart of the five chain success rates.
While running, each process appends its finished sequences to sequences_rank<r>.jsonl (nothing finished is lost in a
crash; with resume they are not evaluated again). An exception inside a sequence is recorded in its "error" field,
the sequence counts as failed at the subtask where it happened, and the run goes on.
"""
from __future__ import annotations

import json
import os
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm.auto import tqdm

from evaluation.interfaces import EvalEnv, EvalPolicy, TaskOracle

CHAIN = 5


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


# ---------------------------------------------------------------- rollout

def rollout(env: EvalEnv, oracle: TaskOracle, policy: EvalPolicy, task: str, instruction: str, ep_len: int,
            video: list | None = None) -> tuple[bool, int]:
    """One subtask from the current state: (success, steps taken)."""
    obs = env.get_obs()
    policy.reset()
    start_info = env.get_info()
    for step in range(1, ep_len + 1):
        output = policy.step(obs, instruction)
        obs, _, _, info = env.step(np.asarray(output["action"], dtype=np.float64))
        if video is not None:
            video.append(video_frame(obs, output))
        if oracle.get_task_info_for_set(start_info, info, {task}):
            return True, step
    return False, ep_len


def evaluate_sequence(env: EvalEnv, oracle: TaskOracle, policy: EvalPolicy, seq: EvalSequence,
                      instructions: dict[str, str], ep_len: int, video_dir: str | None = None) -> SequenceResult:
    """All subtasks of one sequence until the first failure; exceptions are recorded, not raised."""
    res = SequenceResult(seq.index, list(seq.tasks), condition=seq.condition)
    try:
        env.reset(robot_obs=seq.robot_obs, scene_obs=seq.scene_obs)
        for i, task in enumerate(seq.tasks):
            frames = [] if video_dir else None
            success, steps = rollout(env, oracle, policy, task, instructions[task], ep_len, frames)
            res.subtasks.append({"task": task, "success": success, "steps": steps})
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
    return [sum(r >= i for r in results) / n for i in range(1, CHAIN + 1)]


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


def write_results(out_dir: str, results: Sequence[SequenceResult]) -> dict:
    """The merged result files for all sequences (see the module docstring)."""
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
        json.dump({"null": reference}, f)
    with open(os.path.join(out_dir, "sequences.jsonl"), "w") as f:
        for r in results:
            f.write(json.dumps(asdict(r)) + "\n")
    bar_chart(os.path.join(out_dir, "chain_success.png"), count_success(counts),
              f"{len(results)} sequences, avg len {summary['avg_seq_len']:.3f}")
    return summary


def read_partial(path: str) -> list[SequenceResult]:
    """Finished sequences from a rank's running file (a line cut by a crash is ignored)."""
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


def format_summary(summary: dict) -> str:
    rates = " ".join(f"{k}/5: {v * 100:.1f}%" for k, v in summary["chain_sr"].items())
    return (f"average successful sequence length {summary['avg_seq_len']:.3f} over {summary['num_sequences']} "
            f"sequences; chain success {rates}" + (f"; {summary['errors']} sequences raised errors"
                                                   if summary["errors"] else ""))


# ---------------------------------------------------------------- videos and chart

def _fit(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image
    image = np.asarray(image, dtype=np.uint8)
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def video_frame(obs: dict, output: dict, size: int = 200) -> np.ndarray:
    """Real static | predicted static | real gripper | predicted gripper (predictions black when absent)."""
    tiles = []
    for cam in ("static", "gripper"):
        tiles.append(_fit(obs["rgb_obs"][f"rgb_{cam}"], size))
        pred = output.get(f"rgb_{cam}_pred")
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


def bar_chart(path: str, rates: Sequence[float], title: str) -> None:
    """A PNG bar chart of the chain success rates, drawn with Pillow."""
    from PIL import Image, ImageDraw
    width, height, margin = 520, 340, 50
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((margin, 12), f"CALVIN chain success rate — {title}", fill="black")
    plot_h = height - 2 * margin - 20
    base_y = height - margin
    draw.line((margin, base_y, width - margin // 2, base_y), fill="black")
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = base_y - tick * plot_h
        draw.line((margin - 4, y, margin, y), fill="black")
        draw.text((8, y - 6), f"{tick * 100:.0f}%", fill="black")
    bar_w = (width - 2 * margin) / (len(rates) * 1.5)
    for i, rate in enumerate(rates):
        x0 = margin + bar_w * (0.5 + 1.5 * i)
        draw.rectangle((x0, base_y - rate * plot_h, x0 + bar_w, base_y), fill=(52, 101, 164))
        draw.text((x0, base_y - rate * plot_h - 14), f"{rate * 100:.1f}%", fill="black")
        draw.text((x0 + bar_w / 3, base_y + 6), f"{i + 1}", fill="black")
    draw.text((width // 2 - 60, height - 22), "tasks completed in a row", fill="black")
    img.save(path)


# ---------------------------------------------------------------- driver

def run_protocol(env: EvalEnv, oracle: TaskOracle, policy: EvalPolicy, sequences: Sequence[EvalSequence],
                 instructions: dict[str, str], ep_len: int, out_dir: str, rank: int = 0, world: int = 1,
                 gather: Callable[[list], list] = lambda x: x, record_video: bool = False, resume: bool = False,
                 progress: bool = True) -> dict | None:
    """Evaluate this process's shard, gather all results, and (main process) write the merged files.

    Returns the summary on the main process (rank 0), None elsewhere. `gather` concatenates a list across processes
    (accelerate.utils.gather_object); the default is the single-process identity.
    """
    os.makedirs(out_dir, exist_ok=True)
    partial_path = os.path.join(out_dir, f"sequences_rank{rank}.jsonl")
    mine = [sequences[i] for i in shard(len(sequences), rank, world)]
    done = {r.index: r for r in read_partial(partial_path)} if resume else {}
    if not resume and os.path.exists(partial_path):
        os.remove(partial_path)
    video_dir = os.path.join(out_dir, "videos") if record_video else None
    results = [done[s.index] for s in mine if s.index in done]
    bar = tqdm(total=len(mine), initial=len(results), desc=f"eval [{rank}]", disable=not progress,
               dynamic_ncols=True, position=rank)
    for seq in mine:
        if seq.index in done:
            continue
        res = evaluate_sequence(env, oracle, policy, seq, instructions, ep_len, video_dir)
        results.append(res)
        with open(partial_path, "a") as f:
            f.write(json.dumps(asdict(res)) + "\n")
        bar.update(1)
        bar.set_description(f"eval [{rank}] " + " ".join(
            f"{i + 1}/5:{sr * 100:.0f}%" for i, sr in enumerate(count_success([r.result for r in results]))))
    bar.close()
    everything = gather([asdict(r) for r in results])
    if rank != 0:
        return None
    return write_results(out_dir, [SequenceResult(**r) for r in everything])

"""Demonstration recorder: runs the scripted expert in the built-in scene and writes a raw CALVIN-format split root
(what calvin2lmdb.py reads), so the whole pipeline can run without the CALVIN dataset.

    python -m evaluation.builtin_env.record --output_dir demos --episodes 12 --val_episodes 2 --workers 2

writes
    demos/training/    episode_0000000.npz ...  one compressed file per frame (keys and meaning as CALVIN's
                       datarenderer: actions = absolute TCP pose + gripper action of the NEXT frame, rel_actions =
                       to_relative_action(actions, robot_obs), robot_obs, scene_obs, rgb_static, rgb_gripper,
                       depth_static, depth_gripper; rgb_tactile / depth_tactile are zeros)
                       lang_annotations/auto_lang_ann.npy  {'info': {'indx': [(start, end) inclusive], 'episodes': []},
                       'language': {'ann': [...], 'task': [...], 'emb': zeros float32 (N, 1, 384)}}
                       ep_start_end_ids.npy, ep_lens.npy, scene_info.npy, statistics.yaml
    demos/validation/  the same (frame ids continue after training's), plus lang_annotations/embeddings.npy
    demos/manifest.json  how it was made: arguments, per-episode seed, tasks, windows (not a CALVIN file)

A recording episode = one reset to a random initial state (sequences.py's conditions) followed by a chain of
--tasks_per_episode tasks drawn with the evaluation's chain rule, solved one after the other without a reset. Each
task is one language window, from the frame where the expert starts it to POST_SUCCESS_FRAMES frames after the
oracle first reports it; a window is kept only if CALVIN's annotator check holds: the oracle finds exactly that task
between the window's first and last frame. An episode whose expert fails is redrawn (new seed, counted in the
manifest). Every episode's seed comes from (--seed, split, episode index, attempt), so the data set does not
depend on --workers.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import yaml

from evaluation.builtin_env import scene as sc
from evaluation.builtin_env.env import MAX_REL_ORN, MAX_REL_POS, BuiltinEnv
from evaluation.builtin_env.expert import ScriptedExpert
from evaluation.builtin_env.sequences import random_condition, sample_chain, scene_obs_for
from evaluation.builtin_env.tasks import TASK_NAMES, BuiltinTaskOracle, training_instruction, validation_annotations

SPLITS = ("training", "validation")
SCENE_NAME = "builtin_scene"  # scene_info.npy key (CALVIN: calvin_scene_A ... D)
MAX_TASK_STEPS = 120  # the expert needs 40-65; more means it failed
POST_SUCCESS_FRAMES = 4  # frames kept in a window after the oracle first reports its task
MAX_ATTEMPTS = 20  # redraws of one episode before giving up
LANG_EMB_SIZE = 384  # CALVIN's paraphrase-MiniLM-L6-v2 size; stored as zeros (GR1 uses CLIP on the text)
TACTILE_RGB_SHAPE = (160, 120, 6)  # CALVIN's two DIGIT sensors; zeros here
TACTILE_DEPTH_SHAPE = (160, 120, 2)
NORMALIZE_TARGET = "calvin_agent.utils.transforms.NormalizeVector"
VALIDATION = {task: sentences[0] for task, sentences in validation_annotations().items()}


# ---- CALVIN's action conventions ----
def state_to_action(robot_obs: np.ndarray) -> np.ndarray:
    """(7,) absolute action of a state: TCP position, TCP Euler, gripper action (calvin_env datarenderer)."""
    return np.concatenate([robot_obs[0:6], robot_obs[14:15]]).astype(np.float64)


def to_relative_action(actions: np.ndarray, robot_obs: np.ndarray) -> np.ndarray:
    """calvin_env's to_relative_action: (next - current) TCP position clipped to +-0.02 m then / 0.02; the wrapped
    Euler difference clipped to +-0.05 rad then / 0.05; the gripper action copied."""
    rel_pos = np.clip(actions[0:3] - robot_obs[0:3], -MAX_REL_POS, MAX_REL_POS) / MAX_REL_POS
    diff = actions[3:6] - robot_obs[3:6]
    rel_orn = np.clip((diff + np.pi) % (2 * np.pi) - np.pi, -MAX_REL_ORN, MAX_REL_ORN) / MAX_REL_ORN
    return np.concatenate([rel_pos, rel_orn, actions[6:7]]).astype(np.float64)


def frame_arrays(obs: dict, next_robot_obs: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays of one episode_XXXXXXX.npz (CALVIN's keys, shapes and dtypes)."""
    actions = state_to_action(next_robot_obs)
    return {
        "actions": actions,
        "rel_actions": to_relative_action(actions, obs["robot_obs"]),
        "robot_obs": obs["robot_obs"].astype(np.float64),
        "scene_obs": obs["scene_obs"].astype(np.float64),
        "rgb_static": obs["rgb_obs"]["rgb_static"],
        "rgb_gripper": obs["rgb_obs"]["rgb_gripper"],
        "rgb_tactile": np.zeros(TACTILE_RGB_SHAPE, dtype=np.uint8),
        "depth_static": obs["depth_obs"]["depth_static"].astype(np.float32),
        "depth_gripper": obs["depth_obs"]["depth_gripper"].astype(np.float32),
        "depth_tactile": np.zeros(TACTILE_DEPTH_SHAPE, dtype=np.float32),
    }


# ---- one episode ----
@dataclass
class EpisodeRecord:
    """What a worker returns for one recorded episode (frames are already on disk in `folder`)."""

    split: str
    index: int
    seed: list[int]
    attempts: int
    initial_scene_obs: list[float]
    tasks: list[str]
    windows: list[tuple[int, int]]  # local frame indices, inclusive
    success_frames: list[int]  # local index of the state where the oracle first reported each task
    annotations: list[str]
    n_frames: int
    folder: str = field(repr=False, default="")


def _episode_seed(seed: int, split: str, index: int, attempt: int) -> list[int]:
    return [seed, SPLITS.index(split), index, attempt]


def _run_tasks(env: BuiltinEnv, oracle: BuiltinTaskOracle, tasks: list[str], folder: str
               ) -> tuple[list[tuple[int, int]], list[int], int] | None:
    """Runs the expert through `tasks`, writing frame_XXXXXXX.npz files (local numbering) into `folder` as it goes.
    Returns (windows, success states, number of frames), or None when the expert failed or a window is ambiguous."""
    obs = env.get_obs()
    infos = [env.get_info()]
    n_frames = 0
    task_starts, successes = [], []
    for task in tasks:
        start_state = len(infos) - 1
        task_starts.append(start_state)
        start_info = infos[start_state]
        expert = ScriptedExpert(env, task)
        success, steps = None, 0
        while success is None or len(infos) - 1 < success + POST_SUCCESS_FRAMES:
            if steps >= MAX_TASK_STEPS or (expert.done and success is None):
                return None
            next_obs, _, _, info = env.step(expert.act())
            np.savez_compressed(os.path.join(folder, f"frame_{n_frames:07d}.npz"),
                                **frame_arrays(obs, next_obs["robot_obs"]))
            n_frames += 1
            obs = next_obs
            infos.append(info)
            steps += 1
            if success is None and oracle.get_task_info_for_set(start_info, info, {task}):
                success = len(infos) - 1
        successes.append(success)
    # The last state only supplies the previous frame's action (as CALVIN's datarenderer drops the done frame).
    ends = [start - 1 for start in task_starts[1:]] + [n_frames - 1]
    windows = list(zip(task_starts, ends))
    for task, (start, end) in zip(tasks, windows):
        if oracle.get_task_info(infos[start], infos[end]) != {task}:
            return None
    return windows, successes, n_frames


def record_episode(env: BuiltinEnv, oracle: BuiltinTaskOracle, split: str, index: int, seed: int,
                   tasks_per_episode: int, allowed: tuple[str, ...], folder: str,
                   annotations: str = "training") -> EpisodeRecord:
    """Records one episode into `folder` (frame_XXXXXXX.npz, local numbering), redrawing it on failure.
    annotations: 'training' draws a training paraphrase per window (as CALVIN's annotator); 'validation' uses the
    evaluation instruction (for runs whose text encoder cannot relate paraphrases, e.g. random CLIP weights)."""
    for attempt in range(MAX_ATTEMPTS):
        episode_seed = _episode_seed(seed, split, index, attempt)
        rng = np.random.default_rng(episode_seed)
        condition = random_condition(rng)
        tasks = sample_chain(rng, condition, tasks_per_episode, allowed)
        scene_obs = scene_obs_for(condition, rng)
        env.reset(sc.HOME_ROBOT_OBS, scene_obs)
        result = _run_tasks(env, oracle, tasks, folder)
        if result is not None:
            windows, successes, n_frames = result
            paraphrases = [training_instruction(task, rng) for task in tasks]  # drawn in both modes: same RNG use
            texts = paraphrases if annotations == "training" else [VALIDATION[task] for task in tasks]
            return EpisodeRecord(split, index, episode_seed, attempt + 1, scene_obs.tolist(), tasks, windows,
                                 successes, texts, n_frames, folder)
        for name in os.listdir(folder):
            os.remove(os.path.join(folder, name))
    raise RuntimeError(f"the expert failed {MAX_ATTEMPTS} times on {split} episode {index} (seed {seed})")


# ---- workers ----
_WORKER: dict = {}


def _worker_job(job: tuple) -> EpisodeRecord:
    if "env" not in _WORKER:
        _WORKER["env"] = BuiltinEnv(seed=0)
        _WORKER["oracle"] = BuiltinTaskOracle()
    split, index, seed, tasks_per_episode, allowed, folder, annotations = job
    os.makedirs(folder, exist_ok=True)
    return record_episode(_WORKER["env"], _WORKER["oracle"], split, index, seed, tasks_per_episode, allowed, folder,
                          annotations)


def _record_all(jobs: list[tuple], workers: int) -> list[EpisodeRecord]:
    if workers <= 1:
        try:
            return [_worker_job(job) for job in jobs]
        finally:
            if "env" in _WORKER:
                _WORKER.pop("env").close()
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers) as pool:
        return list(pool.imap(_worker_job, jobs))


# ---- split files ----
def _normalize_entry(values: np.ndarray) -> list[dict]:
    """statistics.yaml entry: one NormalizeVector with per-dimension mean and std. A constant dimension (the absent
    slider, drawer, switch and lightbulb) gets std 1.0 instead of 0 so that normalising it cannot divide by zero."""
    std = values.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return [{"_target_": NORMALIZE_TARGET, "mean": [round(float(v), 6) for v in values.mean(axis=0)],
             "std": [round(float(v), 6) for v in std]}]


def statistics(robot_obs: np.ndarray, scene_obs: np.ndarray, actions: np.ndarray) -> dict:
    """CALVIN's statistics.yaml content from (N, 15), (N, 24) and (N, 7) training arrays."""
    return {"robot_obs": _normalize_entry(robot_obs), "scene_obs": _normalize_entry(scene_obs),
            "act_min_bound": [round(float(v), 6) for v in actions.min(axis=0)],
            "act_max_bound": [round(float(v), 6) for v in actions.max(axis=0)]}


def _write_split(split_dir: str, episodes: list[EpisodeRecord], first_id: int) -> tuple[int, dict]:
    """Moves the episodes' frames into place with global ids and writes the split's index files.
    Returns (next free frame id, per-split summary)."""
    os.makedirs(os.path.join(split_dir, "lang_annotations"), exist_ok=True)
    frame_id = first_id
    start_end, indx, anns, tasks = [], [], [], []
    for episode in episodes:
        for local in range(episode.n_frames):
            os.replace(os.path.join(episode.folder, f"frame_{local:07d}.npz"),
                       os.path.join(split_dir, f"episode_{frame_id + local:07d}.npz"))
        start_end.append((frame_id, frame_id + episode.n_frames - 1))
        for (start, end), task, ann in zip(episode.windows, episode.tasks, episode.annotations):
            indx.append((frame_id + start, frame_id + end))
            tasks.append(task)
            anns.append(ann)
        frame_id += episode.n_frames
    np.save(os.path.join(split_dir, "ep_start_end_ids.npy"), np.array(start_end, dtype=np.int64).reshape(-1, 2))
    np.save(os.path.join(split_dir, "ep_lens.npy"), np.array([e - s + 1 for s, e in start_end], dtype=np.int64))
    np.save(os.path.join(split_dir, "scene_info.npy"), {SCENE_NAME: [first_id, frame_id - 1]})
    lang = {"info": {"episodes": [], "indx": indx},
            "language": {"ann": anns, "task": tasks, "emb": np.zeros((len(anns), 1, LANG_EMB_SIZE), np.float32)}}
    np.save(os.path.join(split_dir, "lang_annotations", "auto_lang_ann.npy"), lang)
    return frame_id, {"frames": frame_id - first_id, "windows": len(indx), "frame_ids": [first_id, frame_id - 1]}


def _write_validation_embeddings(split_dir: str) -> None:
    """validation/lang_annotations/embeddings.npy: task -> {'emb': zeros (1, 1, 384), 'ann': [instruction]}."""
    table = {task: {"emb": np.zeros((1, 1, LANG_EMB_SIZE), np.float32), "ann": anns}
             for task, anns in validation_annotations().items()}
    np.save(os.path.join(split_dir, "lang_annotations", "embeddings.npy"), table)


def _training_statistics(split_dir: str, n_frames: int, first_id: int) -> dict:
    robot_obs, scene_obs, actions = [], [], []
    for frame_id in range(first_id, first_id + n_frames):
        with np.load(os.path.join(split_dir, f"episode_{frame_id:07d}.npz")) as frame:
            robot_obs.append(frame["robot_obs"])
            scene_obs.append(frame["scene_obs"])
            actions.append(frame["actions"])
    return statistics(np.array(robot_obs), np.array(scene_obs), np.array(actions))


def record_dataset(output_dir: str, episodes: int, val_episodes: int, seed: int = 0, tasks_per_episode: int = 3,
                   tasks: tuple[str, ...] = TASK_NAMES, workers: int = 1, annotations: str = "training") -> dict:
    """Records the whole split root (see the module docstring); returns the manifest it also writes."""
    if annotations not in ("training", "validation"):
        raise ValueError(f"annotations must be 'training' or 'validation', got {annotations!r}")
    if episodes < 1 or val_episodes < 1:
        raise ValueError("need at least one training and one validation episode")
    unknown = set(tasks) - set(TASK_NAMES)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; the built-in scene has {list(TASK_NAMES)}")
    for split in SPLITS:
        if os.path.exists(os.path.join(output_dir, split)):
            raise FileExistsError(f"{os.path.join(output_dir, split)} exists; choose an empty --output_dir")
    os.makedirs(output_dir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".recording_", dir=output_dir)
    start = time.perf_counter()
    try:
        jobs = [(split, index, seed, tasks_per_episode, tuple(tasks), os.path.join(scratch, f"{split}_{index}"),
                 annotations)
                for split, count in zip(SPLITS, (episodes, val_episodes)) for index in range(count)]
        records = _record_all(jobs, workers)
        next_id, summaries = 0, {}
        for split in SPLITS:
            split_dir = os.path.join(output_dir, split)
            first_id = next_id
            next_id, summaries[split] = _write_split(split_dir, [r for r in records if r.split == split], next_id)
            if split == "training":
                stats = _training_statistics(split_dir, next_id - first_id, first_id)
        for split in SPLITS:  # CALVIN ships the training statistics in both splits
            with open(os.path.join(output_dir, split, "statistics.yaml"), "w") as f:
                yaml.safe_dump(stats, f, sort_keys=False)
        _write_validation_embeddings(os.path.join(output_dir, "validation"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.perf_counter() - start
    manifest = {
        "arguments": {"episodes": episodes, "val_episodes": val_episodes, "seed": seed,
                      "tasks_per_episode": tasks_per_episode, "tasks": list(tasks), "workers": workers,
                      "annotations": annotations},
        "splits": summaries, "seconds": round(seconds, 2),
        "episodes": [{k: v for k, v in asdict(r).items() if k != "folder"} for r in records],
    }
    with open(os.path.join(output_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="split root to create (training/, validation/)")
    parser.add_argument("--episodes", type=int, default=10, help="training recording episodes")
    parser.add_argument("--val_episodes", type=int, default=2, help="validation recording episodes")
    parser.add_argument("--tasks_per_episode", type=int, default=3,
                        help="tasks chained in one episode (one language window each)")
    parser.add_argument("--tasks", default=",".join(TASK_NAMES),
                        help="comma-separated task names to draw from (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seeds every episode (with its split and index)")
    parser.add_argument("--workers", type=int, default=1, help="processes recording episodes in parallel")
    parser.add_argument("--annotations", choices=("training", "validation"), default="training",
                        help="window instructions: training paraphrases (CALVIN's way) or the evaluation sentence")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    manifest = record_dataset(args.output_dir, args.episodes, args.val_episodes, args.seed, args.tasks_per_episode,
                              tasks, args.workers, args.annotations)
    windows = sum(s["windows"] for s in manifest["splits"].values())
    frames = sum(s["frames"] for s in manifest["splits"].values())
    print(f"wrote {windows} demonstrations ({frames} frames) to {args.output_dir} in {manifest['seconds']:.1f} s "
          f"({windows / manifest['seconds']:.2f} demos/s, {frames / manifest['seconds']:.1f} frames/s)")


if __name__ == "__main__":
    main(sys.argv[1:])

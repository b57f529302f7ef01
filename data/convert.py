"""Raw CALVIN split -> LMDB in GR1-Training's key schema: parallel, bounded transactions, resumable.

The whole output is a pure function of the input: the plan (every annotated segment of training/ then validation/,
each frame's step number, each segment's episode number) is computed up front, values are serialised
deterministically (data/calvin_format.py), and every transaction commits whole segments together with the progress
record (the ``conversion_info`` key). So a run killed at any moment leaves only whole segments behind, and re-running
the same command continues after the last committed one and ends with exactly the bytes of an uninterrupted run.
A finished LMDB is marked complete and is never appended to again unless --overwrite is given.

Worker processes load the npz frames and JPEG-encode the cameras; the main process alone writes the LMDB.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context

import lmdb
import numpy as np

from config import Config
from data import calvin_format as cf
from data.codec import dumps_value
from processes import pool_worker_init

INFO_VERSION = 1
WRITER = "GR1 calvin2lmdb"


class ConversionError(RuntimeError):
    """The conversion cannot start or continue; the message says what to fix."""


@dataclass(frozen=True)
class Plan:
    """Where every segment goes: segment i has episode number i and occupies steps first_step[i] ... + frames - 1."""

    input_dir: str
    segments: tuple[cf.Segment, ...]
    first_step: tuple[int, ...]
    splits: dict[str, dict[str, int]]  # split -> first_step, num_steps, first_episode, num_episodes
    digest: str  # identifies the input: splits, windows and instructions

    @property
    def num_steps(self) -> int:
        return sum(s.num_frames for s in self.segments)


def make_plan(input_dir: str, splits: tuple[str, ...] = cf.SPLITS) -> Plan:
    """Read the annotations of each split and number segments and steps as GR1-Training's converter does."""
    if not os.path.isdir(input_dir):
        raise cf.CalvinFormatError(f"--input_dir {input_dir} not found (give the split root, e.g. task_ABC_D/, "
                                   "that holds training/ and validation/)")
    segments: list[cf.Segment] = []
    first_step: list[int] = []
    split_info: dict[str, dict[str, int]] = {}
    step = 0
    for split in splits:
        split_segments = cf.load_segments(os.path.join(input_dir, split), split)
        split_info[split] = {"first_step": step, "first_episode": len(segments),
                             "num_episodes": len(split_segments),
                             "num_steps": sum(s.num_frames for s in split_segments)}
        for segment in split_segments:
            first_step.append(step)
            segments.append(segment)
            step += segment.num_frames
    digest = hashlib.sha256(json.dumps([[s.split, s.start, s.end, s.text] for s in segments]).encode()).hexdigest()
    return Plan(input_dir, tuple(segments), tuple(first_step), split_info, digest)


def check_frames_exist(plan: Plan) -> None:
    """Fail before writing anything if an episode file is missing (names the first one)."""
    seen: set[tuple[str, int]] = set()
    missing: list[str] = []
    for segment in plan.segments:
        split_dir = os.path.join(plan.input_dir, segment.split)
        for frame_id in range(segment.start, segment.end + 1):
            if (segment.split, frame_id) in seen:
                continue
            seen.add((segment.split, frame_id))
            if not os.path.isfile(cf.episode_path(split_dir, frame_id)):
                missing.append(cf.episode_path(split_dir, frame_id))
    if missing:
        raise cf.CalvinFormatError(f"missing episode file {missing[0]}" + (
            f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") + ": the annotation windows need them; "
            "re-extract the split")


# ---------------------------------------------------------------- work done in the worker processes

def encode_segment(split_dir: str, start: int, end: int, first_step: int, episode: int
                   ) -> list[tuple[bytes, bytes]]:
    """Every per-step (key, value) of one segment: load the npz frames, JPEG-encode, serialise."""
    pairs: list[tuple[bytes, bytes]] = []
    for offset, frame_id in enumerate(range(start, end + 1)):
        frame = cf.load_frame(cf.episode_path(split_dir, frame_id))
        pairs += cf.frame_values(first_step + offset, episode, frame_id == end, frame)
    return pairs


def _encode_task(task: tuple[str, int, int, int, int]) -> list[tuple[bytes, bytes]]:
    return encode_segment(*task)


# ---------------------------------------------------------------- instruction values

TextEmbedder = Callable[[np.ndarray], np.ndarray]  # int32 (N, 77) tokens -> (N, E) CLIP text embeddings


@dataclass
class Instructions:
    """Per distinct instruction: its CLIP tokens and, if a CLIP text encoder is given, its embedding."""

    tokens: dict[str, np.ndarray] = field(default_factory=dict)
    embeddings: dict[str, np.ndarray] | None = None

    @classmethod
    def build(cls, texts: list[str], embedder: TextEmbedder | None, batch: int = 64) -> Instructions:
        from models.encoders import tokenize  # the CLIP BPE tokenizer (needs torch); equal to clip.tokenize
        distinct = sorted(set(texts))  # a fixed order: a resumed run computes exactly the same embeddings
        tokens = {t: tokenize(t)[0].numpy() for t in distinct}
        embeddings = None
        if embedder is not None:
            embeddings = {}
            for i in range(0, len(distinct), batch):
                chunk = distinct[i:i + batch]
                for text, row in zip(chunk, embedder(np.stack([tokens[t] for t in chunk]))):
                    embeddings[text] = row
        return cls(tokens, embeddings)

    def values(self, episode: int, text: str) -> list[tuple[bytes, bytes]]:
        pairs = [(cf.episode_key("inst", episode), dumps_value(text)),
                 (cf.episode_key("inst_token", episode), dumps_value(self.tokens[text]))]
        if self.embeddings is not None:
            pairs.append((cf.episode_key("inst_emb", episode), dumps_value(self.embeddings[text])))
        return pairs


def clip_text_embedder(cfg: Config) -> TextEmbedder:
    """GR1-Training's inst_emb: CLIP encode_text(tokens) (unnormalised), on CPU, from cfg.clip_ckpt."""
    import torch

    from models.build import build_encoders
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="mae_ckpt is empty")  # only the text tower is used
        encoders = build_encoders(cfg.replace(mae_ckpt=""), "cpu")

    @torch.no_grad()
    def embed(tokens: np.ndarray) -> np.ndarray:
        return encoders.clip_text(torch.from_numpy(tokens).long()).cpu().numpy()

    return embed


# ---------------------------------------------------------------- the LMDB side

def new_info(plan: Plan, inst_emb: bool) -> dict:
    return {"writer": WRITER, "version": INFO_VERSION, "plan_digest": plan.digest, "splits": plan.splits,
            "num_segments": len(plan.segments), "num_steps": plan.num_steps, "segments_done": 0,
            "complete": False, "inst_emb": inst_emb, "jpeg_quality": cf.JPEG_QUALITY}


def open_output(output_dir: str, map_size: int) -> lmdb.Environment:
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConversionError(f"--output_dir {output_dir} is a file, not a directory")
    try:
        os.makedirs(output_dir, exist_ok=True)
        return lmdb.open(output_dir, map_size=map_size, subdir=True, readonly=False, meminit=False, map_async=False)
    except lmdb.Error as e:  # e.g. a data.mdb that is not an LMDB
        raise ConversionError(f"--output_dir {output_dir} holds a file that is not an LMDB ({_first_line(e)}): "
                              "use --overwrite to replace it or choose another --output_dir") from None
    except OSError as e:
        raise ConversionError(f"cannot create the LMDB in {output_dir} ({e.strerror or e})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else 'no detail'}"


def read_state(env: lmdb.Environment, output_dir: str) -> tuple[dict | None, bool]:
    """(conversion_info or None, whether the LMDB holds any key at all)."""
    try:
        with env.begin() as txn:
            raw, has_data = txn.get(cf.CONVERSION_INFO_KEY), txn.stat()["entries"] > 0
    except lmdb.Error as e:
        raise ConversionError(f"{output_dir}: the LMDB cannot be read ({_first_line(e)})") from None
    try:
        info = cf.loads_info(raw)
    except ValueError:  # not JSON: another application's key of the same name
        info = {}
    return (info if isinstance(info, dict) or info is None else {}), has_data


def remove_lmdb(output_dir: str) -> None:
    """--overwrite: delete the LMDB files of output_dir (only those)."""
    for name in ("data.mdb", "lock.mdb"):
        path = os.path.join(output_dir, name)
        if os.path.exists(path):
            os.remove(path)


def resume_point(info: dict | None, has_data: bool, plan: Plan, output_dir: str) -> int:
    """The first segment still to write; refuses to touch an LMDB this run must not append to."""
    if info is None and not has_data:
        return 0
    if info is None or info.get("writer") != WRITER:
        raise ConversionError(f"{output_dir} already holds an LMDB that this converter did not write (no "
                              "'conversion_info' record of calvin2lmdb.py): refusing to append to it. Use "
                              "--overwrite to replace it or choose another --output_dir")
    if info.get("plan_digest") != plan.digest:
        raise ConversionError(f"{output_dir} holds a conversion of a different input (its segments or instructions "
                              "differ): use --overwrite to replace it or choose another --output_dir")
    if info.get("complete"):
        raise ConversionError(f"{output_dir} is already a complete conversion of this input "
                              f"({info['num_steps']} steps); use --overwrite to convert again")
    return int(info["segments_done"])


def _ordered_results(tasks: list[tuple], workers: int) -> Iterator[list[tuple[bytes, bytes]]]:
    """encode_segment over tasks, in order, on `workers` processes, at most 2 x workers segments in flight."""
    if workers <= 1:
        for task in tasks:
            yield _encode_task(task)
        return
    # Workers die with this process, even if it is killed with SIGKILL, and leave Ctrl-C to it (processes.py).
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=pool_worker_init,
                             initargs=(os.getpid(),)) as pool:
        pending: deque[Future] = deque()
        todo = iter(tasks)
        try:
            for task in todo:
                pending.append(pool.submit(_encode_task, task))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # on an error or interrupt: no new segment starts


@dataclass
class ConversionStats:
    frames: int
    seconds: float
    resumed_from_segment: int

    @property
    def frames_per_second(self) -> float:
        return self.frames / max(self.seconds, 1e-9)


def convert(input_dir: str, output_dir: str, workers: int = 1, commit_every: int = 32, overwrite: bool = False,
            embedder: TextEmbedder | None = None, map_size: int = 1 << 40, progress: bool = True,
            max_segments: int | None = None) -> ConversionStats:
    """Convert (or finish converting) input_dir's training and validation splits into the LMDB at output_dir.

    embedder: CLIP text encoder for the optional inst_emb keys (None: not written).
    max_segments: stop after committing this many segments in total (for tests of resuming).
    """
    plan = make_plan(input_dir)  # input errors surface before the output is touched
    check_frames_exist(plan)
    if overwrite:
        remove_lmdb(output_dir)
    env = open_output(output_dir, map_size)
    try:
        return _convert(env, plan, output_dir, workers, commit_every, embedder, progress, max_segments)
    except BrokenProcessPool:
        raise ConversionError("a worker process died (killed, or out of memory?); committed segments are kept: run "
                              "the same command again to continue") from None
    except lmdb.MapFullError:
        raise ConversionError(f"{output_dir}: the LMDB reached its map size ({map_size / 2**30:g} GiB): re-run with "
                              "a larger --map_size_gb; committed segments are kept") from None
    except lmdb.Error as e:
        raise ConversionError(f"{output_dir}: LMDB write failed ({_first_line(e)}); committed segments are "
                              "kept") from None
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise ConversionError(f"{output_dir}: no space left on the device; free some and re-run the same command: "
                              "committed segments are kept") from None
    finally:
        env.close()


def _convert(env: lmdb.Environment, plan: Plan, output_dir: str, workers: int, commit_every: int,
             embedder: TextEmbedder | None, progress: bool, max_segments: int | None) -> ConversionStats:
    """convert()'s work once the output is open."""
    info, has_data = read_state(env, output_dir)
    start = resume_point(info, has_data, plan, output_dir)
    if info is not None and bool(info.get("inst_emb")) != (embedder is not None):
        raise ConversionError(f"{output_dir} was started {'with' if info.get('inst_emb') else 'without'} inst_emb "
                              f"(CLIP weights {'found' if info.get('inst_emb') else 'not configured'}); resume with "
                              "the same clip_ckpt setting or use --overwrite")
    info = info or new_info(plan, embedder is not None)
    instructions = Instructions.build([s.text for s in plan.segments], embedder)
    end = len(plan.segments) if max_segments is None else min(len(plan.segments), max_segments)
    began = time.perf_counter()
    frames = _write_segments(env, plan, info, instructions, start, end, workers, commit_every, progress)
    seconds = time.perf_counter() - began
    if end == len(plan.segments):
        _commit(env, [], {**info, "segments_done": end, "complete": True}, None)
    return ConversionStats(frames, seconds, start)


def _commit(env: lmdb.Environment, pairs: list[tuple[bytes, bytes]], info: dict, last_step: int | None) -> None:
    """One transaction: the values of whole segments, cur_step and the progress record, or nothing."""
    with env.begin(write=True) as txn:
        cursor = txn.cursor()
        cursor.putmulti(pairs)
        if last_step is not None:
            txn.put(cf.CUR_STEP_KEY, dumps_value(last_step))
        txn.put(cf.CONVERSION_INFO_KEY, cf.dumps_info(info))


def _write_segments(env: lmdb.Environment, plan: Plan, info: dict, instructions: Instructions, start: int, end: int,
                    workers: int, commit_every: int, progress: bool) -> int:
    from tqdm.auto import tqdm
    if start == 0 and info["segments_done"] == 0:
        _commit(env, [], info, None)  # record the plan first: a rerun with other input is detected
    tasks = [(os.path.join(plan.input_dir, s.split), s.start, s.end, plan.first_step[i], i)
             for i, s in enumerate(plan.segments[start:end], start)]
    total = sum(s.num_frames for s in plan.segments[start:end])
    bar = tqdm(total=total, unit="frame", desc="calvin2lmdb", disable=not progress, smoothing=0.05)
    pending: list[tuple[bytes, bytes]] = []
    done = start
    try:
        for episode, pairs in enumerate(_ordered_results(tasks, workers), start):
            pending += instructions.values(episode, plan.segments[episode].text) + pairs
            done = episode + 1
            bar.update(plan.segments[episode].num_frames)
            if (done - start) % commit_every == 0 or done == end:
                last_step = plan.first_step[episode] + plan.segments[episode].num_frames - 1
                info = {**info, "segments_done": done}
                _commit(env, pending, info, last_step)
                pending = []
    finally:
        bar.close()
    return total

"""The evaluation protocol against the real built-in pybullet scene: rollout loop, counting, sharding over
processes, merged result files, crash recording, resume, videos; and evaluate_calvin.py end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from config import load_config
from conftest import ROOT
from evaluation.builtin_env.env import BuiltinEnv
from evaluation.builtin_env.sequences import get_sequences
from evaluation.builtin_env.tasks import BuiltinTaskOracle, validation_annotations
from evaluation.protocol import (
    EvalSequence,
    SequenceResult,
    count_success,
    read_partial,
    run_protocol,
    shard,
    success_rate_line,
    task_info,
)
from evaluation.runner import ExpertPolicy, ZeroPolicy

INSTRUCTIONS = {task: sentences[0] for task, sentences in validation_annotations().items()}
EP_LEN = 90  # the scripted expert needs 40-70 steps per task


@pytest.fixture(scope="module")
def env():
    e = BuiltinEnv(seed=0, render=False)  # the expert reads privileged state; no cameras needed
    yield e
    e.close()


def sequences(n: int) -> list[EvalSequence]:
    return [EvalSequence(i, tasks, s["robot_obs"], s["scene_obs"]) for i, (s, tasks) in enumerate(get_sequences(n))]


class PlannedPolicy:
    """The scripted expert for the first `plan[k]` subtasks of the k-th sequence it meets, then zero actions (a
    failure); optionally raises inside one sequence. Sequence boundaries are known because the protocol runs
    plan[k] + 1 subtasks (5 when plan[k] == 5)."""

    def __init__(self, env, plan: list[int], crash_in: int | None = None):
        self.expert, self.zero = ExpertPolicy(env, INSTRUCTIONS), ZeroPolicy()
        self.plan, self.crash_in = plan, crash_in
        self.seq, self.subtask = 0, -1

    def reset(self) -> None:
        self.subtask += 1
        if self.subtask == min(self.plan[self.seq] + 1, 5):
            self.seq, self.subtask = self.seq + 1, 0
        self.expert.reset()

    def step(self, obs: dict, instruction: str) -> dict:
        if self.seq == self.crash_in and self.subtask == 1:
            self.subtask = min(self.plan[self.seq] + 1, 5) - 1  # the protocol moves on to the next sequence
            raise RuntimeError("policy exploded")
        if self.subtask < self.plan[self.seq]:
            return self.expert.step(obs, instruction)
        return self.zero.step(obs, instruction)


def test_shards_cover_every_sequence_once():
    for n, world in ((7, 2), (1000, 8), (1000, 3), (2, 4)):
        blocks = [shard(n, r, world) for r in range(world)]
        assert [i for b in blocks for i in b] == list(range(n))
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert list(map(len, (shard(7, 0, 2), shard(7, 1, 2)))) == [4, 3]


def test_counting_matches_calvin():
    assert count_success([0, 1, 5, 3]) == [0.75, 0.5, 0.5, 0.25, 0.25]
    results = [SequenceResult(0, ["a", "b", "c", "d", "e"], 2), SequenceResult(1, ["b", "a", "c", "d", "e"], 5)]
    info = task_info(results)
    assert info["a"] == {"success": 2, "total": 2} and info["c"] == {"success": 1, "total": 2}
    assert success_rate_line(3, 1000, [1, 0.5, 0.25, 0, 0]) == "3/1000: 1.000 | 0.500 | 0.250 | 0.000 | 0.000 | \n"


def test_expert_and_zero_policies_in_the_real_scene(env, tmp_path):
    seqs = sequences(2)
    oracle = BuiltinTaskOracle()
    expert = run_protocol(env, oracle, ExpertPolicy(env, INSTRUCTIONS), seqs, INSTRUCTIONS, EP_LEN,
                          str(tmp_path / "expert"), progress=False)
    assert expert["avg_seq_len"] == 5.0 and expert["chain_sr"]["5"] == 1.0
    zero = run_protocol(env, oracle, ZeroPolicy(), seqs, INSTRUCTIONS, 20, str(tmp_path / "zero"), progress=False)
    assert zero["avg_seq_len"] == 0.0
    rows = [json.loads(line) for line in open(tmp_path / "zero" / "sequences.jsonl")]
    assert [r["subtasks"] for r in rows] == [[{"task": s.tasks[0], "success": False, "steps": 20}] for s in seqs]


def _files(folder) -> dict[str, str]:
    """The result files, without result.txt's "run" entry (wall time and speed differ between runs)."""
    files = {name: open(os.path.join(folder, name)).read() for name in ("success_rate.txt", "sequences.jsonl")}
    return {**files, "result.txt": json.load(open(os.path.join(folder, "result.txt")))["null"]}


def _without_run(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "run"}


def test_seven_sequences_over_two_processes_merge_to_the_single_process_result(env, tmp_path):
    plan = [5, 0, 2, 5, 1, 3, 0]
    seqs = sequences(7)
    oracle = BuiltinTaskOracle()
    single = run_protocol(env, oracle, PlannedPolicy(env, plan), seqs, INSTRUCTIONS, EP_LEN, str(tmp_path / "one"),
                          progress=False)
    assert [json.loads(r)["result"] for r in open(tmp_path / "one" / "sequences.jsonl")] == plan

    gathered: list = []  # a fake gather: rank 1 runs first and hands its list to rank 0
    shard_plans = {0: plan[:4], 1: plan[4:]}
    outputs = {}
    for rank in (1, 0):
        def gather(items, rank=rank):
            gathered[:0] = items if rank == 0 else []
            if rank == 1:
                gathered.extend(items)
            return list(gathered)
        outputs[rank] = run_protocol(env, oracle, PlannedPolicy(env, shard_plans[rank]), seqs, INSTRUCTIONS, EP_LEN,
                                     str(tmp_path / "two"), rank=rank, world=2, gather=gather, progress=False)
    assert outputs[1] is None and _without_run(outputs[0]) == _without_run(single)
    assert _files(tmp_path / "two") == _files(tmp_path / "one")
    run = json.load(open(tmp_path / "two" / "result.txt"))["run"]  # an extra key the reference's readers ignore
    assert run["env_steps"] == single["run"]["env_steps"] == sum(
        s["steps"] for line in open(tmp_path / "one" / "sequences.jsonl") for s in json.loads(line)["subtasks"])
    assert run["processes"] == 2 and run["wall_seconds"] > 0 and 0 < run["policy_share"] < 1
    lines = open(tmp_path / "two" / "success_rate.txt").read().splitlines()
    assert len(lines) == 7 and lines[-1] == success_rate_line(6, 7, count_success(plan)).rstrip("\n")
    result = json.load(open(tmp_path / "two" / "result.txt"))["null"]
    assert result["avg_seq_len"] == pytest.approx(sum(plan) / 7)
    assert set(result["chain_sr"]) == {"1", "2", "3", "4", "5"}
    assert sum(v["total"] for v in result["task_info"].values()) == sum(min(p + 1, 5) for p in plan)


def test_a_crashing_sequence_is_recorded_and_the_run_goes_on(env, tmp_path):
    plan = [2, 5, 1]
    summary = run_protocol(env, BuiltinTaskOracle(), PlannedPolicy(env, plan, crash_in=1), sequences(3),
                           INSTRUCTIONS, EP_LEN, str(tmp_path), progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "sequences.jsonl")]
    assert [r["result"] for r in rows] == [2, 1, 1]
    assert rows[1]["error"] and "policy exploded" in rows[1]["error"] and rows[0]["error"] is None
    assert summary["errors"] == 1


def test_resume_skips_finished_sequences(env, tmp_path):
    seqs = sequences(3)
    run_protocol(env, BuiltinTaskOracle(), ZeroPolicy(), seqs[:2], INSTRUCTIONS, 5, str(tmp_path), progress=False)
    assert len(read_partial(str(tmp_path / "sequences_rank0.jsonl"))) == 2

    class Counting(ZeroPolicy):
        resets = 0

        def reset(self):
            Counting.resets += 1

    summary = run_protocol(env, BuiltinTaskOracle(), Counting(), seqs, INSTRUCTIONS, 5, str(tmp_path), resume=True,
                           progress=False)
    assert Counting.resets == 1 and summary["num_sequences"] == 3


def test_videos_and_charts(tmp_path):
    with BuiltinEnv(seed=0) as env:
        seq = sequences(1)

        class WithPredictions(ZeroPolicy):
            def step(self, obs, instruction):
                return {**super().step(obs, instruction), "rgb_static_pred": np.zeros((32, 32, 3), np.uint8),
                        "rgb_gripper_pred": np.full((32, 32, 3), 255, np.uint8)}

        run_protocol(env, BuiltinTaskOracle(), WithPredictions(), seq, INSTRUCTIONS, 4, str(tmp_path),
                     record_video=True, progress=False)
    videos = os.listdir(tmp_path / "videos")
    assert len(videos) == 1 and videos[0].startswith(f"seq0000_sub0_{seq[0].tasks[0]}_fail.")
    assert os.path.getsize(tmp_path / "videos" / videos[0]) > 1000
    from PIL import Image

    from evaluation.charts import CHAIN_SIZE, DPI, task_chart_size
    for name, size in (("chain_success.png", (CHAIN_SIZE[0] * DPI, CHAIN_SIZE[1] * DPI)),
                       ("task_success.png", task_chart_size(1))):  # one task asked (and failed)
        with Image.open(tmp_path / name) as image:
            image.verify()  # a complete, valid PNG
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.size == size, name
            assert len(image.convert("L").getcolors(1 << 16)) > 8  # something was drawn


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from models.build import build_gr1, save_checkpoint
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.json"))
    path = str(tmp_path_factory.mktemp("ckpt") / "GR1_1.pth")
    save_checkpoint(build_gr1(cfg), path, cfg)
    return path


def launch_evaluation(processes: int, *overrides: str) -> subprocess.CompletedProcess:
    """evaluate_calvin.py on the tiny config, in 1 process or in 2 CPU processes (gloo) under accelerate launch."""
    from helpers import free_port
    launcher = ([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                 str(free_port())] if processes == 2 else [sys.executable])
    cmd = launcher + ["evaluate_calvin.py", "--config", os.path.join(ROOT, "configs", "tiny.json"), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("processes", [1, 2])
def test_evaluate_calvin_runs_the_builtin_scene_from_a_checkpoint(tiny_checkpoint, tmp_path, processes):
    """1 process with 1 env on 2 sequences; 2 processes x 2 env workers on 8 sequences, whose per-sequence results
    equal the sequential protocol's (this process, one env, the checkpoint's GR-1)."""
    out, n = tmp_path / "eval", (2 if processes == 1 else 8)
    proc = launch_evaluation(processes, f"ckpt_path={tiny_checkpoint}", f"eval_dir={out}", f"num_sequences={n}",
                             "ep_len=8", "record_evaluation_video=true", f"eval_envs_per_process={processes}")
    assert "average successful sequence length" in proc.stdout and "env steps/s" in proc.stdout
    assert len(open(out / "success_rate.txt").read().splitlines()) == n
    result = json.load(open(out / "result.txt"))
    assert result["null"]["avg_seq_len"] == 0.0 and result["run"]["env_steps"] == 8 * n
    assert (result["run"]["processes"], result["run"]["envs_per_process"]) == (processes, processes)
    assert len(os.listdir(out / "videos")) == n
    assert torch.load(tiny_checkpoint, weights_only=True)["format"] == "gr1-training"
    if processes == 2:
        from data.preprocess import ImagePreprocessor
        from evaluation.backends import evaluation_sequences
        from evaluation.policy import GR1Policy
        from models.build import build_model
        cfg = load_config(os.path.join(ROOT, "configs", "tiny.json"), [f"num_sequences={n}"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random encoders
            encoders, gr1, _ = build_model(cfg, "cpu", weights=tiny_checkpoint)
        policy = GR1Policy(cfg, encoders, gr1.eval(), ImagePreprocessor(cfg, "cpu"), "cpu")
        with BuiltinEnv() as env:
            run_protocol(env, BuiltinTaskOracle(), policy, evaluation_sequences(cfg), INSTRUCTIONS, 8,
                         str(tmp_path / "sequential"), progress=False)
        assert open(out / "sequences.jsonl").read() == open(tmp_path / "sequential" / "sequences.jsonl").read()


def test_runner_drives_the_real_calvin_simulator(tmp_path):
    """eval_backend=calvin: the official sequence 0 from its initial state in calvin_env (where installed)."""
    pytest.importorskip("calvin_env", reason="calvin_env is not installed (see README: real CALVIN simulator)")
    from accelerate import Accelerator

    from evaluation.runner import evaluate
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.json"),
                      ["eval_backend=calvin", "eval_policy=zero", "num_sequences=1000", "eval_sequence_start=999",
                       "ep_len=3"])
    summary = evaluate(cfg, None, None, Accelerator(cpu=True), str(tmp_path))
    row = json.loads(open(tmp_path / "sequences.jsonl").read())
    assert summary["num_sequences"] == 1 and row["index"] == 999 and row["subtasks"][0]["steps"] == 3
    from evaluation.sequences import get_sequences
    assert row["tasks"] == get_sequences(1000)[999][1]

"""Evaluation with env worker processes (evaluation/pool.py, evaluation/env_worker.py) and batched GR-1 queries
(evaluation/policy.py, whose own tests are in test_policy.py), in the built-in scene:
- 1 env, 3 envs per process and 2 processes x 2 envs give the sequential protocol's per-sequence results (steps
  per subtask) on 8 sequences, with the scripted expert (inside the workers) and with a fixed-weight tiny GR-1
  (served in batches by this process; its actions and the states they lead to are compared too; its 2 x 2 run is an
  accelerate launch in test_protocol.py);
- a killed worker and a policy exception are recorded and the run completes; workers die with their parent;
- resume with any number of envs neither repeats nor loses a sequence, and refuses another evaluation's files;
- sequence slices, run statistics, the software-renderer warning.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from config import ConfigError, load_config
from conftest import ROOT
from evaluation.backends import EnvSpec, evaluation_sequences, validation_instructions
from evaluation.builtin_env.env import BuiltinEnv
from evaluation.builtin_env.tasks import BuiltinTaskOracle
from evaluation.pool import EnvPool
from evaluation.protocol import RunStats, check_resume, run_protocol, run_sharded
from evaluation.runner import ExpertPolicy, ZeroPolicy, evaluate, run_identity, warn_if_software_renderer
from helpers import random_policy_model

TINY = os.path.join(ROOT, "configs", "tiny.json")
TASKS = "turn_on_led,turn_off_led,push_red_block_left,push_red_block_right,lift_red_block_table"
EXPERT_EP_LEN = 45  # the expert needs 30-70 steps: some subtasks succeed, some fail
INSTRUCTIONS = validation_instructions("builtin")


def config(*overrides: str):
    return load_config(TINY, [f"builtin_tasks={TASKS}", *overrides])


def rows(out_dir) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out_dir, "sequences.jsonl"))]


def run_pool(n_envs: int, spec: EnvSpec, policy, sequences, ep_len: int, out_dir, **kwargs) -> dict:
    with EnvPool(n_envs, spec, policy, INSTRUCTIONS, ep_len) as pool:
        if hasattr(policy, "pool"):
            policy.pool = pool
        return run_sharded(pool.evaluate, sequences, str(out_dir), progress=False, envs_per_process=n_envs,
                           **kwargs)


# ---------------------------------------------------------------- batched GR-1


@pytest.fixture(scope="module")
def tiny_gr1():
    cfg = config("test_chunk_size=2", "seed=3")
    encoders, gr1, pre = random_policy_model(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the env workers need the cores (evaluation.runner.policy_threads does the same)
    yield cfg, encoders, gr1, pre
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- same results as the sequential protocol


@pytest.fixture(scope="module")
def expert_sequences():
    return evaluation_sequences(config("num_sequences=8"))


@pytest.fixture(scope="module")
def sequential_expert(expert_sequences, tmp_path_factory):
    out = tmp_path_factory.mktemp("sequential_expert")
    with BuiltinEnv(render=False) as env:
        run_protocol(env, BuiltinTaskOracle(), ExpertPolicy(env, INSTRUCTIONS), expert_sequences, INSTRUCTIONS,
                     EXPERT_EP_LEN, str(out), progress=False)
    return rows(out)


@pytest.mark.parametrize("n_envs", [1, 3])
def test_env_workers_give_the_sequential_results_with_the_expert(n_envs, expert_sequences, sequential_expert,
                                                                 tmp_path):
    summary = run_pool(n_envs, EnvSpec(render=False), "expert", expert_sequences, EXPERT_EP_LEN, tmp_path)
    assert rows(tmp_path) == sequential_expert
    results = [r["result"] for r in sequential_expert]
    assert len(set(results)) >= 3, results  # a mix of short and long chains: the comparison means something
    assert summary["run"]["env_steps"] == sum(s["steps"] for r in sequential_expert for s in r["subtasks"])


def test_two_processes_with_two_env_workers_each_give_the_sequential_results_with_the_expert(expert_sequences,
                                                                                               sequential_expert,
                                                                                               tmp_path):
    """Processes 1 then 0 of 2 (the accelerate launch of 2 processes x 2 envs runs in test_protocol.py with GR-1;
    here a fake gather hands rank 1's results to rank 0, which saves two process launches)."""
    gathered: list = []

    def gather(items: list, rank: int) -> list:
        gathered[len(gathered) if rank else 0:0] = items
        return list(gathered)

    for rank in (1, 0):
        with EnvPool(2, EnvSpec(render=False), "expert", INSTRUCTIONS, EXPERT_EP_LEN) as pool:
            summary = run_sharded(pool.evaluate, expert_sequences, str(tmp_path), rank, 2,
                                  lambda items, rank=rank: gather(items, rank), progress=False, envs_per_process=2)
    assert rows(tmp_path) == sequential_expert
    assert (summary["run"]["processes"], summary["run"]["envs_per_process"]) == (2, 2)


class Recording:
    """Wraps a policy (EvalPolicy, or BatchPolicy with .pool set) and records, per (sequence, subtask), the robot
    states it was shown and the actions it gave."""

    def __init__(self, policy):
        self.policy, self.pool = policy, None
        self.traces: dict[tuple[int, int], list] = defaultdict(list)
        self.subtask: dict[int, int] = defaultdict(lambda: -1)

    def _record(self, key, obs, out):
        self.traces[key].append(np.concatenate([obs["robot_obs"], out["action"]]))

    # BatchPolicy
    def reset(self, env_id: int | None = None) -> None:
        seq = self.pool.workers[env_id].seq.index if env_id is not None else None
        self.subtask[seq] += 1
        self.policy.reset(env_id) if env_id is not None else self.policy.reset()

    def act(self, requests):
        outputs = self.policy.act(requests)
        for slot, (obs, _) in requests.items():
            seq = self.pool.workers[slot].seq.index
            self._record((seq, self.subtask[seq]), obs, outputs[slot])
        return outputs

    # EvalPolicy (sequential: sequences follow each other, so the subtask order is the sequence order)
    def step(self, obs, instruction):
        out = self.policy.step(obs, instruction)
        self._record((None, self.subtask[None]), obs, out)
        return out


def test_env_workers_give_the_sequential_results_with_a_tiny_gr1(tiny_gr1, tmp_path):
    """The tiny GR-1 (fixed random weights) moves the arm about: per sequence the same steps per subtask, and per step
    the same robot states and actions (within 1e-5) whether it drives 1 env in this process or 3 env workers."""
    from evaluation.policy import GR1BatchPolicy, GR1Policy
    cfg, encoders, gr1, pre = tiny_gr1
    seqs = evaluation_sequences(config("num_sequences=8"))
    ep_len = 8
    sequential = Recording(GR1Policy(cfg, encoders, gr1, pre, "cpu"))
    with BuiltinEnv() as env:
        run_protocol(env, BuiltinTaskOracle(), sequential, seqs, INSTRUCTIONS, ep_len, str(tmp_path / "one"),
                     progress=False)
    reference = [np.stack(trace) for trace in sequential.traces.values()]  # in order
    assert len(reference) == sum(len(r["subtasks"]) for r in rows(tmp_path / "one"))
    moved = np.abs(reference[0][-1, :3] - reference[0][0, :3]).max()
    assert moved > 0.01  # the arm moved: the states compared are not all the home pose
    for n_envs in (1, 3):
        pooled = Recording(GR1BatchPolicy(cfg, encoders, gr1, pre, "cpu"))
        run_pool(n_envs, EnvSpec(), pooled, seqs, ep_len, tmp_path / str(n_envs))
        assert rows(tmp_path / str(n_envs)) == rows(tmp_path / "one")
        traces = [np.stack(trace) for _, trace in sorted(pooled.traces.items())]  # by sequence, then subtask
        assert len(traces) == len(reference)
        assert all(a.shape == b.shape and np.abs(a - b).max() <= 1e-5 for a, b in zip(traces, reference))


# ---------------------------------------------------------------- failures


class ZeroBatch:
    """Zero actions served by this process; kills the worker of sequence `kill` at its 3rd step, raises in the
    query of sequence `explode`."""

    def __init__(self, kill: int | None = None, explode: int | None = None):
        self.pool, self.kill, self.explode, self.steps = None, kill, explode, Counter()

    def reset(self, env_id: int) -> None:
        pass

    def act(self, requests):
        for slot in requests:
            worker = self.pool.workers[slot]
            self.steps[worker.seq.index] += 1
            if worker.seq.index == self.kill and self.steps[worker.seq.index] == 3:
                os.kill(worker.proc.pid, signal.SIGKILL)
            if worker.seq.index == self.explode:
                raise RuntimeError("policy exploded")
        return {slot: ZeroPolicy().step(obs, text) for slot, (obs, text) in requests.items()}


def test_a_killed_worker_is_recorded_and_the_run_completes(tmp_path):
    seqs = evaluation_sequences(config("num_sequences=6"))
    policy = ZeroBatch(kill=2)
    summary = run_pool(2, EnvSpec(render=False), policy, seqs, 5, tmp_path)
    out = rows(tmp_path)
    assert [r["index"] for r in out] == list(range(6)) and summary["errors"] == 1
    assert "died (signal SIGKILL) during subtask 1" in out[2]["error"] and out[2]["result"] == 0
    assert all(r["error"] is None and r["subtasks"][0]["steps"] == 5 for i, r in enumerate(out) if i != 2)
    exploding = ZeroBatch(explode=1)  # one env: the failed query concerns that sequence only
    run_pool(1, EnvSpec(render=False), exploding, seqs[:3], 5, tmp_path / "explode")
    out = rows(tmp_path / "explode")
    assert "policy exploded" in out[1]["error"] and out[0]["error"] is None and out[2]["error"] is None


def test_workers_die_with_their_parent(tmp_path):
    """The parent is SIGKILLed while its workers step long subtasks (zero actions inside the workers, so they send
    nothing for minutes): they must notice on their own."""
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from evaluation.backends import EnvSpec, evaluation_sequences, validation_instructions\n"
        "from evaluation.pool import EnvPool\n"
        "from evaluation.protocol import RunStats\n"
        "from config import load_config\n"
        "seqs = evaluation_sequences(load_config(sys.argv[2], ['num_sequences=2']))\n"
        "pool = EnvPool(2, EnvSpec(render=False), 'zero', validation_instructions('builtin'), 10 ** 6)\n"
        "print(*pool.pids, flush=True)\n"
        "list(pool.evaluate(seqs, RunStats()))\n")
    parent = subprocess.Popen([sys.executable, "-c", script, ROOT, TINY], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    time.sleep(0.5)  # they are stepping now
    parent.kill()  # SIGKILL: the parent cannot clean up
    parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [p for p in pids if _alive(p)]
    for pid in survivors:  # do not leave them running when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not survivors


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------- resume


def interrupted_after(n_results: int):
    """Runs a pool's evaluation and stops it (as a kill would) after n_results sequences were written."""
    def evaluate_many(pool):
        def run(todo, stats):
            for i, result in enumerate(pool.evaluate(todo, stats)):
                yield result
                if i + 1 == n_results:
                    raise KeyboardInterrupt
        return run
    return evaluate_many


def test_resume_with_any_number_of_envs_neither_repeats_nor_loses_a_sequence(expert_sequences, sequential_expert,
                                                                             tmp_path):
    cfg = config("num_sequences=8", "eval_policy=expert", f"ep_len={EXPERT_EP_LEN}")
    identity = run_identity(cfg)
    with EnvPool(3, EnvSpec(render=False), "expert", INSTRUCTIONS, EXPERT_EP_LEN) as pool:
        with pytest.raises(KeyboardInterrupt):
            run_sharded(interrupted_after(3)(pool), expert_sequences, str(tmp_path), progress=False,
                        identity=identity)
    first = [json.loads(line) for line in open(tmp_path / "sequences_rank0.jsonl")]
    assert first[0] == {"run": json.loads(json.dumps(identity))} and len(first) == 4

    evaluated = []
    with EnvPool(2, EnvSpec(render=False), "expert", INSTRUCTIONS, EXPERT_EP_LEN) as pool:
        def counting(todo, stats):
            evaluated.extend(s.index for s in todo)
            return pool.evaluate(todo, stats)
        run_sharded(counting, expert_sequences, str(tmp_path), resume=True, progress=False, identity=identity)
    assert sorted(evaluated + [r["index"] for r in first[1:]]) == list(range(8))  # nothing twice, nothing lost
    assert rows(tmp_path) == sequential_expert  # each sequence once, in order, with the straight run's results


def test_resume_refuses_another_evaluations_files(tmp_path):
    """An interrupted eval_policy=expert run; resuming it with another policy, checkpoint, sequence list or ep_len is
    a one-line error (evaluate_calvin.py: 'error: ...', exit 2); the true resume, with 3 envs, completes it."""
    cfg = config("num_sequences=6", "eval_policy=expert", "ep_len=30", f"eval_dir={tmp_path}")
    seqs = evaluation_sequences(cfg)
    with EnvPool(2, EnvSpec(render=False), "expert", INSTRUCTIONS, 30) as pool:
        with pytest.raises(KeyboardInterrupt):
            run_sharded(interrupted_after(2)(pool), seqs, str(tmp_path), progress=False, identity=run_identity(cfg))
    ckpt_a, ckpt_b = tmp_path / "a.pth", tmp_path / "b.pth"
    ckpt_a.write_bytes(b"a")
    ckpt_b.write_bytes(b"b")
    gr1 = cfg.replace(eval_policy="gr1")
    others = {"eval_policy": cfg.replace(eval_policy="zero"), "num_sequences": cfg.replace(num_sequences=7),
              "sequences": cfg.replace(eval_sequence_start=1), "builtin_tasks": cfg.replace(builtin_tasks=""),
              "seed": cfg.replace(seed=1), "ep_len": cfg.replace(ep_len=31)}
    for key, other in others.items():
        with pytest.raises(ConfigError, match=f"another {key} "):
            check_resume(str(tmp_path), run_identity(other))
    check_resume(str(tmp_path), run_identity(cfg))  # the same evaluation: fine
    with open(tmp_path / "sequences_rank1.jsonl", "w") as f:  # a second process's file, of a GR-1 run
        f.write(json.dumps({"run": run_identity(gr1, str(ckpt_a))}) + "\n")
    with pytest.raises(ConfigError, match="another checkpoint "):
        check_resume(str(tmp_path), run_identity(gr1, str(ckpt_b)))
    os.remove(tmp_path / "sequences_rank1.jsonl")

    proc = subprocess.run([sys.executable, "evaluate_calvin.py", "--config", TINY, f"builtin_tasks={TASKS}",
                           "eval_policy=zero", "num_sequences=6", "ep_len=30", f"eval_dir={tmp_path}", "resume=true"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    last = proc.stderr.strip().splitlines()[-1]  # (pybullet prints its build time before)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and last.startswith("error: resume=true, but")
    assert "another eval_policy ('expert' there, 'zero' now)" in last

    from accelerate import Accelerator
    summary = evaluate(cfg.replace(resume=True, eval_envs_per_process=3), None, None, Accelerator(cpu=True),
                       str(tmp_path))
    assert [r["index"] for r in rows(tmp_path)] == list(range(6)) and summary["num_sequences"] == 6


# ---------------------------------------------------------------- slices, statistics, warnings


def test_sequence_slice_selects_within_the_whole_list():
    whole = evaluation_sequences(config("num_sequences=12"))
    part = evaluation_sequences(config("num_sequences=12", "eval_sequence_start=3", "eval_sequence_count=4"))
    assert [s.index for s in part] == [3, 4, 5, 6]
    assert [s.tasks for s in part] == [s.tasks for s in whole[3:7]]
    assert all(np.array_equal(a.scene_obs, b.scene_obs) for a, b in zip(part, whole[3:7]))
    assert [s.index for s in evaluation_sequences(config("num_sequences=12", "eval_sequence_start=10"))] == [10, 11]
    with pytest.raises(ConfigError, match="exceeds 'num_sequences'"):
        config("num_sequences=12", "eval_sequence_start=10", "eval_sequence_count=3")
    with pytest.raises(ConfigError, match="eval_envs_per_process"):
        config("eval_envs_per_process=0")
    with pytest.raises(ConfigError, match="eval_reset"):
        config("eval_reset=fast")


def test_software_renderer_warning():
    calvin = config("eval_backend=calvin")
    with pytest.warns(RuntimeWarning, match="libnvidia-gl"):
        assert warn_if_software_renderer(calvin, ["llvmpipe (LLVM 15.0.6, 256 bits)"], cuda=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_software_renderer(calvin, ["llvmpipe (LLVM 15.0.6, 256 bits)"], cuda=False)
        assert not warn_if_software_renderer(calvin, ["NVIDIA GeForce RTX 4090/PCIe/SSE2"], cuda=True)
        assert not warn_if_software_renderer(config(), ["llvmpipe"], cuda=True)


def test_run_statistics_add_up():
    stats = RunStats()
    stats.add({"env_steps": 3, "env_seconds": 0.3, "policy_seconds": 0.1})
    stats.add({"env_steps": 2, "env_seconds": 0.2, "policy_seconds": 0.0})
    from evaluation.protocol import run_summary
    run = run_summary([{"wall_seconds": 1.0, **vars(stats)}, {"wall_seconds": 2.0, "env_steps": 5,
                                                              "env_seconds": 0.5, "policy_seconds": 0.5}], 3)
    assert run == {"wall_seconds": 2.0, "env_steps": 10, "env_steps_per_second": 5.0, "policy_share": 0.375,
                   "processes": 2, "envs_per_process": 3}

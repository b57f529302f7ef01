"""The env workers of one accelerate process, and the loop that keeps them busy.

    with EnvPool(n_envs, spec, policy, instructions, ep_len) as pool:
        for result in pool.evaluate(sequences, stats): ...      # protocol.EvaluateMany, used by run_sharded

Each worker (evaluation/env_worker.py, a separate interpreter) builds its own env and runs whole sequences with
protocol.evaluate_sequence. A worker that finishes a sequence takes the next one of this process's list at once, so
one long sequence never stalls the others. `policy` is either a BatchPolicy served here (GR-1): at each tick every
worker waiting for an action is served by ONE batched query, while the other workers keep stepping; or the name of a
baseline that runs inside the workers ('zero', 'expert').

Failures: a policy exception in a batched query is sent to the workers it concerned, whose sequences record it (as in
the sequential protocol); a worker that dies (crash, kill, or silent for WORKER_TIMEOUT_S) gets its sequence
recorded with an error (the subtasks it finished are kept, the sequence counts as failed at the one it was in) and is
restarted, and the run goes on. Workers die with this process (see env_worker.py).
"""
from __future__ import annotations

import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from evaluation.backends import EnvSpec
from evaluation.env_worker import recv_message, send_message, sequence_message
from evaluation.interfaces import BatchPolicy
from evaluation.protocol import EvalSequence, RunStats, SequenceResult
from facts import CAMERA_KEYS, PREDICTION_KEYS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER_TIMEOUT_S = 600.0  # a worker silent this long while running a sequence is taken for hung and restarted
LOG_TAIL_LINES = 15
STOP_GRACE_S = 5.0  # time a worker gets to exit (calvin_env disconnects) before it is killed
EMA = 0.1  # weight of the newest sample in the running averages of env step and query times


class EvalWorkerError(RuntimeError):
    """An env worker could not be started; the message includes the end of its log."""


@dataclass(eq=False)  # compared by identity
class _Worker:
    slot: int
    proc: subprocess.Popen
    sock: socket.socket
    log_path: str
    seq: EvalSequence | None = None  # the sequence it is running
    subtasks: list[dict] = field(default_factory=list)  # the subtasks of seq it finished
    heard: float = field(default_factory=time.monotonic)  # when it last sent something
    answered: float | None = None  # when it was last sent an action (None: since its subtask began)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _log_tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-LOG_TAIL_LINES:]).rstrip()
    except OSError:
        return "(no log)"


class EnvPool:
    """n_envs env worker processes and the policy that serves them (see the module docstring)."""

    def __init__(self, n_envs: int, spec: EnvSpec, policy: BatchPolicy | str, instructions: dict[str, str],
                 ep_len: int, video_dir: str | None = None, policy_on_cpu: bool = False):
        self.spec, self.policy, self.n_envs, self.policy_on_cpu = spec, policy, n_envs, policy_on_cpu
        self.init = {"type": "init", "spec": spec.to_dict(), "instructions": instructions, "ep_len": ep_len,
                     "video_dir": video_dir, "policy": policy if isinstance(policy, str) else "remote"}
        self.log_dir = tempfile.mkdtemp(prefix="gr1-eval-workers-")
        self.selector = selectors.DefaultSelector()
        self.workers: list[_Worker] = []
        self.renderers: list[str] = []  # OpenGL renderer of each worker's env ('' when not known)
        self._queue: deque[EvalSequence] = deque()
        self._step_seconds = self._query_seconds = 0.0  # running averages (batching, see evaluate)
        self._deadline = 0.0  # serve the waiting requests by then
        try:
            self.workers = [self._launch(slot) for slot in range(n_envs)]  # all start at once
            self.renderers = [self._wait_ready(w) for w in self.workers]
        except BaseException:
            self.close()
            raise

    # ---- lifecycle ----
    def _launch(self, slot: int) -> _Worker:
        ours, theirs = socket.socketpair()
        log_path = os.path.join(self.log_dir, f"env{slot}.log")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        # Mesa's software renderer (llvmpipe, CPU machines) starts one thread per core in every worker by default
        env.setdefault("LP_NUM_THREADS", str(max(1, available_cores() // self.n_envs)))
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "evaluation.env_worker", "--fd", str(theirs.fileno()), "--parent",
                 str(os.getpid())], pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, env=env)
        theirs.close()
        ours.settimeout(WORKER_TIMEOUT_S)
        worker = _Worker(slot, proc, ours, log_path)
        try:
            send_message(ours, self.init)
        except OSError:
            pass  # it died at once: _wait_ready says so
        return worker

    def _wait_ready(self, worker: _Worker) -> str:
        try:
            header, _ = recv_message(worker.sock)
        except (EOFError, OSError) as error:
            header = {"type": "failed", "error": f"{error!r}; exit code {worker.proc.poll()}"}
        if header["type"] != "ready":
            raise EvalWorkerError(f"env worker {worker.slot} could not build its env: {header.get('error', '').strip()}"
                                  f"\nits log ends with:\n{_log_tail(worker.log_path)}")
        self.selector.register(worker.sock, selectors.EVENT_READ, worker)
        return header.get("renderer", "")

    def _stop(self, worker: _Worker) -> None:
        """Ask the worker to exit; one still busy with a sequence after STOP_GRACE_S (an interrupted run) is killed."""
        try:
            self.selector.unregister(worker.sock)
        except (KeyError, ValueError):
            pass
        try:
            send_message(worker.sock, {"type": "close"})
        except OSError:
            pass
        worker.sock.close()
        try:
            worker.proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            worker.proc.kill()
            worker.proc.wait()

    def close(self) -> None:
        for worker in self.workers:
            self._stop(worker)
        self.workers = []
        self.selector.close()
        shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers]

    # ---- the loop ----
    def evaluate(self, sequences: Sequence[EvalSequence], stats: RunStats) -> Iterator[SequenceResult]:
        """Results of `sequences` as they finish (protocol.EvaluateMany); the envs' time is added to stats.

        Batching: waiting requests are served when every busy worker is waiting, or once the first of them has
        waited a typical env step (running average; a worker that is resetting is not waited for longer). A policy
        on a GPU waits at most a typical query: its work does not take the envs' cores, so a fuller batch saves
        little, and an env waits at most the time a query costs anyway. A policy on the CPU takes the cores the envs
        step on: fewer, fuller batches leave them more; the workers fall into step with each other, one full batch
        per tick (measured with the demo GR-1 and 2 envs on 2 cores: 45 env steps/s, against 35 when waiting a
        query's time and 25 when serving each request at once), instead of taking turns one by one."""
        self._queue = deque(sequences)
        for worker in self.workers:
            self._assign(worker)
        requests: dict[int, tuple[dict, str]] = {}
        while any(w.seq is not None for w in self.workers):
            finished: list[SequenceResult] = []
            wait = max(0.0, self._deadline - time.monotonic()) if requests else 1.0
            ready = self.selector.select(timeout=wait)
            while ready:  # everything that has arrived
                for key, _ in ready:
                    self._receive(key.data, requests, finished, stats)
                ready = self.selector.select(timeout=0)
            busy = sum(w.seq is not None for w in self.workers)
            if requests and (len(requests) >= busy or time.monotonic() >= self._deadline):
                self._serve(requests)
                requests = {}
            for worker in list(self.workers):
                if worker.seq is not None and time.monotonic() - worker.heard > WORKER_TIMEOUT_S:
                    worker.proc.kill()  # hung: its socket closes and the next select reports it
            yield from finished

    def _assign(self, worker: _Worker) -> None:
        worker.seq, worker.subtasks, worker.heard = None, [], time.monotonic()
        if self._queue:
            worker.seq = self._queue.popleft()
            try:
                send_message(worker.sock, *sequence_message(worker.seq))
            except OSError:
                pass  # dead: the next select reports it

    def _receive(self, worker: _Worker, requests: dict, finished: list[SequenceResult], stats: RunStats) -> None:
        if worker not in self.workers:
            return  # replaced in this round
        try:
            header, arrays = recv_message(worker.sock)
        except (EOFError, OSError):
            finished.extend(self._replace(worker))
            requests.pop(worker.slot, None)
            return
        worker.heard = time.monotonic()
        kind = header["type"]
        if kind == "act":
            obs = {"rgb_obs": dict(zip(CAMERA_KEYS.values(), arrays)), "robot_obs": arrays[len(CAMERA_KEYS)]}
            if not requests:
                patience = self._step_seconds if self.policy_on_cpu else min(self._step_seconds, self._query_seconds)
                self._deadline = worker.heard + patience
            requests[worker.slot] = (obs, header["instruction"])
            if worker.answered is not None:  # from its last action to this request: one env step
                self._step_seconds += EMA * (worker.heard - worker.answered - self._step_seconds)
        elif kind == "reset":
            self.policy.reset(worker.slot)
            worker.answered = None  # its next request follows a reset, not a step
        elif kind == "subtask":
            worker.subtasks.append({k: header[k] for k in ("task", "success", "steps")})
        elif kind == "done":
            stats.add(header["stats"])
            finished.append(SequenceResult(**header["result"]))
            self._assign(worker)

    def _serve(self, requests: dict[int, tuple[dict, str]]) -> None:
        """One batched query for every waiting worker; a policy exception goes to each of them."""
        start = time.monotonic()
        try:
            outputs = self.policy.act(requests)
            replies = {}
            for slot, out in outputs.items():
                frames = [k for k in PREDICTION_KEYS.values() if k in out]
                replies[slot] = ({"type": "action", "frames": frames},
                                 [np.asarray(out["action"], np.float64)] + [np.asarray(out[k]) for k in frames])
        except Exception:
            error = traceback.format_exc(limit=8)
            replies = {slot: ({"type": "error", "error": error}, []) for slot in requests}
        now = time.monotonic()
        self._query_seconds += EMA * (now - start - self._query_seconds)
        for slot, (header, arrays) in replies.items():
            worker = self.workers[slot]
            worker.answered = now
            try:
                send_message(worker.sock, header, arrays)
            except OSError:
                pass  # dead: the next select reports it

    def _replace(self, worker: _Worker) -> list[SequenceResult]:
        """A worker died: its sequence's result with the error, and a new worker in its slot."""
        try:
            code = worker.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            worker.proc.kill()
            code = worker.proc.wait()
        reason = (f"signal {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals()
                  else f"exit code {code}")
        results = []
        if worker.seq is not None:
            seq, done = worker.seq, worker.subtasks
            res = SequenceResult(seq.index, list(seq.tasks), subtasks=list(done), condition=seq.condition)
            while res.result < len(done) and done[res.result]["success"]:
                res.result += 1
            res.error = (f"env worker {worker.slot} (pid {worker.proc.pid}) died ({reason}) during subtask "
                         f"{len(done) + 1} ({seq.tasks[min(len(done), len(seq.tasks) - 1)]}); it was restarted. "
                         f"Its log ends with:\n{_log_tail(worker.log_path)}")
            results.append(res)
        self._stop(worker)
        new = self._launch(worker.slot)
        self.workers[worker.slot] = new
        self._wait_ready(new)
        self._assign(new)
        return results

"""An env worker process: one simulator evaluating whole sequences for its accelerate process (evaluation/pool.py),
which serves the policy's actions to all its workers in batches.

    python -m evaluation.env_worker --fd <socket fd> --parent <pid>      (started by evaluation/pool.py only)

The worker runs protocol.evaluate_sequence itself (reset, subtasks, oracle check after every step, counting), so the
protocol is the same code as in the sequential path. The policy is either served by the main process (RemotePolicy:
each step sends the observation and waits for the action) or, for the baselines, runs here beside the env (the
scripted expert reads the simulator's privileged state). Per step only the images and robot_obs travel, never the
info dicts. A fresh interpreter (not a fork, and not multiprocessing's spawn, which re-imports the entry point and
with it torch and transformers, ~4 s and hundreds of MB per worker): this module imports only numpy and the
backend.

Messages (both ways) over a Unix socket: a 4-byte length, a JSON header, then the raw bytes of the numpy arrays the
header lists (dtype, shape); no pickle.
    main -> worker: init {spec, policy, instructions, ep_len, video_dir}; run {sequence} + robot_obs, scene_obs;
                    action {frames} + action (7,) [, rgb_static_pred, rgb_gripper_pred] | error {error}; close
    worker -> main: ready {renderer} | failed {error}; reset; act {instruction} + rgb_static, rgb_gripper,
                    robot_obs; subtask {record}; done {result, stats}
The worker dies with its parent (processes.pool_worker_init: the kernel's parent-death signal, or a thread that
watches the parent where that is unavailable) and leaves Ctrl-C to it; a closed socket also ends it.
"""
from __future__ import annotations

import argparse
import json
import socket
import struct
import traceback
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from facts import CAMERA_KEYS
from processes import pool_worker_init

_LENGTH = struct.Struct("!I")
_DTYPES = ("uint8", "float32", "float64", "int64")


# ---------------------------------------------------------------- messages

def send_message(sock: socket.socket, header: dict[str, Any], arrays: Sequence[np.ndarray] = ()) -> None:
    """One message: the JSON header (plus the arrays' dtypes and shapes), then each array's bytes."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    for a in arrays:
        if a.dtype.name not in _DTYPES:
            raise TypeError(f"cannot send an array of dtype {a.dtype}")
    data = json.dumps({**header, "arrays": [[a.dtype.name, list(a.shape)] for a in arrays]}).encode()
    sock.sendall(_LENGTH.pack(len(data)) + data)
    for a in arrays:
        if a.nbytes:
            sock.sendall(memoryview(a.reshape(-1)).cast("B"))


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buffer = bytearray(n)
    view, got = memoryview(buffer), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError("the other end closed the connection")
        got += k
    return buffer


def recv_message(sock: socket.socket) -> tuple[dict[str, Any], list[np.ndarray]]:
    """(header, arrays) of the next message; EOFError when the other end is gone."""
    (length,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size))
    header = json.loads(_recv_exact(sock, length))
    arrays = []
    for dtype, shape in header.pop("arrays"):
        if dtype not in _DTYPES:
            raise ValueError(f"unexpected array dtype {dtype!r} in a message")
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        arrays.append(np.frombuffer(_recv_exact(sock, size), dtype=dtype).reshape(shape))
    return header, arrays


def sequence_message(seq: Any) -> tuple[dict[str, Any], list[np.ndarray]]:
    """A 'run' message for an EvalSequence (its states travel as exact float64 arrays)."""
    return ({"type": "run", "index": seq.index, "tasks": list(seq.tasks), "condition": seq.condition},
            [np.asarray(seq.robot_obs, np.float64), np.asarray(seq.scene_obs, np.float64)])


# ---------------------------------------------------------------- worker side

class RemotePolicy:
    """The EvalPolicy interface over the socket: the main process computes the actions (in batches)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def reset(self) -> None:
        send_message(self.sock, {"type": "reset"})

    def step(self, obs: dict, instruction: str) -> dict[str, Any]:
        send_message(self.sock, {"type": "act", "instruction": instruction},
                     [*(obs["rgb_obs"][key] for key in CAMERA_KEYS.values()), obs["robot_obs"]])
        header, arrays = recv_message(self.sock)
        if header["type"] == "error":
            raise RuntimeError(f"the policy raised in the main process:\n{header['error']}")
        if header["type"] != "action":
            raise RuntimeError(f"expected an action from the main process, got {header['type']!r}")
        return {"action": arrays[0], **dict(zip(header["frames"], arrays[1:]))}


def serve(sock: socket.socket) -> None:
    """Build the env from the init message, then evaluate the sequences the main process sends until it closes."""
    from evaluation.backends import EnvSpec, make_env, make_oracle, make_worker_policy
    from evaluation.protocol import EvalSequence, RunStats, evaluate_sequence

    init, _ = recv_message(sock)
    try:
        spec = EnvSpec(**init["spec"])
        env = make_env(spec)
        oracle = make_oracle(spec)
        instructions = init["instructions"]
        policy = (RemotePolicy(sock) if init["policy"] == "remote"
                  else make_worker_policy(init["policy"], env, instructions))
    except Exception:
        send_message(sock, {"type": "failed", "error": traceback.format_exc()})
        return
    send_message(sock, {"type": "ready", "renderer": getattr(env, "renderer", "")})
    try:
        while True:
            try:
                header, arrays = recv_message(sock)
            except EOFError:
                return
            if header["type"] == "close":
                return
            seq = EvalSequence(header["index"], header["tasks"], arrays[0], arrays[1], header["condition"])
            stats = RunStats()
            result = evaluate_sequence(env, oracle, policy, seq, instructions, init["ep_len"], init["video_dir"],
                                       stats, lambda record: send_message(sock, {"type": "subtask", **record}))
            send_message(sock, {"type": "done", "result": asdict(result), "stats": asdict(stats)})
    finally:
        close = getattr(env, "close", None)
        if close:
            close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="env worker of evaluation/pool.py (not for direct use)")
    parser.add_argument("--fd", type=int, required=True, help="this worker's end of the socket pair")
    parser.add_argument("--parent", type=int, required=True, help="pid of the process that started it")
    args = parser.parse_args(argv)
    # Dies with its parent (even a SIGKILLed one); Ctrl-C reaches the whole process group: the parent decides
    pool_worker_init(args.parent)
    with socket.socket(fileno=args.fd) as sock:
        serve(sock)


if __name__ == "__main__":
    main()

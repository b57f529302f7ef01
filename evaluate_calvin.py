"""Evaluate a GR-1 checkpoint with CALVIN's multi-step protocol:
    accelerate launch evaluate_calvin.py [--config configs.json] [key=value ...]

The sequences are split over the processes (none dropped); each process runs eval_envs_per_process simulators in
worker processes, served by one policy with batched queries. Results of all sequences are gathered and written to
eval_dir (default save_path/eval/): success_rate.txt, result.txt (GR1-Training's formats), sequences.jsonl,
chain_success.png, task_success.png and, with record_evaluation_video=true, videos/. eval_backend=builtin (default)
uses the built-in pybullet scene; eval_backend=calvin the real CALVIN simulator (calvin_env).
"""
from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from config import Config, ConfigError, add_config_arguments, config_from_args, explicit_keys
from evaluation.pool import EvalWorkerError
from models.build import CheckpointError, build_model, config_for_checkpoint, default_weights_path
from models.files import checkpoint_path
from processes import INTERRUPTED_EXIT_CODE, die_with_launcher


def main(cfg: Config, explicit: frozenset[str] = frozenset()) -> dict | None:
    """Evaluate; `explicit` are the keys the user set (a checkpoint's architecture overrides the others)."""
    from evaluation.runner import evaluate
    acc = Accelerator(cpu=not torch.cuda.is_available(),
                      kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=4))])
    encoders = gr1 = weights = None
    if cfg.eval_policy == "gr1":
        weights = default_weights_path(cfg)
        if weights is None:
            raise CheckpointError(f"no policy weights: {checkpoint_path(cfg.save_path, cfg.load_epoch)} "
                                  "does not exist; set ckpt_path=<file> (or load_epoch / load_bytedance_ckpt)")
        cfg = config_for_checkpoint(cfg, weights, explicit)  # the model is rebuilt from the checkpoint's config
        encoders, gr1, report = build_model(cfg, acc.device, weights=weights)
        gr1.eval()
        acc.print(report)
    out_dir = cfg.eval_dir or os.path.join(cfg.save_path, "eval")
    with torch.no_grad():
        return evaluate(cfg, encoders, gr1, acc, out_dir, weights)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    args = parser.parse_args()
    die_with_launcher()  # under accelerate launch / torchrun: a killed launcher ends this process (and its env workers)
    main_process = os.environ.get("RANK", "0") == "0"  # every process meets the same bad input: say it once
    try:
        main(config_from_args(args), explicit_keys(args))
    except KeyboardInterrupt:
        if main_process:
            print("interrupted: the finished sequences are kept (resume=true continues after them)", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)
    except (ConfigError, CheckpointError, OSError, EvalWorkerError) as e:
        if main_process or isinstance(e, (OSError, EvalWorkerError)):  # these may concern one process only
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

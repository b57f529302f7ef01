"""Train GR-1 on a CALVIN LMDB:  accelerate launch Main.py [--config configs.json] [key=value ...]

Runs on CPU (accelerate launch --cpu), one GPU, many GPUs or many nodes. Writes to save_path: GR1_<epoch>.pth
(GR1-Training's checkpoint layout), state/ (the full training state for resume=true), logs/ (TensorBoard),
metrics.jsonl, training_curves.png and config.json (the resolved config). The loop is training/trainer.py.
"""
from __future__ import annotations

import argparse
import os
import sys

from config import Config, ConfigError, add_config_arguments, config_from_args, explicit_keys
from evaluation.pool import EvalWorkerError
from models.build import CheckpointError, config_for_checkpoint
from processes import INTERRUPTED_EXIT_CODE, die_with_launcher
from training.step import NonFiniteLossError
from training.trainer import Trainer, TrainingStopped, error_line

# reported in one line, exit code 2 (EvalWorkerError: evaluate_during_training's simulators could not start)
USER_ERRORS = (ConfigError, CheckpointError, NonFiniteLossError, OSError, EvalWorkerError)


def main(cfg: Config, explicit: frozenset[str] = frozenset()) -> None:
    """Train; fine-tuning from ckpt_path takes the architecture that checkpoint records (explicit keys must agree)."""
    if cfg.ckpt_path:
        cfg = config_for_checkpoint(cfg, cfg.ckpt_path, explicit)
    Trainer(cfg).run()


if __name__ == "__main__":
    die_with_launcher()  # under accelerate launch / torchrun: a killed launcher stops this process cleanly
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    args = parser.parse_args()
    main_process = os.environ.get("RANK", "0") == "0"
    try:
        main(config_from_args(args), explicit_keys(args))
    except TrainingStopped as e:
        if main_process:
            print(e, file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)
    except KeyboardInterrupt:
        print("interrupted: the last saved training state is kept (resume=true continues from it)", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)
    except USER_ERRORS as e:
        if main_process or not isinstance(e, NonFiniteLossError):  # every process has the same NaN message
            print(f"error: {error_line(e)}", file=sys.stderr)
        sys.exit(2)

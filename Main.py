"""Train GR-1 on a CALVIN LMDB:  accelerate launch Main.py [--config configs.json] [key=value ...]

Runs on CPU (accelerate launch --cpu), one GPU, many GPUs or many nodes. Writes to save_path: GR1_<epoch>.pth
(GR1-Training's checkpoint layout), state/ (the full training state for resume=true), logs/ (TensorBoard),
metrics.jsonl and config.json (the resolved config).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed
from tqdm.auto import tqdm

from config import Config, ConfigError, add_config_arguments, config_from_args, save_config
from data.loader import DevicePrefetcher, batches_per_epoch, make_loader
from models.build import CheckpointError, build_model, policy_state_dict, save_checkpoint
from processes import INTERRUPTED_EXIT_CODE, StopSignals, die_with_launcher
from training import (
    NonFiniteLossError,
    TrainingStopped,
    agree,
    check_save_path,
    compute_losses,
    empty_totals,
    error_line,
    lr_factor,
    make_optimizer,
    mean_losses,
    nonfinite,
    nonfinite_report,
)
from training_state import (
    TrainState,
    lmdb_fingerprint,
    load_saved_weights,
    restore_state,
    resume_point,
    run_record,
    save_training_state,
)

USER_ERRORS = (ConfigError, CheckpointError, NonFiniteLossError, OSError)  # reported in one line, exit code 2


def make_accelerator(cfg: Config) -> Accelerator:
    cuda = torch.cuda.is_available()
    # cpu=True without CUDA: several processes (torchrun / accelerate launch --multi_gpu) then use gloo on CPU
    return Accelerator(cpu=not cuda, mixed_precision=cfg.mixed_precision if cuda else "no", kwargs_handlers=[
        DistributedDataParallelKwargs(find_unused_parameters=False),  # every trainable parameter gets a gradient
        InitProcessGroupKwargs(timeout=timedelta(hours=2))])  # others wait while one process evaluates


class Trainer:
    """Owns the run's objects; each method is one phase of the loop."""

    def __init__(self, cfg: Config):
        from data.lmdb_dataset import make_datasets
        from data.preprocess import ImagePreprocessor
        self.cfg = cfg
        self.acc = acc = make_accelerator(cfg)
        self.device = acc.device
        check_save_path(cfg.save_path)
        set_seed(cfg.seed + acc.process_index)  # augmentation differs per process; restored on resume
        self.train_set, self.val_set = make_datasets(cfg)  # fails fast on a missing LMDB or an empty split
        pin = self.device.type == "cuda"
        self.train_loader = make_loader(self.train_set, cfg, acc.process_index, acc.num_processes, True, pin)
        self.val_loader = make_loader(self.val_set, cfg, acc.process_index, acc.num_processes, False, pin,
                                      seed_offset=1)
        self.n_batches = batches_per_epoch(self.train_loader)
        if self.n_batches == 0:
            raise ConfigError(f"the training split has {len(self.train_set)} windows, fewer than bs_per_gpu x "
                              f"processes = {cfg.bs_per_gpu * acc.num_processes}: lower bs_per_gpu")
        self.updates_per_epoch = math.ceil(self.n_batches / cfg.gradient_accumulation_steps)
        self.preprocessor = ImagePreprocessor(cfg, self.device)
        self.state = TrainState()
        self.fingerprint = lmdb_fingerprint(self.train_set.index.episode_of_step, self.train_set.index.info)
        saved, notes = resume_point(cfg, acc.num_processes, acc.process_index, self.fingerprint)
        for note in notes:
            acc.print(note, file=sys.stderr)
        self.encoders, gr1, report = build_model(cfg, self.device, weights=None if saved else "default")
        if report:
            acc.print(report)
        if saved:
            load_saved_weights(gr1, saved)
        gr1.train()
        self.gr1 = torch.compile(gr1) if cfg.compile_model else gr1
        optimizer = make_optimizer(self.gr1, cfg, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        self.model, self.optimizer = acc.prepare(self.gr1, optimizer)
        self.bad_batch: int | None = None  # first batch of the current accumulation group with a non-finite loss
        self.stop_agreed = False  # the processes agreed to stop (a signal) after the current step
        if saved:
            self.state = restore_state(saved, self.optimizer, self.scheduler, acc.scaler)
            acc.print(f"resumed from {saved.path}: epoch {self.state.epoch}, batch {self.state.batch_in_epoch}, "
                      f"update {self.state.update}")
        self.val_iter = self._cycle_val()
        self.writer = None
        if acc.is_main_process:
            os.makedirs(cfg.save_path, exist_ok=True)
            save_config(cfg, os.path.join(cfg.save_path, "config.json"))
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(cfg.save_path, "logs"))

    def _lr_factor(self, update: int) -> float:
        return lr_factor(update, self.cfg, self.updates_per_epoch, self.n_batches, self.acc.num_processes,
                         len(self.train_set))

    # ---- one optimiser step's worth of batches ----
    def train_batch(self, batch: dict, sync: bool, group: int, stop_requested: bool) -> tuple[dict[str, float], bool]:
        """Forward/backward one batch; the optimiser steps when `sync` (the last batch of an accumulation group of
        `group` batches, whose gradients are averaged). At that point the processes agree on whether to stop after
        this step (a signal) and, before stepping, whether any loss of the group was non-finite (then nothing is
        stepped and NonFiniteLossError names the batches)."""
        no_sync = contextlib.nullcontext() if sync else self.acc.no_sync(self.model)
        with no_sync, self.acc.autocast():
            losses = compute_losses(self.model, self.encoders, self.preprocessor, batch, self.cfg, train=True)
            self.acc.backward(losses["total"] / group)
        values = {k: v.item() for k, v in losses.items()}
        if nonfinite(values) and self.bad_batch is None:
            self.bad_batch = self.state.batch_in_epoch
        stop = False
        if sync or self.acc.num_processes == 1:
            stop, bad = agree(self.acc, stop_requested and sync, self.bad_batch)
            if bad:
                raise NonFiniteLossError(nonfinite_report(bad, self.train_set, self.cfg, self.state.epoch,
                                                          self.state.update, self.acc.num_processes))
        if sync:
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return values, stop

    @torch.no_grad()
    def val_batch(self, batch: dict) -> dict[str, float]:
        self.model.eval()
        with self.acc.autocast():
            losses = compute_losses(self.model, self.encoders, self.preprocessor, batch, self.cfg, train=False)
        self.model.train()
        return {k: v.item() for k, v in losses.items()}

    # ---- logging ----
    def log(self, train: dict[str, float], val: dict[str, float] | None, n: int, seconds: float,
            load_seconds: float) -> None:
        acc, cfg = self.acc, self.cfg
        stats = torch.tensor([train[k] for k in sorted(train)] + [seconds, load_seconds], device=self.device)
        stats = acc.reduce(stats, reduction="mean")
        train = dict(zip(sorted(train), stats[:-2].tolist()))
        seconds, load_seconds = stats[-2].item(), stats[-1].item()
        if val is not None:
            vstats = acc.reduce(torch.tensor([val[k] for k in sorted(val)], device=self.device), reduction="mean")
            val = dict(zip(sorted(val), vstats.tolist()))
        if not acc.is_main_process:
            return
        record = {"epoch": self.state.epoch, "batches": self.state.batches, "update": self.state.update,
                  "lr": self.scheduler.get_last_lr()[0],
                  "samples_per_s": n * cfg.bs_per_gpu * acc.num_processes / max(seconds, 1e-9),
                  "data_loading_share": load_seconds / max(seconds, 1e-9),
                  **{f"train/{k}": v for k, v in train.items()},
                  **({f"val/{k}": v for k, v in val.items()} if val else {})}
        for k, v in record.items():
            if k not in ("epoch", "batches", "update"):
                self.writer.add_scalar(k, v, self.state.batches)
        with open(os.path.join(cfg.save_path, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    # ---- saving and evaluation ----
    def save_epoch_checkpoint(self, epoch_done: int) -> str:
        path = os.path.join(self.cfg.save_path, f"GR1_{epoch_done + self.cfg.load_epoch}.pth")
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            save_checkpoint(self.acc.unwrap_model(self.model), path, self.cfg, epoch=epoch_done,
                            update=self.state.update)
        self.acc.wait_for_everyone()
        return path

    def save_state(self) -> None:
        run = run_record(self.state, self.scheduler, self.acc.scaler, self.cfg, self.acc.num_processes,
                         self.fingerprint)
        save_training_state(self.acc, self.cfg.save_path, run, policy_state_dict(self.acc.unwrap_model(self.model)),
                            self.optimizer.state_dict())

    def evaluate(self, epoch_done: int) -> None:
        from evaluation.runner import evaluate_during_training
        gr1 = self.acc.unwrap_model(self.model)
        gr1.eval()
        summary = evaluate_during_training(self.cfg, self.encoders, gr1, self.acc, epoch_done)
        gr1.train()
        if self.acc.is_main_process and summary:
            self.writer.add_scalar("eval/avg_seq_len", summary["avg_seq_len"], self.state.batches)

    # ---- the loop ----
    def run(self) -> None:
        """Epochs until num_epochs or max_train_steps; SIGINT / SIGTERM stop after the next optimiser step with the
        state saved (TrainingStopped)."""
        cfg, acc, st = self.cfg, self.acc, self.state
        with StopSignals() as signals:
            stopped = False
            while st.epoch < cfg.num_epochs and not stopped:
                stopped = self.train_epoch(signals)
                if st.batch_in_epoch == self.n_batches:
                    self.finish_epoch()
                    stopped = stopped or bool(cfg.max_train_steps and st.update >= cfg.max_train_steps)
        acc.wait_for_everyone()
        if self.writer:
            self.writer.close()
        finished = st.epoch >= cfg.num_epochs or bool(cfg.max_train_steps and st.update >= cfg.max_train_steps)
        if self.stop_agreed and not finished:
            raise TrainingStopped(f"interrupted by {signals.requested or 'a signal to another process'} after "
                                  f"{st.update} optimiser steps; the training state is saved in "
                                  f"{os.path.join(cfg.save_path, 'state')}: run again with resume=true to continue")
        acc.print(f"done: {st.update} optimiser steps; checkpoints and logs in {cfg.save_path}")

    def train_epoch(self, signals: StopSignals) -> bool:
        """The rest of the current epoch; True if the run must stop before the epoch's end (state saved)."""
        cfg, acc, st = self.cfg, self.acc, self.state
        val_every = max(1, len(self.train_set) // max(1, len(self.val_set)))  # GR1-Training's cadence
        self.train_loader.sampler.set_epoch(st.epoch, start=st.batch_in_epoch * cfg.bs_per_gpu)
        bar = tqdm(total=self.n_batches, initial=st.batch_in_epoch, desc=f"epoch {st.epoch}",
                   disable=not acc.is_main_process, dynamic_ncols=True)
        totals, vtotals, n, nv, t0, load = empty_totals(), empty_totals(), 0, 0, time.perf_counter(), 0.0
        tload = time.perf_counter()
        try:
            for batch in DevicePrefetcher(self.train_loader, self.device):
                load += time.perf_counter() - tload
                accum = cfg.gradient_accumulation_steps
                group_start = st.batch_in_epoch - st.batch_in_epoch % accum
                group = min(accum, self.n_batches - group_start)
                sync = st.batch_in_epoch + 1 == group_start + group
                losses, stop = self.train_batch(batch, sync, group, signals.requested is not None)
                self.stop_agreed = self.stop_agreed or stop
                st.batch_in_epoch += 1
                st.batches += 1
                st.update += int(sync)
                n += 1
                for k in totals:
                    totals[k] += losses[k]
                if st.batches % val_every == 0:
                    for k, v in self.val_batch(next(self.val_iter)).items():
                        vtotals[k] += v
                    nv += 1
                bar.update(1)
                if n == cfg.print_steps or st.batch_in_epoch == self.n_batches:
                    seconds = time.perf_counter() - t0
                    self.log(mean_losses(totals, n), mean_losses(vtotals, nv) if nv else None, n, seconds, load)
                    bar.set_postfix(loss=f"{totals['total'] / n:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}",
                                    samples_s=f"{n * cfg.bs_per_gpu * acc.num_processes / seconds:.2f}")
                    totals, vtotals, n, nv, t0, load = empty_totals(), empty_totals(), 0, 0, time.perf_counter(), 0.0
                if sync:
                    self.bad_batch = None
                    if st.batch_in_epoch < self.n_batches:  # the epoch's last step is saved by finish_epoch
                        max_reached = bool(cfg.max_train_steps and st.update >= cfg.max_train_steps)
                        if max_reached or self.stop_agreed or (cfg.save_steps and st.update % cfg.save_steps == 0):
                            self.save_state()
                        if max_reached or self.stop_agreed:
                            return True
                tload = time.perf_counter()
        finally:
            bar.close()
        return self.stop_agreed

    def finish_epoch(self) -> None:
        cfg, st = self.cfg, self.state
        st.epoch += 1
        st.batch_in_epoch = 0
        last = st.epoch == cfg.num_epochs or bool(cfg.max_train_steps and st.update >= cfg.max_train_steps)
        saved = None
        if st.epoch % cfg.save_epochs == 0 or last:  # GR1-Training never saves the last epoch; we do
            saved = self.save_epoch_checkpoint(st.epoch)
            self.acc.print(f"saved {saved}")
        self.save_state()
        if saved and cfg.evaluate_during_training and not self.stop_agreed:
            self.evaluate(st.epoch)

    def _cycle_val(self) -> Iterator[dict]:
        """Validation batches without end; the position (pass, batch) is part of the saved state, so a resumed run
        continues with the same batches."""
        st = self.state
        while True:
            self.val_loader.sampler.set_epoch(st.val_epoch, start=st.val_batch * self.cfg.bs_per_gpu)
            for batch in DevicePrefetcher(self.val_loader, self.device):
                st.val_batch += 1
                yield batch
            st.val_epoch, st.val_batch = st.val_epoch + 1, 0


def main(cfg: Config) -> None:
    Trainer(cfg).run()


if __name__ == "__main__":
    die_with_launcher()  # under accelerate launch / torchrun: a killed launcher stops this process cleanly
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    args = parser.parse_args()
    main_process = os.environ.get("RANK", "0") == "0"
    try:
        main(config_from_args(args))
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

"""The training loop. Trainer owns the run's objects (accelerator, loaders, model, optimiser, state) and runs epochs;
when to step, validate, save and stop comes from the pure functions of training/schedule.py, one batch's work from
training/step.py, what a log line holds from training/logs.py, the resumable state from training/state.py.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed
from tqdm.auto import tqdm

from config import Config, ConfigError, save_config
from data.loader import DevicePrefetcher, batches_per_epoch, make_loader
from models.build import build_model, policy_state_dict, save_checkpoint
from models.files import checkpoint_path
from processes import StopSignals
from training.logs import (
    CURVES_FILE,
    METRICS_FILE,
    TRACKER_PROJECT,
    LogWindow,
    append_record,
    detached,
    draw_training_curves,
    log_record,
    read_metrics,
    tracker_config,
    tracker_names,
    tracker_values,
    truncate_metrics,
)
from training.schedule import accumulation_group, lr_factor, should_stop, state_save_due, validation_due
from training.state import (
    TrainState,
    lmdb_fingerprint,
    load_saved_weights,
    restore_state,
    resume_point,
    run_record,
    save_training_state,
)
from training.step import NonFiniteLossError, agree, compute_losses, first_nonfinite, make_optimizer, nonfinite_report


class TrainingStopped(Exception):  # noqa: N818 (not an error: a requested stop)
    """SIGINT / SIGTERM stopped the run after a save of the full training state."""


def check_save_path(path: str) -> None:
    """save_path must be a writable directory (created if absent): fail in one line before anything is built."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test"):
            pass
    except OSError as e:
        raise ConfigError(f"save_path {path!r} is not a writable directory ({e.strerror or e})") from None


def error_line(e: BaseException) -> str:
    """An exception as one line; an error re-raised from a DataLoader worker is reduced to its original message."""
    text = str(e).strip() or type(e).__name__
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):  # torch's ExceptionWrapper: the worker's traceback
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith(type(e).__name__) else last
    return " ".join(ln.strip() for ln in lines)


def make_accelerator(cfg: Config) -> Accelerator:
    cuda = torch.cuda.is_available()
    # cpu=True without CUDA: several processes (torchrun / accelerate launch --multi_gpu) then use gloo on CPU
    return Accelerator(cpu=not cuda, mixed_precision=cfg.mixed_precision if cuda else "no",
                       log_with=tracker_names(cfg) or None, project_dir=os.path.join(cfg.save_path, "logs"),
                       kwargs_handlers=[
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
        self.group_finite: list[tuple[int, torch.Tensor]] = []  # (batch in epoch, finite?) of the accumulation group
        self.stop_agreed = False  # the processes agreed to stop (a signal) after the current step
        if saved:
            self.state = restore_state(saved, self.optimizer, self.scheduler, acc.scaler)
            acc.print(f"resumed from {saved.path}: epoch {self.state.epoch}, batch {self.state.batch_in_epoch}, "
                      f"update {self.state.update}")
        self.val_iter = self._cycle_val()
        if acc.is_main_process:
            os.makedirs(cfg.save_path, exist_ok=True)
            save_config(cfg, os.path.join(cfg.save_path, "config.json"))
            if saved:
                truncate_metrics(cfg.save_path, self.state.update)
        acc.init_trackers(TRACKER_PROJECT, config=tracker_config(cfg))  # log_with (main process only)

    def _lr_factor(self, update: int) -> float:
        return lr_factor(update, self.cfg, self.updates_per_epoch, self.acc.num_processes, len(self.train_set))

    def _complete(self) -> bool:
        return should_stop(self.state.epoch, self.state.update, self.cfg.num_epochs, self.cfg.max_train_steps)

    # ---- one optimiser step's worth of batches ----
    def train_batch(self, batch: dict, sync: bool, group: int, stop_requested: bool
                    ) -> tuple[dict[str, torch.Tensor], bool]:
        """Forward/backward one batch; the optimiser steps when `sync` (the last batch of an accumulation group of
        `group` batches, whose gradients are averaged). At that point the processes agree on whether to stop after
        this step (a signal) and, before stepping, whether any loss of the group was non-finite (then nothing is
        stepped and NonFiniteLossError names the batches). The losses stay on the device (summed there, read once
        per log line); their finiteness is read once per optimiser step."""
        no_sync = contextlib.nullcontext() if sync else self.acc.no_sync(self.model)
        with no_sync, self.acc.autocast():
            losses = compute_losses(self.model, self.encoders, self.preprocessor, batch, self.cfg, train=True)
            self.acc.backward(losses["total"] / group)
        losses = detached(losses)
        self.group_finite.append((self.state.batch_in_epoch, torch.isfinite(losses["total"])))
        stop = False
        if sync:
            bad_batch = first_nonfinite(self.group_finite)  # one read from the device per optimiser step
            self.group_finite = []
            stop, bad = agree(self.acc, stop_requested, bad_batch)
            if bad:
                raise NonFiniteLossError(nonfinite_report(bad, self.train_set, self.cfg, self.state.epoch,
                                                          self.state.update, self.acc.num_processes))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return losses, stop

    @torch.no_grad()
    def val_batch(self, batch: dict) -> dict[str, torch.Tensor]:
        self.model.eval()
        with self.acc.autocast():
            losses = compute_losses(self.model, self.encoders, self.preprocessor, batch, self.cfg, train=False)
        self.model.train()
        return detached(losses)  # summed on the device, read once per log line

    # ---- logging ----
    def log(self, window: LogWindow, bar: tqdm) -> None:
        """One log line for the window: this process's means on the progress bar; the means over the processes to
        the trackers and metrics.jsonl (main process)."""
        acc, cfg, st = self.acc, self.cfg, self.state
        train, val, seconds = window.summary()
        lr = self.scheduler.get_last_lr()[0]
        samples = window.batches * cfg.bs_per_gpu * acc.num_processes
        stats = torch.tensor([train[k] for k in sorted(train)] + [seconds, window.waiting], device=self.device)
        stats = acc.reduce(stats, reduction="mean")
        mean_train = dict(zip(sorted(train), stats[:-2].tolist()))
        if val is not None:
            vstats = acc.reduce(torch.tensor([val[k] for k in sorted(val)], device=self.device), reduction="mean")
            val = dict(zip(sorted(val), vstats.tolist()))
        if acc.is_main_process:
            record = log_record(st.epoch, st.batches, st.update, lr, mean_train, val, samples, stats[-2].item(),
                                stats[-1].item())
            acc.log(tracker_values(record), step=st.batches)
            append_record(cfg.save_path, record)
        bar.set_postfix(loss=f"{train['total']:.4f}", lr=f"{lr:.2e}", samples_s=f"{samples / seconds:.2f}")

    # ---- saving and evaluation ----
    def save_epoch_checkpoint(self, epoch_done: int) -> str:
        path = checkpoint_path(self.cfg.save_path, epoch_done + self.cfg.load_epoch)
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
        if summary:
            self.acc.log({"eval/avg_seq_len": summary["avg_seq_len"]}, step=self.state.batches)

    # ---- the loop ----
    def run(self) -> None:
        """Epochs until num_epochs or max_train_steps; SIGINT / SIGTERM stop after the next optimiser step with the
        state saved (TrainingStopped)."""
        cfg, acc, st = self.cfg, self.acc, self.state
        with StopSignals() as signals:
            while not self._complete() and not self.stop_agreed:
                self.train_epoch(signals)
                if st.batch_in_epoch == self.n_batches:
                    self.finish_epoch()
        acc.wait_for_everyone()
        acc.end_training()  # closes the trackers
        if self.stop_agreed and not self._complete():
            raise TrainingStopped(f"interrupted by {signals.requested or 'a signal to another process'} after "
                                  f"{st.update} optimiser steps; the training state is saved in "
                                  f"{os.path.join(cfg.save_path, 'state')}: run again with resume=true to continue")
        acc.print(f"done: {st.update} optimiser steps; checkpoints and logs in {cfg.save_path}")

    def train_epoch(self, signals: StopSignals) -> None:
        """The rest of the current epoch, or up to the optimiser step after which the run stops (a signal or
        max_train_steps; the state is then saved)."""
        cfg, st = self.cfg, self.state
        self.train_loader.sampler.set_epoch(st.epoch, start=st.batch_in_epoch * cfg.bs_per_gpu)
        window = LogWindow()
        with tqdm(total=self.n_batches, initial=st.batch_in_epoch, desc=f"epoch {st.epoch}",
                  disable=not self.acc.is_main_process, dynamic_ncols=True) as bar:
            for batch in window.timed(DevicePrefetcher(self.train_loader, self.device)):
                group, sync = accumulation_group(st.batch_in_epoch, cfg.gradient_accumulation_steps, self.n_batches)
                losses, stop = self.train_batch(batch, sync, group, signals.requested is not None)
                self.stop_agreed = self.stop_agreed or stop
                st.batch_in_epoch += 1
                st.batches += 1
                st.update += int(sync)
                window.add(losses)
                if validation_due(st.batches, len(self.train_set), len(self.val_set)):
                    window.add_val(self.val_batch(next(self.val_iter)))
                bar.update(1)
                if window.batches == cfg.print_steps or st.batch_in_epoch == self.n_batches:
                    self.log(window, bar)
                    window.reset()
                if sync and st.batch_in_epoch < self.n_batches:  # the epoch's last step is saved by finish_epoch
                    stop = self.stop_agreed or self._complete()
                    if stop or state_save_due(st.update, cfg.save_steps):
                        self.save_state()
                    if stop:
                        return

    def finish_epoch(self) -> None:
        cfg, st = self.cfg, self.state
        st.epoch += 1
        st.batch_in_epoch = 0
        saved = None
        if st.epoch % cfg.save_epochs == 0 or self._complete():  # GR1-Training never saves the last epoch; we do
            saved = self.save_epoch_checkpoint(st.epoch)
            self.acc.print(f"saved {saved}")
        self.save_state()
        self.draw_curves()
        if saved and cfg.evaluate_during_training and not self.stop_agreed:
            self.evaluate(st.epoch)

    def draw_curves(self) -> None:
        """training_curves.png in save_path, redrawn from metrics.jsonl (main process)."""
        path = os.path.join(self.cfg.save_path, METRICS_FILE)
        if self.acc.is_main_process and os.path.isfile(path):
            draw_training_curves(read_metrics(path), os.path.join(self.cfg.save_path, CURVES_FILE))

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

"""What the training loop reports: the log window (losses summed on the device and the time since the last log
line), the record each log line writes to metrics.jsonl and the trackers (log_with), and training_curves.png.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator

import torch

from config import Config, ConfigError
from models.losses import LOSS_NAMES

TRACKER_PROJECT = "gr1"  # the run name accelerate's trackers get (TensorBoard: save_path/logs/gr1)
CURVES_FILE = "training_curves.png"
METRICS_FILE = "metrics.jsonl"


def detached(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A step's losses for logging, left on the device: LogWindow sums them there and mean_losses reads them back once
    per log line, so that the loop never waits for the device (an .item() per batch would, every batch)."""
    return {k: v.detach() for k, v in losses.items()}


def mean_losses(totals: dict[str, float | torch.Tensor], count: int) -> dict[str, float]:
    """Means of summed losses as floats; sums held on a device are read back in one transfer."""
    on_device = [v for v in totals.values() if isinstance(v, torch.Tensor)]
    if on_device:
        sums = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=on_device[0].device)
                            for v in totals.values()]).tolist()
        totals = dict(zip(totals, sums))
    return {k: totals[k] / max(1, count) for k in totals}


def empty_totals() -> dict[str, float]:
    return {k: 0.0 for k in LOSS_NAMES + ("total",)}


# ---------------------------------------------------------------- the log window

class LogWindow:
    """The batches since the last log line: their losses summed where they were computed (on the device: read back
    once per line, never per batch), how many there were, and how long they took, of which how long the loop waited
    for batches (the data-loading share)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Opens a new window (after a log line)."""
        self.train, self.val = empty_totals(), empty_totals()
        self.batches = self.val_batches = 0
        self.start = time.perf_counter()
        self.waiting = 0.0

    def timed(self, batches: Iterable) -> Iterator:
        """Iterates `batches`, adding the time spent waiting for each one (starting the iteration included) to
        `waiting` of the window open at that moment."""
        requested = time.perf_counter()
        for batch in batches:
            self.waiting += time.perf_counter() - requested
            yield batch
            requested = time.perf_counter()

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        """A training batch's losses (detached)."""
        self.batches += 1
        for k in self.train:
            self.train[k] += losses[k]

    def add_val(self, losses: dict[str, torch.Tensor]) -> None:
        """A validation batch's losses (detached)."""
        self.val_batches += 1
        for k in self.val:
            self.val[k] += losses[k]

    def summary(self) -> tuple[dict[str, float], dict[str, float] | None, float]:
        """(mean training losses, mean validation losses or None without a validation batch, seconds since the
        window opened)."""
        seconds = time.perf_counter() - self.start
        val = mean_losses(self.val, self.val_batches) if self.val_batches else None
        return mean_losses(self.train, self.batches), val, seconds


def log_record(epoch: int, batches: int, update: int, lr: float, train: dict[str, float],
               val: dict[str, float] | None, samples: int, seconds: float, waiting: float) -> dict:
    """One line of metrics.jsonl: where the run is, the learning rate, the throughput of the window (`samples` over
    all processes in `seconds`) and the share of it spent waiting for data, then the mean losses."""
    return {"epoch": epoch, "batches": batches, "update": update, "lr": lr,
            "samples_per_s": samples / max(seconds, 1e-9), "data_loading_share": waiting / max(seconds, 1e-9),
            **{f"train/{k}": v for k, v in train.items()}, **({f"val/{k}": v for k, v in val.items()} if val else {})}


def tracker_values(record: dict) -> dict:
    """A log record as the trackers get it (the position is their step axis, not a value)."""
    return {k: v for k, v in record.items() if k not in ("epoch", "batches", "update")}


def append_record(save_path: str, record: dict) -> None:
    with open(os.path.join(save_path, METRICS_FILE), "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(save_path: str, update: int) -> None:
    """Keep the records up to optimiser step `update` (a resumed run's saved position): the steps logged after the
    last save are trained and logged again, and would otherwise appear twice (atomic rewrite)."""
    path = os.path.join(save_path, METRICS_FILE)
    if not os.path.isfile(path):
        return
    kept = [r for r in read_metrics(path) if r.get("update", 0) <= update]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------- trackers and curves

def tracker_names(cfg: Config) -> list[str]:
    """cfg.log_with as accelerate tracker names; an unknown one, or one whose package is missing, is a one-line
    error (accelerate itself would drop a missing one silently)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
    names = [n.strip() for n in cfg.log_with.split(",") if n.strip() and n.strip() != "none"]
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"log_with: unknown tracker {name!r}; accelerate has {sorted(LOGGER_TYPE_TO_CLASS)} "
                              "(comma-separated), or 'none'")
        if name not in available:
            raise ConfigError(f"log_with: the {name} tracker is not installed here (pip install {name}), or leave it "
                              "out of log_with")
    return names


def tracker_config(cfg: Config) -> dict:
    """The run's config for the trackers' hyper-parameter views (lists as text: TensorBoard takes scalars only)."""
    return {k: str(v) if isinstance(v, list) else v for k, v in cfg.to_dict().items()}


def read_metrics(path: str) -> list[dict]:
    """The records of metrics.jsonl (a line cut by a crash is skipped)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


_LOSS_PANELS = (("total", "total loss"), ("action_arm", "arm action (smooth L1)"),
                ("action_gripper", "gripper action (BCE)"), ("rgb_static", "static camera frame (MSE)"),
                ("rgb_gripper", "gripper camera frame (MSE)"))
_RUN_PANELS = (("lr", "learning rate"), ("samples_per_s", "samples / s (all processes)"),
               ("data_loading_share", "share of the time waiting for data"))


def draw_training_curves(records: list[dict], path: str) -> None:
    """training_curves.png: each loss (training and validation), the learning rate, samples/s and the data-loading
    share, against the optimiser step (matplotlib, Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    steps = [r["update"] for r in records]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5), constrained_layout=True)
    for ax, (name, title) in zip(axes.flat, _LOSS_PANELS):
        for split, label, style in (("train", "training", "-"), ("val", "validation", "o-")):
            points = [(u, r[f"{split}/{name}"]) for u, r in zip(steps, records) if f"{split}/{name}" in r]
            if points:
                ax.plot(*zip(*points), style, markersize=3, label=label)
        values = [r[f"{s}/{name}"] for r in records for s in ("train", "val") if f"{s}/{name}" in r]
        if values and min(values) > 0:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))  # 1-2-5 labels, never crowded
            ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(title)
        if ax.get_lines():
            ax.legend(loc="upper right")
    for ax, (key, title) in zip(axes.flat[len(_LOSS_PANELS):], _RUN_PANELS):
        ax.plot(steps, [r.get(key, float("nan")) for r in records], "-")
        ax.set_title(title)
    for ax in axes.flat:
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"GR-1 training: {len(records)} log points, last at optimiser step {steps[-1] if steps else 0}")
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)

"""The training loop's pure helpers (training/schedule.py, training/logs.py): accumulation groups, stopping, the
validation and save cadence, both learning-rate schedules, the log window and its record. The loop itself is tested
end to end in test_training.py and test_reliability.py."""
from __future__ import annotations

import math

import pytest
import torch

from config import Config
from training import logs
from training.logs import LogWindow, log_record, tracker_values
from training.schedule import (
    accumulation_group,
    cosine_with_warmup,
    lr_factor,
    should_stop,
    state_save_due,
    validation_due,
)


def test_accumulation_groups_cut_the_epoch_from_its_start():
    # 7 batches, 3 per optimiser step: groups {0, 1, 2}, {3, 4, 5} and the partial last group {6}
    groups = [accumulation_group(b, 3, 7) for b in range(7)]
    assert groups == [(3, False), (3, False), (3, True), (3, False), (3, False), (3, True), (1, True)]
    # 8 batches: the last group has 2 batches, whose gradients are averaged over 2
    assert [accumulation_group(b, 3, 8) for b in (6, 7)] == [(2, False), (2, True)]
    assert all(accumulation_group(b, 1, 5) == (1, True) for b in range(5))  # no accumulation: every batch steps
    assert accumulation_group(0, 4, 2) == (2, False) and accumulation_group(1, 4, 2) == (2, True)  # epoch < group


def test_the_optimiser_steps_once_per_group():
    for accumulation in (1, 2, 3, 5):
        for n in (1, 4, 7, 12):
            steps = sum(accumulation_group(b, accumulation, n)[1] for b in range(n))
            assert steps == math.ceil(n / accumulation), (accumulation, n)


def test_should_stop():
    assert not should_stop(epoch=0, update=0, num_epochs=2, max_train_steps=0)
    assert not should_stop(epoch=1, update=10**6, num_epochs=2, max_train_steps=0)  # 0: no step limit
    assert should_stop(epoch=2, update=5, num_epochs=2, max_train_steps=0)
    assert not should_stop(epoch=0, update=15, num_epochs=2, max_train_steps=16)
    assert should_stop(epoch=0, update=16, num_epochs=2, max_train_steps=16)
    assert should_stop(epoch=0, update=17, num_epochs=2, max_train_steps=16)  # resumed past the limit


def test_validation_and_save_cadence():
    # GR1-Training: one validation batch every len(train) // len(val) training batches (at least every batch)
    assert [b for b in range(1, 13) if validation_due(b, 100, 25)] == [4, 8, 12]
    assert all(validation_due(b, 10, 50) for b in range(1, 5))
    assert all(validation_due(b, 10, 0) == (b % 10 == 0) for b in range(1, 21))  # no validation windows
    assert [u for u in range(1, 10) if state_save_due(u, 4)] == [4, 8]
    assert not any(state_save_due(u, 0) for u in range(1, 10))  # 0: epochs only


def _cfg(**changes) -> Config:
    return Config().replace(num_epochs=3, num_warmup_epochs=1, **changes)


def test_per_step_schedule_warms_up_then_follows_a_cosine():
    cfg = _cfg(lr_schedule="per_step")
    factors = [lr_factor(u, cfg, updates_per_epoch=10, world=2, dataset_len=1000) for u in range(30)]
    # warm-up over the first epoch's 10 steps; the first step already has a non-zero LR
    assert factors[:10] == pytest.approx([(u + 1) / 10 for u in range(10)])
    # then half a cosine from 1 to 0 over the remaining 20 steps
    assert factors[10:] == pytest.approx([0.5 * (1 + math.cos(math.pi * (u + 1 - 10) / 20)) for u in range(10, 30)])
    assert factors[-1] == pytest.approx(0.0, abs=1e-12) and max(factors) == pytest.approx(1.0)
    assert all(a > b for a, b in zip(factors[9:], factors[10:]))  # decreasing after the warm-up
    # neither processes nor the dataset's length change the per-step schedule
    assert lr_factor(12, cfg, 10, 8, 5) == factors[12]


def test_reference_schedule_is_gr1_trainings_staircase():
    cfg = _cfg(lr_schedule="reference", print_steps=5, bs_per_gpu=10, gradient_accumulation_steps=3)
    # print intervals per epoch: len(dataset) // (print_steps x bs_per_gpu x processes) = 1000 // 100 = 10
    factors = [lr_factor(u, cfg, updates_per_epoch=0, world=2, dataset_len=1000) for u in range(12)]
    # update u follows 3u batches: the schedule's step is 3u // 5, constant within a print interval
    assert factors[:2] == [0.0, 0.0]  # the first print_steps batches train with LR 0
    assert factors[2:4] == pytest.approx([0.1, 0.1]) and factors[4] == pytest.approx(0.2)
    assert factors[10] == pytest.approx(0.6)  # 30 batches: 6 intervals of the 10-interval warm-up
    # then the cosine over the remaining 20 intervals, e.g. after 19 intervals (update 33 follows 99 batches)
    assert lr_factor(33, cfg, 0, 2, 1000) == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 20)))
    assert lr_factor(33, cfg, 0, 4, 1000) == pytest.approx(cosine_with_warmup(19, 5, 15))  # 2x processes: 5 / epoch
    assert lr_factor(50, cfg, 0, 2, 1000) == 0.0  # 150 batches: the end of the 30 intervals


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_log_window_sums_losses_and_times_the_waits(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(logs.time, "perf_counter", clock)
    window = LogWindow()

    def batches():  # each batch takes 0.5 s to arrive
        for i in range(3):
            clock.now += 0.5
            yield i

    for i in window.timed(batches()):
        clock.now += 2.0  # the step
        window.add({k: torch.tensor(float(i)) for k in window.train})
        if i == 1:
            window.add_val({k: torch.tensor(4.0) for k in window.val})
    train, val, seconds = window.summary()
    assert train == {k: 1.0 for k in window.train} and val == {k: 4.0 for k in window.val}
    assert (window.batches, window.val_batches, seconds, window.waiting) == (3, 1, 7.5, 1.5)
    window.reset()
    assert (window.batches, window.val_batches, window.waiting) == (0, 0, 0.0)
    train, val, seconds = window.summary()
    assert val is None and seconds == 0.0 and set(train.values()) == {0.0}


def test_a_reset_window_times_only_what_follows(monkeypatch):
    """The loop resets the window after a log line, in the middle of its iteration: the next wait counts in the new
    window only."""
    clock = _Clock()
    monkeypatch.setattr(logs.time, "perf_counter", clock)
    window = LogWindow()

    def batches():
        for i in range(2):
            clock.now += 1.0
            yield i

    for i in window.timed(batches()):
        clock.now += 3.0
        if i == 0:
            assert window.waiting == 1.0
            window.reset()
            clock.now += 0.25  # e.g. a state save after the log line: not waiting for data
    assert window.waiting == 1.0 and window.summary()[2] == 4.25


def test_log_record():
    record = log_record(epoch=1, batches=40, update=13, lr=1e-4, train={"total": 0.5}, val=None, samples=320,
                        seconds=4.0, waiting=1.0)
    assert record == {"epoch": 1, "batches": 40, "update": 13, "lr": 1e-4, "samples_per_s": 80.0,
                      "data_loading_share": 0.25, "train/total": 0.5}
    with_val = log_record(1, 40, 13, 1e-4, {"total": 0.5}, {"total": 0.7}, 320, 0.0, 0.0)
    assert with_val["val/total"] == 0.7 and math.isfinite(with_val["samples_per_s"])
    assert tracker_values(record) == {"lr": 1e-4, "samples_per_s": 80.0, "data_loading_share": 0.25,
                                      "train/total": 0.5}


def test_a_resumed_run_drops_the_records_logged_after_its_last_save(tmp_path):
    for update in (10, 20, 30):
        logs.append_record(str(tmp_path), {"update": update, "train/total": 1.0})
    with open(tmp_path / logs.METRICS_FILE, "a") as f:
        f.write('{"update": 40, "train/to')  # cut by the crash
    logs.truncate_metrics(str(tmp_path), 20)  # the state was saved at step 20: 30 is trained and logged again
    assert [r["update"] for r in logs.read_metrics(str(tmp_path / logs.METRICS_FILE))] == [10, 20]

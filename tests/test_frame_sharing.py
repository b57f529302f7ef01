"""frame_sharing: groups of consecutive windows of one segment in training batches, each distinct frame encoded
once. Each window must get exactly what it gets encoded alone with its group's random shift, every window must still
come once per epoch, the order must stay a pure function of (seed, epoch, rank, world), and frame_sharing=1 must be
the sampling there was before."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from config import ConfigError, load_config
from conftest import ROOT
from data.lmdb_dataset import SHARES_PREVIOUS, make_datasets
from data.loader import EpochSampler, make_loader
from data.preprocess import ImagePreprocessor
from data_helpers import mini_lmdb  # noqa: F401 (fixture)
from models.build import build_model
from models.losses import gr1_losses
from training.step import batch_images, frame_groups, predict_batch

TINY = os.path.join(ROOT, "configs", "tiny.json")


def _cfg(lmdb: str, *overrides: str):
    return load_config(TINY, [f"LMDB_path={lmdb}", "workers_per_gpu=0", *overrides])


def test_frame_sharing_is_validated():
    for value, message in ((0, "must be > 0"), (5, "cannot exceed 'bs_per_gpu'")):
        with pytest.raises(ConfigError, match=message):
            load_config(TINY, [f"frame_sharing={value}"])  # tiny.json: bs_per_gpu 4
    assert load_config(TINY, ["frame_sharing=4"]).frame_sharing == 4 and load_config(TINY).frame_sharing == 1


def test_window_groups_stay_in_one_segment(mini_lmdb):
    train, _ = make_datasets(_cfg(mini_lmdb))
    groups = train.window_groups(3)
    episodes = train.index.episode_of_step[train.first_step:train.first_step + len(train)]
    assert groups[0] == 0 and np.all(np.diff(groups) >= 0) and np.all(np.diff(groups) <= 1)
    ids, sizes = np.unique(groups, return_counts=True)
    assert sizes.max() == 3 and sizes.min() >= 1
    for g in ids:
        assert len(set(episodes[groups == g])) == 1, f"group {g} crosses a segment"
    # a group is cut only where 3 windows are complete or the segment ends
    for g in ids[:-1]:
        last = np.flatnonzero(groups == g)[-1]
        assert sizes[g] == 3 or episodes[last + 1] != episodes[last]


def test_group_sampler_gives_every_window_once_in_whole_groups():
    groups = np.repeat(np.arange(12), [3, 3, 1, 3, 2, 3, 3, 3, 1, 3, 3, 2])  # 30 windows
    n = len(groups)
    for world in (1, 2):
        shards = []
        for rank in range(world):
            sampler = EpochSampler(n, seed=5, rank=rank, world=world, groups=groups)
            sampler.set_epoch(3)
            order = list(sampler)
            again = EpochSampler(n, seed=5, rank=rank, world=world, groups=groups)
            again.set_epoch(3)
            assert list(again) == order, "the order is a pure function of seed, epoch, rank and world"
            again.set_epoch(3, start=4)
            assert list(again) == order[4:], "resume starts mid-epoch"
            shards += order
        assert len(shards) == n - n % world and len(set(shards)) == len(shards)
    sampler = EpochSampler(n, seed=5, groups=groups)
    orders = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        order = list(sampler)
        orders.append(order)
        assert sorted(order) == list(range(n))
        # windows of a group are laid out together, in index order
        for g in range(12):
            positions = [order.index(i) for i in np.flatnonzero(groups == g)]
            assert positions == list(range(positions[0], positions[0] + len(positions)))
    assert orders[0] != orders[1]


def test_frame_sharing_1_is_the_sampling_there_was(mini_lmdb):
    cfg = _cfg(mini_lmdb, "bs_per_gpu=5")
    train, _ = make_datasets(cfg)
    loader = make_loader(train, cfg, rank=0, world=1, train=True, pin_memory=False)
    for epoch in (0, 2):
        loader.sampler.set_epoch(epoch)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)  # the per-epoch permutation used so far
        assert list(loader.sampler) == torch.randperm(len(train), generator=g).tolist()
    batch = next(iter(loader))
    assert SHARES_PREVIOUS not in batch and train.frame_groups is None
    encoders, gr1, _ = build_model(cfg, "cpu", weights=None)
    pre = ImagePreprocessor(cfg)
    torch.manual_seed(7)
    _, images = predict_batch(gr1, encoders, pre, batch, cfg, train=True)
    torch.manual_seed(7)
    expected = batch_images(pre, batch, train=True)  # one random shift per window, drawn first, as before
    for cam in expected:
        assert torch.equal(images[cam], expected[cam])


def test_loader_batches_equal_the_windows_read_alone(mini_lmdb):
    """Batches with frame sharing hold each window's own item (frames of continuing windows are copied from the
    previous row, not decoded again) and say which rows continue a group."""
    cfg = _cfg(mini_lmdb, "frame_sharing=3", "bs_per_gpu=6", "workers_per_gpu=1")
    train, _ = make_datasets(cfg)
    loader = make_loader(train, cfg, rank=0, world=1, train=True, pin_memory=False)
    loader.sampler.set_epoch(1)
    indices = list(loader.sampler)
    shared_rows = 0
    for b, batch in enumerate(loader):
        rows = indices[6 * b:6 * b + 6]
        shares = batch[SHARES_PREVIOUS]
        for j, idx in enumerate(rows):
            item = train[idx]
            assert not item[SHARES_PREVIOUS]
            for k in item:
                if k != SHARES_PREVIOUS:
                    assert torch.equal(batch[k][j], item[k]), (b, j, k)
            expected = j > 0 and idx == rows[j - 1] + 1 and train.frame_groups[idx] == train.frame_groups[rows[j - 1]]
            assert bool(shares[j]) == expected
        shared_rows += int(shares.sum())
        if b == 4:
            break
    assert shared_rows >= 8


@pytest.fixture(scope="module")
def shared_batch(mini_lmdb):
    cfg = _cfg(mini_lmdb, "frame_sharing=3", "bs_per_gpu=7", "dropout=0.0")
    train, _ = make_datasets(cfg)
    loader = make_loader(train, cfg, rank=0, world=1, train=True, pin_memory=False)
    batch = next(iter(loader))
    assert batch[SHARES_PREVIOUS].sum() >= 3  # groups of several windows
    steps = [train.first_step + i for i in list(loader.sampler)[:7]]  # each window's first step
    return cfg, batch, steps


def _recording(gr1):
    """Wraps gr1.predict to keep the per-window frame tokens it is given (the resampled MAE features)."""
    seen = []
    predict = gr1.predict

    def wrapped(lang, arm, gripper, frames, *args, **kwargs):
        seen.append(frames)
        return predict(lang, arm, gripper, frames, *args, **kwargs)
    gr1.predict = wrapped
    return seen


def test_shared_frames_give_each_window_what_it_gets_alone(shared_batch, monkeypatch):
    """Per window: the same frame tokens, predictions, pixel targets and losses as the window encoded alone with
    its group's random shift."""
    cfg, batch, _ = shared_batch
    encoders, gr1, _ = build_model(cfg, "cpu", weights=None)
    gr1.train()
    pre = ImagePreprocessor(cfg)
    layout = frame_groups(batch[SHARES_PREVIOUS], cfg.seq_len)
    G = layout.source.shape[0]
    group_of = torch.cumsum(~batch[SHARES_PREVIOUS], 0) - 1
    shifts = {pad: torch.randint(0, 2 * pad + 1, (G, 1, 1, 1, 2)).float() for pad in (cfg.rgb_static_pad,
                                                                                       cfg.rgb_gripper_pad)}
    pending = []

    def fixed_randint(low, high, size, **kwargs):  # the shift each preprocessing call is meant to draw
        return pending.pop(0).to(kwargs.get("dtype", torch.int64))

    monkeypatch.setattr(torch, "randint", fixed_randint)
    seen = _recording(gr1)
    pending += [shifts[cfg.rgb_static_pad], shifts[cfg.rgb_gripper_pad]]  # static first, as the reference
    out, images = predict_batch(gr1, encoders, pre, batch, cfg, train=True)
    shared_tokens = seen.pop()
    mask = batch["mask"]
    loss_cfg = dataclasses.replace(gr1.config, without_norm_pixel_loss=False)
    for j in range(len(mask)):
        alone = {k: v[j:j + 1] for k, v in batch.items() if k != SHARES_PREVIOUS}
        k = int(group_of[j])
        pending += [shifts[cfg.rgb_static_pad][k:k + 1], shifts[cfg.rgb_gripper_pad][k:k + 1]]
        out_j, images_j = predict_batch(gr1, encoders, pre, alone, cfg, train=True)
        tokens_j = seen.pop()
        for cam in images_j:
            torch.testing.assert_close(images[cam][j:j + 1], images_j[cam], rtol=0, atol=1e-6)
            torch.testing.assert_close(shared_tokens[cam][j:j + 1], tokens_j[cam], rtol=1e-5, atol=1e-5)
        for name in out_j:
            torch.testing.assert_close(out[name][j:j + 1], out_j[name], rtol=1e-5, atol=1e-5)
        losses = gr1_losses({n: v[j:j + 1] for n, v in out.items()}, {c: v[j:j + 1] for c, v in images.items()},
                            batch["actions"][j:j + 1], mask[j:j + 1], loss_cfg)
        losses_j = gr1_losses(out_j, images_j, alone["actions"], alone["mask"], loss_cfg)
        for name in losses_j:
            torch.testing.assert_close(losses[name], losses_j[name], rtol=1e-5, atol=1e-6)
    assert not pending


def test_shared_frames_are_encoded_once(shared_batch):
    """The MAE sees each distinct valid frame of a group once (frames of different groups are shifted differently)."""
    cfg, batch, steps = shared_batch
    encoders, gr1, _ = build_model(cfg, "cpu", weights=None)
    counted = []
    encoders.mae.register_forward_hook(lambda m, i, o: counted.append(i[0].shape[0]))
    predict_batch(gr1, encoders, ImagePreprocessor(cfg), batch, cfg, train=True)
    group_of = (torch.cumsum(~batch[SHARES_PREVIOUS], 0) - 1).tolist()
    valid = batch["mask"][..., 0] > 0
    distinct = {(group_of[j], steps[j] + t) for j in range(len(steps)) for t in range(cfg.seq_len) if valid[j, t]}
    assert counted == [2 * len(distinct)]  # both cameras in one MAE call
    assert len(distinct) < valid.sum().item()

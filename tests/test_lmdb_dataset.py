"""data/lmdb_dataset.py: GR1-Training's items from its own LMDB, splits, errors, DataLoader workers."""
import pickle
import time

import pytest
import torch
from torch.utils.data import DataLoader

from config import Config
from conftest import shared_path
from data.batch_ring import BatchRing, StaleBatchError, collate_batch
from data.convert import convert
from data.lmdb_dataset import (
    DatasetError,
    LMDBDataset,
    make_datasets,
    open_lmdb,
    ratio_window_range,
    read_index,
)
from data.loader import BatchLoader, make_loader
from data_helpers import assert_items_equal, copy_lmdb, mini_calvin, mini_lmdb  # noqa: F401 (fixture)
from reference_reader import ReferenceSchemaReader


def _cfg(path: str, **changes) -> Config:
    return Config().replace(LMDB_path=path, **changes)


@pytest.fixture(scope="module")
def fixture_items():
    return torch.load(shared_path("fixtures", "tiny_calvin_lmdb_items.pt"))


def test_reference_lmdb_reads_back_to_the_reference_items(fixture_items):
    args = fixture_items["dataset_args"]
    index = read_index(shared_path("fixtures", "tiny_calvin_lmdb"))
    assert index.num_steps == 19 and index.info is None
    assert index.episode_of_step.tolist() == [0] * 8 + [1] * 6 + [2] * 5
    first, count = ratio_window_range(index.num_steps, args["start_ratio"], args["end_ratio"],
                                      args["sequence_length"], args["chunk_size"])
    dataset = LMDBDataset(index, args["sequence_length"], args["chunk_size"], args["action_mode"], first, count)
    assert len(dataset) == 12
    for idx, expected in fixture_items["items"].items():
        assert_items_equal(dataset[idx], expected, f"item {idx}")
        assert_items_equal(dataset[idx], expected, f"item {idx} read twice")  # deterministic


def test_ratio_split_is_the_reference_cut(fixture_items):
    path = shared_path("fixtures", "tiny_calvin_lmdb")
    cfg = _cfg(path, split="ratio", train_ratio=0.5, seq_len=4, chunk_size=3, skip_frame=1)
    train, val = make_datasets(cfg)
    # N = 19: train steps [0, int(9.5) - 7), val [int(9.5), 19 - 7): GR1-Training's formula
    assert (train.first_step, len(train), val.first_step, len(val)) == (0, 2, 9, 3)
    reference = ReferenceSchemaReader(path, 4, 3, "ee_rel_pose", 0.5, 1.0)
    for i in range(len(val)):
        assert_items_equal(val[i], reference[i], f"val item {i}")


def test_auto_split_warns_once_and_falls_back_to_ratio_for_reference_lmdbs(capsys):
    cfg = _cfg(shared_path("fixtures", "tiny_calvin_lmdb"), split="auto", train_ratio=0.5, seq_len=4, chunk_size=3,
               skip_frame=1)
    train, _ = make_datasets(cfg)
    assert len(train) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step-ratio split" in err[0]


def test_calvin_split_needs_the_recorded_boundary():
    cfg = _cfg(shared_path("fixtures", "tiny_calvin_lmdb"), split="calvin", seq_len=4, chunk_size=3, skip_frame=1)
    with pytest.raises(DatasetError, match="use split=ratio"):
        make_datasets(cfg)


def test_empty_split_is_a_one_line_error():
    cfg = _cfg(shared_path("fixtures", "tiny_calvin_lmdb"), split="ratio", seq_len=4, chunk_size=3, skip_frame=1)
    with pytest.raises(DatasetError, match="no validation windows") as error:  # 0.9 x 19 steps leaves none
        make_datasets(cfg)
    assert "\n" not in str(error.value)


def test_calvin_split_keeps_calvins_splits_apart(mini_lmdb):
    train, val = make_datasets(_cfg(mini_lmdb, split="auto"))  # recorded boundary: 'calvin'
    assert (train.first_step, len(train), val.first_step, len(val)) == (0, 228, 228, 130)
    index = train.index
    assert set(index.episode_of_step[:228]) == {0, 1, 2, 3} and set(index.episode_of_step[228:]) == {4, 5}
    last_train, first_val = train[len(train) - 1], val[0]
    assert last_train["mask"][0].tolist() == [1.0] + [0.0] * 9  # the last training step sees nothing after it
    assert last_train["mask"][1:].sum() == 0 and last_train["rgb_static"][1:].sum() == 0
    assert first_val["mask"].all()
    tokens = ReferenceSchemaReader(mini_lmdb, 10, 10, "ee_rel_pose", 0.0, 1.0)
    assert_items_equal(val[0], tokens[228], "first validation window")


def test_items_are_reference_shaped(mini_lmdb):
    train, _ = make_datasets(_cfg(mini_lmdb, seq_len=6, chunk_size=4, skip_frame=2))
    item = train[60]  # crosses the end of segment 0 (steps 0..64)
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in item.items()}
    assert shapes == {"rgb_static": ((6, 3, 200, 200), torch.uint8), "rgb_gripper": ((6, 3, 84, 84), torch.uint8),
                      "inst_token": ((77,), torch.int32), "arm_state": ((6, 6), torch.float32),
                      "gripper_state": ((6, 2), torch.float32), "actions": ((6, 4, 7), torch.float32),
                      "mask": ((6, 4), torch.float32)}
    assert item["mask"].tolist()[:5] == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]]
    assert item["mask"][5].sum() == 0 and item["gripper_state"][5].sum() == 0
    assert (item["gripper_state"][:5].sum(1) == 1).all()
    gripper = item["actions"][..., -1][item["mask"] > 0]
    assert set(gripper.tolist()) <= {0.0, 1.0}
    with pytest.raises(IndexError):
        train[len(train)]


def test_dataloader_workers_give_the_same_batches(mini_lmdb):
    train, _ = make_datasets(_cfg(mini_lmdb, seq_len=4, chunk_size=3, skip_frame=1))
    subset = torch.utils.data.Subset(train, [0, 61, 62, 150, 227])
    serial = next(iter(DataLoader(subset, batch_size=5, num_workers=0)))
    parallel = next(iter(DataLoader(subset, batch_size=5, num_workers=2, multiprocessing_context="fork")))
    items = [train[i] for i in subset.indices]
    for key in serial:
        assert torch.equal(serial[key], parallel[key]), key
        assert torch.equal(serial[key], torch.stack([item[key] for item in items])), key
    # The training loader's collate_batch takes the batch written in place (in a worker: in shared memory, so it
    # is passed by handle). Its buffers start uninitialised: padded frames and masked actions must still be zeros.
    written = subset.__getitems__(list(range(5)))
    assert collate_batch(written) is written.batch, "the batch must be taken as written, not stacked again"
    for workers in (0, 1):
        loader = DataLoader(subset, batch_size=5, num_workers=workers, collate_fn=collate_batch,
                            multiprocessing_context="fork" if workers else None)
        for _ in range(2):
            batch = next(iter(loader))
            for key in serial:
                assert torch.equal(serial[key], batch[key]) and batch[key].dtype == serial[key].dtype, key
                assert batch[key].is_shared() == (workers > 0), key


def test_missing_and_unfinished_lmdbs_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="calvin2lmdb.py"):
        make_datasets(_cfg(str(tmp_path / "nothing")))
    out = str(tmp_path / "partial")
    convert(mini_calvin(), out, workers=1, progress=False, max_segments=2)
    with pytest.raises(DatasetError, match="unfinished conversion \\(2 of 6 segments\\).*re-run"):
        make_datasets(_cfg(out))


def test_a_missing_step_key_is_named(tmp_path):
    import lmdb
    path = copy_lmdb(shared_path("fixtures", "tiny_calvin_lmdb"), str(tmp_path / "broken"))
    env = lmdb.open(path, map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.delete(b"cur_episode_7")
    env.close()
    with pytest.raises(DatasetError, match="cur_episode_7 is missing"):
        read_index(path)


def test_valid_steps_never_read_past_the_lmdb_end():
    index = read_index(shared_path("fixtures", "tiny_calvin_lmdb"))
    dataset = LMDBDataset(index, 4, 3, "ee_rel_pose", 0, index.num_steps)  # every step starts a window
    last = dataset[index.num_steps - 1]
    assert last["mask"].tolist() == [[1, 0, 0]] + [[0, 0, 0]] * 3
    with open_lmdb(index.path).begin() as txn:
        action = pickle.loads(txn.get(b"rel_action_18")).float()
    action[-1] = (action[-1] + 1) / 2
    assert torch.equal(last["actions"][0, 0], action) and last["actions"][1:].abs().sum() == 0


def test_training_loader_reuses_worker_buffers_without_corrupting_batches(mini_lmdb):
    """make_loader's workers cycle through prefetch_factor + 2 shared buffers each: over several epochs (many more
    batches than buffers) every batch equals the items of the sampler's indices, and the batch before the current
    one is still intact (the training loop may hold two)."""
    cfg = _cfg(mini_lmdb, seq_len=3, chunk_size=2, skip_frame=1, bs_per_gpu=3, workers_per_gpu=2, prefetch_factor=2)
    train, _ = make_datasets(cfg)
    subset_size = 30
    train.num_items = subset_size  # 10 batches per epoch, 5 per worker
    loader = make_loader(train, cfg, rank=0, world=1, train=True, pin_memory=False)
    assert loader.ring.slots == 4 and train.batch_ring is loader.ring
    items = {i: train[i] for i in range(subset_size)}
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        indices = list(loader.sampler)
        previous = None
        for b, batch in enumerate(loader):
            expected = {k: torch.stack([items[i][k] for i in indices[3 * b:3 * b + 3]]) for k in batch}
            assert batch["rgb_static"].is_shared()
            for k in batch:
                assert torch.equal(batch[k], expected[k]), (epoch, b, k)
            if previous is not None:
                for k in batch:
                    assert torch.equal(previous[0][k], previous[1][k]), (epoch, b - 1, k, "overwritten")
            previous = (batch, expected)
        assert b == 9


def test_reading_a_stale_batch_raises(mini_lmdb):
    """The batch ring's rule is checked, not assumed: make_loader's consumer may hold 2 batches, an older one is
    retired and any read of it raises; a batch whose buffer a worker rewrote (here a DataLoader with more batches in
    flight than its ring has buffers) raises on read, and the loader stops handing out batches."""
    cfg = _cfg(mini_lmdb, seq_len=3, chunk_size=2, skip_frame=1, bs_per_gpu=3, workers_per_gpu=1, prefetch_factor=2)
    train, _ = make_datasets(cfg)
    train.num_items = 30
    batches = iter(make_loader(train, cfg, rank=0, world=1, train=True, pin_memory=False))
    oldest, previous, current = next(batches), next(batches), next(batches)
    assert previous["mask"].shape == current["mask"].shape == (3, 3, 2)  # the two newest are readable
    with pytest.raises(StaleBatchError, match="handed out 2 newer batches"):
        oldest["mask"]
    with pytest.raises(StaleBatchError):
        dict(oldest)

    ring = train.batch_ring = BatchRing(prefetch_factor=1)  # 3 buffers for the 4 batches in flight below
    loader = BatchLoader(DataLoader(train, batch_size=3, num_workers=1, prefetch_factor=4, collate_fn=collate_batch,
                                    multiprocessing_context="fork"), ring)
    batches = iter(loader)
    first = next(batches)
    deadline = time.monotonic() + 120
    while not first.ticket.rewritten():  # the worker writes its 4th batch into the first one's buffer
        assert time.monotonic() < deadline, "the worker never rewrote the buffer"
        time.sleep(0.01)
    with pytest.raises(StaleBatchError, match="rewritten while its batch was still held"):
        first["arm_state"]
    with pytest.raises(StaleBatchError, match="rewritten"):
        next(batches)

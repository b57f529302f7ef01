"""Data pipeline speed: our LMDB loader vs the real GR1-Training reader, and calvin2lmdb conversion frames/s with
all cores vs one.

    python bench/bench_data.py [--reference_dir ../GR1-Training] [--lmdb PATH] [--samples 300] [--rounds 3]
                               [--repeat 12] [--input_dir SPLIT_ROOT] [--skip_conversion]

Loader: on the same LMDB (default: ../shared/calvin/mini_calvin converted here: real rendered CALVIN frames), seq_len
10, chunk 10, random windows. With --reference_dir (a local clone of EDiRobotics/GR1-Training, imported at run time,
never committed) its LMDBDataset_jpeg.LMDBDataset reads the same windows and the items are checked equal to ours.
Measured in this process on one thread and through a DataLoader with 1 worker (batch 8: the reference with
DataLoader's default collate, as its Main.py; ours as make_loader sets it up), rounds alternating between the readers,
medians reported. Also ours with frame_sharing=4 batches (continuing windows copy 9 of their 10 frames from the
previous row instead of decoding them). The reference decodes with torchvision.io.decode_jpeg; where torchvision is not
installed, the stand-in decodes with simplejpeg (Pillow without it), the decoder ours uses: both are libjpeg-turbo and
give the same pixels, so the comparison then measures everything but the decoder library. Without --reference_dir
only our own figures are printed. Conversion: the input's annotation windows repeated --repeat times (so that process
start-up is amortised), converted with --workers 1 and with every core.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import real_reference as rr
from data import calvin_format as cf
from data.batch_ring import BatchRing, collate_batch
from data.codec import loads_value
from data.convert import convert
from data.lmdb_dataset import LMDBDataset, ratio_window_range
from data.lmdb_reader import close_lmdb, read_index, reading
from data.loader import BatchLoader, EpochSampler

SHARED = os.environ.get("GR1_SHARED") or os.path.join(os.path.dirname(ROOT), "shared")  # as tests/conftest.py
MINI_CALVIN = os.path.join(SHARED, "calvin", "mini_calvin")
T = K = 10


def in_process_rate(dataset: Dataset, order: list[int]) -> float:
    start = time.perf_counter()
    for i in order:
        dataset[i]
    return len(order) / (time.perf_counter() - start)


def loader_rate(dataset: Dataset, order: list[int]) -> float:
    """Through a DataLoader with 1 worker, batch 8, prefetch_factor 2: ours set up as make_loader does (collate_batch;
    batches written in place into the prefetch_factor + 2 shared buffers of a BatchRing, handed out under its rule),
    the reference reader with the default collate (items stacked into new shared memory per batch)."""
    collate = ring = None
    if isinstance(dataset, LMDBDataset):
        collate = collate_batch
        ring = dataset.batch_ring = BatchRing(prefetch_factor=2)  # DataLoader's default prefetch_factor
    loader = BatchLoader(DataLoader(Subset(dataset, order), batch_size=8, num_workers=1,
                                    multiprocessing_context="fork", collate_fn=collate), ring)
    batches = iter(loader)
    next(batches)  # worker start-up is not the loader's steady state
    start = time.perf_counter()
    count = sum(len(batch["mask"]) for batch in batches)
    return count / (time.perf_counter() - start)


def jpeg_share(path: str, dataset: LMDBDataset, order: list[int]) -> float:
    """Seconds per sample spent decoding the window's JPEGs alone (the floor of any reader of JPEG frames)."""
    blobs = []
    with reading(path) as env, env.begin() as txn:
        for i in order:
            step = dataset.first_step + i
            for t in np.flatnonzero(dataset._valid_steps(step)[:T]):
                blobs += [(loads_value(txn.get(cf.step_key(cam, step + t))), size)
                          for cam, size in cf.CAMERA_SIZES.items()]
    start = time.perf_counter()
    for data, size in blobs:
        cf.decode_jpeg_chw(data, size)
    return (time.perf_counter() - start) / len(order)


class EmptyItems(Dataset):
    """Items of the right shapes that cost nothing to make: what a DataLoader worker's transfer alone costs."""

    def __len__(self) -> int:
        return 1 << 20

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return {**{key: torch.zeros(T, 3, size, size, dtype=torch.uint8) for key, size in cf.CAMERA_SIZES.items()},
                "inst_token": torch.zeros(77, dtype=torch.int32), "arm_state": torch.zeros(T, 6),
                "gripper_state": torch.zeros(T, 2), "actions": torch.zeros(T, K, 7), "mask": torch.zeros(T, K)}


def release(readers: dict[str, Dataset]) -> None:
    """Close every reader's LMDB handle in this process (py-lmdb opens a file once per process; each reader opens
    its own handle again when next used, and DataLoader workers their own)."""
    for reader in readers.values():
        if isinstance(reader, LMDBDataset):
            close_lmdb(reader.index.path)
            reader._pid = -1
        elif hasattr(reader, "env"):  # GR1-Training's reader opens on first use and keeps env / txn
            reader.txn.abort()
            reader.env.close()
            del reader.env, reader.txn


def bench_loader(path: str, samples: int, rounds: int, reference_dir: str) -> None:
    index = read_index(path)
    first, count = ratio_window_range(index.num_steps, 0.0, 1.0, T, K)
    ours = LMDBDataset(index, T, K, "ee_rel_pose", first, count)
    readers: dict[str, Dataset] = {}
    if reference_dir:
        ref = rr.import_reference(reference_dir)
        print(ref.describe())
        readers["reference"] = ref.lmdb.LMDBDataset(path, T, K, "ee_rel_pose", 7, 0.0, 1.0)
    readers["ours"] = ours
    rng = random.Random(0)
    orders = [[rng.randrange(count) for _ in range(samples)] for _ in range(rounds)]
    if "reference" in readers:
        for i in orders[0][:20]:
            a = ours[i]
            release(readers)
            b = readers["reference"][i]
            release(readers)
            assert list(a) == list(b), f"item {i}: keys {list(a)} vs {list(b)}"
            assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in b), f"item {i} differs"
        print("  items of the reference reader and ours are equal (20 windows)")
    modes = ("in-process, 1 thread", "DataLoader, 1 worker")
    results: dict[str, dict[str, list[float]]] = {mode: {name: [] for name in readers} for mode in modes}
    for r, order in enumerate(orders):
        for name in readers if r % 2 == 0 else list(readers)[::-1]:
            results[modes[0]][name].append(in_process_rate(readers[name], order))
            release(readers)
            results[modes[1]][name].append(loader_rate(readers[name], order))
    shared = LMDBDataset(index, T, K, "ee_rel_pose", first, count)
    shared.frame_groups = shared.window_groups(4)
    grouped = EpochSampler(count, seed=0, groups=shared.frame_groups)
    shared_rate = statistics.median(loader_rate(shared, list(grouped)[:samples]) for _ in orders)
    print(f"loader: {path}, {index.num_steps} steps, seq_len {T}, chunk {K}, {samples} random windows x {rounds} "
          f"rounds (median), torch threads {torch.get_num_threads()}")
    for mode, rates in results.items():
        line = "   ".join(f"{name} {statistics.median(v):7.1f} samples/s ({1000 / statistics.median(v):5.1f} ms)"
                          for name, v in rates.items())
        if "reference" in rates:
            line += f"   speed-up {statistics.median(rates['ours']) / statistics.median(rates['reference']):4.1f}x"
        print(f"  {mode:22s} {line}")
    print(f"  DataLoader, 1 worker, frame_sharing=4 batches: ours {shared_rate:7.1f} samples/s "
          f"({1000 / shared_rate:5.1f} ms)")
    decode = jpeg_share(path, ours, orders[0])
    transfer = statistics.median(loader_rate(EmptyItems(), order) for order in orders)
    print(f"  JPEG decoding alone ({cf.JPEG_DECODER}, libjpeg-turbo): {decode * 1000:.1f} ms per sample, "
          f"{decode * statistics.median(results[modes[0]]['ours']) * 100:.0f}% of our in-process time")
    print(f"  DataLoader transfer alone (zero-cost items, 1 worker, batch 8): {transfer:.0f} samples/s "
          f"({1000 / transfer:.1f} ms per sample: what the default collate costs, which ours avoids)")


def repeated_input(source: str, repeat: int, root: str) -> str:
    """A split root whose frames link to `source`'s and whose windows are `source`'s repeated `repeat` times."""
    for split in cf.SPLITS:
        split_dir = os.path.join(root, split)
        os.makedirs(os.path.join(split_dir, "lang_annotations"))
        for name in os.listdir(os.path.join(source, split)):
            if name.startswith("episode_"):
                os.symlink(os.path.join(source, split, name), os.path.join(split_dir, name))
        data = cf.read_object_npy(os.path.join(source, split, cf.ANNOTATION_FILE))
        data["language"]["ann"] = list(data["language"]["ann"]) * repeat
        data["info"]["indx"] = list(data["info"]["indx"]) * repeat
        np.save(os.path.join(split_dir, cf.ANNOTATION_FILE), data, allow_pickle=True)
    return root


def run_converter(input_dir: str, output_dir: str, workers: int) -> tuple[int, float]:
    """calvin2lmdb.py as users run it (its worker processes import only what the script imports) -> frames, rate."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "calvin2lmdb.py"), "--input_dir", input_dir,
                             "--output_dir", output_dir, "--workers", str(workers), "--no_progress"],
                            capture_output=True, text=True, check=True, cwd=ROOT)
    match = re.search(r"wrote (\d+) frames in [\d.]+ s \(([\d.]+) frames/s", result.stdout)
    return int(match.group(1)), float(match.group(2))


def bench_conversion(input_dir: str, repeat: int, workdir: str) -> None:
    source = repeated_input(input_dir, repeat, os.path.join(workdir, "input"))
    cores = os.cpu_count() or 1
    rates = {}
    for workers in (1, cores):
        frames, rates[workers] = run_converter(source, os.path.join(workdir, f"out_{workers}"), workers)
    print(f"conversion: python calvin2lmdb.py on {input_dir} windows x {repeat} = {frames} frames (npz load + 2 JPEG "
          f"encodes + LMDB write; load average {os.getloadavg()[0]:.1f} on {cores} cores)")
    print(f"  --workers 1 {rates[1]:7.1f} frames/s   --workers {cores} (all cores) {rates[cores]:7.1f} frames/s   "
          f"speed-up {rates[cores] / rates[1]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=rr.STAND_IN_HELP)
    parser.add_argument("--reference_dir", default="", help="local clone of EDiRobotics/GR1-Training")
    parser.add_argument("--lmdb", default="", help="LMDB to read (default: mini_calvin converted to a temp dir)")
    parser.add_argument("--input_dir", default=MINI_CALVIN, help="CALVIN split root for the conversion benchmark")
    parser.add_argument("--samples", type=int, default=300, help="random windows per reader and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=12, help="times the input's windows are converted")
    parser.add_argument("--skip_conversion", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # what a DataLoader worker gets
    print(f"{os.cpu_count()} cores, torch {torch.__version__}, numpy {np.__version__}, our JPEG decoder "
          f"{cf.JPEG_DECODER}, load average {os.getloadavg()[0]:.1f} at the start")
    with tempfile.TemporaryDirectory() as workdir:
        path = args.lmdb
        if not path:
            path = os.path.join(workdir, "mini_lmdb")
            convert(args.input_dir, path, workers=1, progress=False)
        bench_loader(path, args.samples, args.rounds, args.reference_dir)
        if not args.skip_conversion:
            bench_conversion(args.input_dir, args.repeat, workdir)


if __name__ == "__main__":
    main()

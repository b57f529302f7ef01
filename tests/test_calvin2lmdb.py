"""calvin2lmdb on mini_calvin (real-format CALVIN frames): schema, equality with the reference-schema reader,
parallel = serial, resume after a kill or a failure = uninterrupted run, refusals and input errors."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT
from data import calvin_format as cf
from data.convert import ConversionError, convert
from data.lmdb_dataset import LMDBDataset, ratio_window_range
from data.lmdb_reader import DatasetError, close_lmdb, read_index
from data_helpers import (  # noqa: F401 (fixture)
    assert_items_equal,
    copy_lmdb,
    lmdb_contents,
    make_split_root,
    mini_calvin,
    mini_lmdb,
    segments_done,
)
from models.encoders import tokenize
from reference_reader import ReferenceSchemaReader

# (split, first frame, last frame, instruction) of mini_calvin, as its README lists them
WINDOWS = [("training", 0, 64), ("training", 63, 127), ("training", 143, 191), ("training", 192, 240),
           ("validation", 241, 305), ("validation", 259, 323)]


def test_schema_and_values(mini_lmdb):
    values = lmdb_contents(mini_lmdb)
    steps = sum(end - start + 1 for _, start, end in WINDOWS)
    expected = {f"{field}_{s}".encode() for s in range(steps) for field in cf.STEP_FIELDS}
    expected |= {f"{field}_{e}".encode() for e in range(len(WINDOWS)) for field in ("inst", "inst_token")}
    assert set(values) == expected | {b"cur_step", b"conversion_info"}  # no inst_emb without CLIP weights
    assert pickle.loads(values[b"cur_step"]) == steps - 1
    step = 0
    for episode, (split, start, end) in enumerate(WINDOWS):
        text = pickle.loads(values[f"inst_{episode}".encode()])
        assert torch.equal(pickle.loads(values[f"inst_token_{episode}".encode()]), tokenize(text)[0])
        for frame_id in (start, end):
            s = step + frame_id - start
            assert pickle.loads(values[f"cur_episode_{s}".encode()]) == episode
            assert pickle.loads(values[f"done_{s}".encode()]) is (frame_id == end)
            npz = np.load(cf.episode_path(os.path.join(mini_calvin(), split), frame_id))
            for key, npz_key in (("robot_obs", "robot_obs"), ("rel_action", "rel_actions"),
                                 ("abs_action", "actions"), ("scene_obs", "scene_obs")):
                assert torch.equal(pickle.loads(values[f"{key}_{s}".encode()]), torch.from_numpy(npz[npz_key]))
            jpeg = pickle.loads(values[f"rgb_static_{s}".encode()])
            assert jpeg.dtype == torch.uint8 and jpeg.dim() == 1
            assert np.abs(cf.decode_jpeg(jpeg.numpy(), 200).astype(int) - npz["rgb_static"]).mean() < 6
        step += end - start + 1
    info = json.loads(values[b"conversion_info"])
    assert info["complete"] and info["splits"]["validation"]["first_step"] == 228 and not info["inst_emb"]


@pytest.mark.parametrize("action_mode, ends_stride", [("ee_rel_pose", 3), ("ee_abs_pose", 6)])
def test_items_equal_the_reference_schema_reader(mini_lmdb, action_mode, ends_stride):
    """Windows before every segment end and a spread of others, seq_len 10 / chunk 10 (the default config)."""
    T = K = 10
    index = read_index(mini_lmdb)
    first, count = ratio_window_range(index.num_steps, 0.0, 1.0, T, K)
    ours = LMDBDataset(index, T, K, action_mode, first, count)
    reference = ReferenceSchemaReader(mini_lmdb, T, K, action_mode, 0.0, 1.0)
    assert len(ours) == len(reference) == 338
    ends = np.flatnonzero(np.diff(index.episode_of_step)) + 1  # first step of each next segment
    picked = sorted({i for e in ends for i in range(e - 11, e + 1, ends_stride)} | set(range(0, count, 40)))
    picked = [i for i in picked if 0 <= i < count]
    partial = 0
    for i in picked:
        item = ours[i]
        assert_items_equal(item, reference[i], f"item {i}")
        partial += bool((item["mask"] == 0).any())
    assert partial >= 2 * len(ends)  # the masks at segment ends were exercised


def test_parallel_conversion_is_byte_identical(mini_lmdb, tmp_path):
    convert(mini_calvin(), str(tmp_path / "par"), workers=2, commit_every=2, progress=False)
    assert lmdb_contents(str(tmp_path / "par")) == lmdb_contents(mini_lmdb)


def test_resume_after_failure_gives_identical_content(mini_lmdb, tmp_path):
    """An episode file breaks mid-run: finished segments are kept, the error names the file, and after the file
    is fixed the same command finishes with exactly the uninterrupted run's content."""
    root = make_split_root(str(tmp_path / "in"), {s: [(a, b, "") for split, a, b in WINDOWS if split == s]
                                                  for s in cf.SPLITS}, mini_calvin())
    texts = [t.text for split in cf.SPLITS for t in cf.load_segments(os.path.join(mini_calvin(), split), split)]
    for split in cf.SPLITS:  # same instructions as mini_calvin
        path = os.path.join(root, split, cf.ANNOTATION_FILE)
        data = np.load(path, allow_pickle=True).item()
        data["language"]["ann"] = texts[:4] if split == "training" else texts[4:]
        np.save(path, data, allow_pickle=True)
    broken = os.path.join(root, "training", "episode_0000150.npz")  # in the third segment
    os.remove(broken)
    with open(broken, "wb") as f:
        f.write(b"PK\x03\x04 truncated")
    out = str(tmp_path / "out")
    with pytest.raises(cf.CalvinFormatError, match="corrupt episode file .*episode_0000150.npz"):
        convert(root, out, workers=1, commit_every=1, progress=False)
    with pytest.raises(DatasetError, match="unfinished conversion \\(2 of 6 segments\\)"):
        read_index(out)
    os.remove(broken)
    os.symlink(os.path.join(mini_calvin(), "training", "episode_0000150.npz"), broken)
    stats = convert(root, out, workers=1, commit_every=1, progress=False)
    assert stats.resumed_from_segment == 2
    assert lmdb_contents(out) == lmdb_contents(mini_lmdb)


def _run_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "calvin2lmdb.py"), *args, "--no_progress"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_resume_after_sigkill_gives_identical_content(mini_lmdb, tmp_path):
    out = str(tmp_path / "killed")
    args = ("--input_dir", mini_calvin(), "--output_dir", out, "--workers", "1", "--commit_every", "1")
    process = _run_cli(*args)
    deadline = time.time() + 60
    while segments_done(out) < 1 and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    finished_early = process.poll() is not None
    process.send_signal(signal.SIGKILL)
    output = process.communicate()[0]
    assert not finished_early, f"the converter ended before it could be killed:\n{output}"
    done = segments_done(out)
    assert 1 <= done < len(WINDOWS), f"the kill should land mid-conversion (segments done: {done})"
    finished = _run_cli(*args)
    output, _ = finished.communicate(timeout=120)
    assert finished.returncode == 0, output
    assert f"resumed at segment {done}" in output
    assert lmdb_contents(out) == lmdb_contents(mini_lmdb)


def test_refuses_to_append_to_a_complete_or_foreign_lmdb(mini_lmdb, tmp_path):
    done = copy_lmdb(mini_lmdb, str(tmp_path / "done"))
    before = lmdb_contents(done)
    with pytest.raises(ConversionError, match="already a complete conversion.*--overwrite"):
        convert(mini_calvin(), done, progress=False)
    assert lmdb_contents(done) == before
    foreign = copy_lmdb(os.path.join(ROOT, "..", "shared", "fixtures", "tiny_calvin_lmdb"), str(tmp_path / "ref"))
    with pytest.raises(ConversionError, match="did not write.*refusing to append"):
        convert(mini_calvin(), foreign, progress=False)
    convert(mini_calvin(), foreign, overwrite=True, progress=False)
    assert lmdb_contents(foreign) == before


def test_refuses_to_resume_from_another_input(mini_lmdb, tmp_path):
    root = make_split_root(str(tmp_path / "in"), {"training": [(0, 10, "a")], "validation": [(241, 250, "b")]},
                           mini_calvin())
    out = str(tmp_path / "out")
    convert(mini_calvin(), out, workers=1, progress=False, max_segments=1)
    with pytest.raises(ConversionError, match="different input"):
        convert(root, out, progress=False)


def test_input_errors_before_anything_is_written(tmp_path):
    root = make_split_root(str(tmp_path / "in"), {"training": [(0, 10, "a")]}, mini_calvin())
    out = str(tmp_path / "out")
    with pytest.raises(cf.CalvinFormatError, match="split folder not found: .*validation"):
        convert(root, out, progress=False)
    make_split_root(str(tmp_path / "in2"), {"training": [(0, 10, "a")], "validation": [(241, 250, "b")]},
                    mini_calvin())
    os.remove(os.path.join(tmp_path, "in2", "validation", "episode_0000245.npz"))
    with pytest.raises(cf.CalvinFormatError, match="missing episode file .*validation.*episode_0000245.npz"):
        convert(str(tmp_path / "in2"), out, progress=False)
    os.remove(os.path.join(tmp_path, "in2", "validation", cf.ANNOTATION_FILE))
    with pytest.raises(cf.CalvinFormatError, match="auto_lang_ann.npy not found"):
        convert(str(tmp_path / "in2"), out, progress=False)
    assert not os.path.exists(os.path.join(out, "data.mdb"))


def test_cli_reports_input_errors_in_one_line(tmp_path):
    process = _run_cli("--input_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "out"))
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 1
    assert output.strip().splitlines()[-1].startswith("calvin2lmdb: error: --input_dir")
    assert "Traceback" not in output


def test_inst_emb_written_with_a_text_encoder(tmp_path):
    """With CLIP weights configured the converter adds inst_emb_{e} = encode_text(inst_token_{e}) (here a stand-in
    encoder; the real one is models.build.build_encoders(cfg).clip_text)."""
    root = make_split_root(str(tmp_path / "in"), {"training": [(0, 5, "open the drawer")],
                                                  "validation": [(241, 244, "open the drawer")]}, mini_calvin())

    def embed(tokens: np.ndarray) -> np.ndarray:
        return tokens[:, :4].astype(np.float32) * 0.5

    convert(root, str(tmp_path / "out"), embedder=embed, progress=False)
    values = lmdb_contents(str(tmp_path / "out"))
    token = pickle.loads(values[b"inst_token_1"])
    assert torch.equal(pickle.loads(values[b"inst_emb_1"]), token[:4].float() * 0.5)
    with pytest.raises(ConversionError, match="already a complete"):
        convert(root, str(tmp_path / "out"), embedder=embed, progress=False)
    close_lmdb(str(tmp_path / "out"))


def test_inst_emb_from_configured_clip_weights(tmp_path):
    """calvin2lmdb.text_embedder: clip_ckpt set and present -> inst_emb = build_encoders(cfg).clip_text(tokens);
    absent -> None (not written)."""
    import calvin2lmdb
    from config import Config
    from models.build import build_encoders
    from models.encoders import CLIPTextEncoder
    cfg = Config().replace(clip_text_width=64, clip_text_layers=1, clip_text_heads=2, lang_feat_dim=32,
                           clip_ckpt=str(tmp_path / "missing.pt"))
    assert calvin2lmdb.text_embedder(cfg) is None
    torch.manual_seed(0)
    torch.save(CLIPTextEncoder(32, 64, 1, 2).state_dict(), tmp_path / "clip.pt")
    cfg = cfg.replace(clip_ckpt=str(tmp_path / "clip.pt"), mae_depth=1)
    embed = calvin2lmdb.text_embedder(cfg)
    tokens = tokenize(["open the drawer", "lift the red block"]).numpy()
    with pytest.warns(UserWarning):
        expected = build_encoders(cfg.replace(mae_ckpt="")).clip_text(torch.from_numpy(tokens).long())
    assert np.array_equal(embed(tokens), expected.detach().numpy())

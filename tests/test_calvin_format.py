"""data/calvin_format.py: torch-free tensor pickles, JPEG coding, gripper mapping, raw CALVIN reading."""
import datetime
import os
import pickle
import pickletools
import re

import numpy as np
import pytest
import torch

from conftest import shared_path
from data import calvin_format as cf
from data.lmdb_dataset import reading

ARRAYS = [np.arange(7, dtype=np.float64) / 3, np.linspace(-1, 1, 15, dtype=np.float32), np.arange(77, dtype=np.int32),
          np.arange(300).astype(np.uint8), np.linspace(0, 1, 512).astype(np.float16), np.array(3.5),
          np.arange(12, dtype=np.float64).reshape(3, 4), np.array([True, False]), np.arange(70000, dtype=np.int64)]


def _blob(pickled: bytes) -> bytes:
    """The nested torch.save blob inside a pickled tensor."""
    return next(arg for op, arg, _ in pickletools.genops(pickled) if op.name in ("BINBYTES", "BINBYTES8"))


@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{a.dtype}{list(a.shape)}")
def test_dumps_tensor_is_what_torch_unpickles(array):
    value = cf.dumps_tensor(array)
    tensor = pickle.loads(value)  # torch's own unpickling, as GR1-Training's reader does
    expected = torch.from_numpy(array)
    assert tensor.dtype == expected.dtype and tensor.shape == expected.shape and torch.equal(tensor, expected)
    assert value == cf.dumps_tensor(array.copy()), "serialisation must be deterministic"


@pytest.mark.parametrize("array", ARRAYS[:4], ids=lambda a: str(a.dtype))
def test_storage_blob_equals_torchs_up_to_the_storage_key(array):
    theirs = _blob(pickle.dumps(torch.from_numpy(array)))
    key = re.search(rb"q\x01X(....)(\d+)q\x02", theirs).group(2)  # torch uses the storage's address
    ours = _blob(cf.dumps_tensor(array)).replace(b"X\x01\x00\x00\x000q", b"X" + len(key).to_bytes(4, "little") + key
                                                  + b"q")
    assert ours == theirs


@pytest.mark.parametrize("fast_path", [True, False])
def test_loads_value_reads_every_value_of_the_reference_lmdb(monkeypatch, fast_path):
    if not fast_path:  # the general parser, used when a value is not laid out exactly as torch writes it today
        monkeypatch.setattr(cf, "_storage_fast_path", lambda blob: None)
        monkeypatch.setattr(cf, "_vector_fast_path", lambda data: None)
    with reading(shared_path("fixtures", "tiny_calvin_lmdb")) as env, env.begin() as txn:
        values = dict(txn.cursor())
    assert len(values) == 162
    for key, value in values.items():
        ours, theirs = cf.loads_value(value), pickle.loads(value)
        if isinstance(theirs, torch.Tensor):
            assert ours.dtype == theirs.numpy().dtype and np.array_equal(ours, theirs.numpy()), key
        else:
            assert type(ours) is type(theirs) and ours == theirs, key


@pytest.mark.parametrize("writer", ["ours", "torch"])
def test_vector_fast_path_reads_every_1d_tensor(writer):
    for array in ARRAYS:
        data = cf.dumps_tensor(array) if writer == "ours" else pickle.dumps(torch.from_numpy(array))
        fast = cf._vector_fast_path(data)
        if array.ndim == 1 and len(data) < 65536:
            assert fast is not None and fast.dtype == array.dtype and np.array_equal(fast, array)
        elif array.ndim != 1:  # anything else is left to the general unpickler
            assert fast is None


def test_loads_value_reads_non_contiguous_tensors_and_refuses_other_globals():
    t = torch.arange(12.0).reshape(3, 4).t()[1:]
    assert np.array_equal(cf.loads_value(pickle.dumps(t)), t.numpy())
    with pytest.raises(cf.LMDBValueError, match="datetime.date"):
        cf.loads_value(pickle.dumps(datetime.date(2024, 1, 1)))


@pytest.fixture(params=["Pillow", "simplejpeg"])
def jpeg_decoder(request, monkeypatch) -> str:
    """Runs a test with each JPEG decoder: Pillow always, simplejpeg where it is installed."""
    if request.param == "Pillow":
        monkeypatch.setattr(cf, "simplejpeg", None)
    elif cf.simplejpeg is None:
        pytest.skip("simplejpeg is not installed (optional; Pillow decodes instead)")
    return request.param


def test_jpeg_decode_gives_the_reference_pixels(jpeg_decoder):
    """The fixture LMDB holds torchvision-encoded JPEGs; GR1-Training's items hold torchvision's decoded pixels."""
    items = torch.load(shared_path("fixtures", "tiny_calvin_lmdb_items.pt"))["items"]
    with reading(shared_path("fixtures", "tiny_calvin_lmdb")) as env, env.begin() as txn:
        for step in range(4):  # item 0 shows steps 0..3
            for cam, size in cf.CAMERA_SIZES.items():
                jpeg = cf.loads_value(txn.get(cf.step_key(cam, step)))
                assert np.array_equal(cf.decode_jpeg_chw(jpeg, size), items[0][cam][step].numpy())
                assert np.array_equal(cf.decode_jpeg(jpeg, size).transpose(2, 0, 1), items[0][cam][step].numpy())


def test_jpeg_encode_is_deterministic_and_close_and_errors_are_clear(jpeg_decoder):
    image = np.load(cf.episode_path(shared_path("calvin", "mini_calvin", "training"), 30))["rgb_static"]
    data = cf.encode_jpeg(image)
    assert data == cf.encode_jpeg(image.copy()) and data[:2] == b"\xff\xd8"
    assert np.abs(cf.decode_jpeg(data, 200).astype(int) - image).mean() < 6  # JPEG q75 of a rendered frame: ~3.7
    with pytest.raises(ValueError, match="84x84"):
        cf.decode_jpeg(data, 84)
    with pytest.raises(ValueError, match="200x200"):
        cf.decode_jpeg(data[:len(data) // 2], 200)


def test_gripper_mapping():
    assert cf.gripper_action_to_binary(np.array([-1.0, 1.0], np.float32)).tolist() == [0.0, 1.0]
    assert cf.gripper_action_to_binary(np.array([-1.0], np.float32)).dtype == np.float32
    assert cf.gripper_state_index(-1.0) == 0 and cf.gripper_state_index(1.0) == 1
    with pytest.raises(ValueError, match="not -1 or \\+1"):
        cf.gripper_state_index(3.0)


def test_keys_are_the_reference_names():
    assert cf.step_key("rgb_static", 12) == b"rgb_static_12" and cf.episode_key("inst_token", 3) == b"inst_token_3"
    frame = {"rgb_static": np.zeros((200, 200, 3), np.uint8), "rgb_gripper": np.zeros((84, 84, 3), np.uint8),
             "actions": np.zeros(7), "rel_actions": np.ones(7), "robot_obs": np.zeros(15), "scene_obs": np.zeros(24)}
    pairs = dict(cf.frame_values(5, 2, True, frame))
    assert set(pairs) == {f"{f}_5".encode() for f in cf.STEP_FIELDS}
    assert pickle.loads(pairs[b"done_5"]) is True and pickle.loads(pairs[b"cur_episode_5"]) == 2
    assert torch.equal(pickle.loads(pairs[b"rel_action_5"]), torch.ones(7, dtype=torch.float64))


def test_load_segments_of_mini_calvin():
    root = shared_path("calvin", "mini_calvin")
    segments = cf.load_segments(os.path.join(root, "training"), "training")
    assert [(s.start, s.end) for s in segments] == [(0, 64), (63, 127), (143, 191), (192, 240)]
    assert segments[0].text == "toggle the button to turn off the led light" and segments[0].num_frames == 65


def test_raw_input_errors_name_the_file(tmp_path):
    with pytest.raises(cf.CalvinFormatError, match="split folder not found"):
        cf.load_segments(str(tmp_path / "validation"), "validation")
    (tmp_path / "training").mkdir()
    with pytest.raises(cf.CalvinFormatError, match="auto_lang_ann.npy not found"):
        cf.load_segments(str(tmp_path / "training"), "training")
    with pytest.raises(cf.CalvinFormatError, match="missing episode file .*episode_0000007.npz"):
        cf.load_frame(cf.episode_path(str(tmp_path), 7))
    corrupt = tmp_path / "episode_0000001.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip file")
    with pytest.raises(cf.CalvinFormatError, match="corrupt episode file .*episode_0000001.npz"):
        cf.load_frame(str(corrupt))
    frame = dict(np.load(cf.episode_path(shared_path("calvin", "mini_calvin", "training"), 0)))
    np.savez_compressed(tmp_path / "episode_0000002.npz", **{**frame, "rgb_static": frame["rgb_static"][:100]})
    with pytest.raises(cf.CalvinFormatError, match=r"'rgb_static' has shape \(100, 200, 3\), expected \(200, 200, 3\)"):
        cf.load_frame(str(tmp_path / "episode_0000002.npz"))
    del frame["robot_obs"]
    np.savez_compressed(tmp_path / "episode_0000003.npz", **frame)
    with pytest.raises(cf.CalvinFormatError, match="no array 'robot_obs'"):
        cf.load_frame(str(tmp_path / "episode_0000003.npz"))


def test_both_jpeg_decoders_give_the_same_pixels_on_rendered_frames():
    if cf.simplejpeg is None:
        pytest.skip("simplejpeg is not installed (optional; Pillow decodes instead)")
    split = shared_path("calvin", "mini_calvin", "validation")
    for frame_id in range(241, 338, 8):
        frame = np.load(cf.episode_path(split, frame_id))
        for cam, size in cf.CAMERA_SIZES.items():
            data = cf.encode_jpeg(frame[cam])
            fast = cf.decode_jpeg_chw(data, size)
            assert np.array_equal(fast, cf.decode_jpeg(data, size).transpose(2, 0, 1))
            simplejpeg, cf.simplejpeg = cf.simplejpeg, None
            try:
                assert np.array_equal(fast, cf.decode_jpeg_chw(data, size)), (frame_id, cam)
            finally:
                cf.simplejpeg = simplejpeg

"""data/calvin_format.py: JPEG coding, gripper mapping, raw CALVIN reading, the key schema."""
import os
import pickle

import numpy as np
import pytest
import torch

from conftest import shared_path
from data import calvin_format as cf
from data.codec import loads_value
from data.lmdb_reader import reading


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
                jpeg = loads_value(txn.get(cf.step_key(cam, step)))
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

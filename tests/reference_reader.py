"""A straightforward per-key reader of GR1-Training's LMDB schema: the independent reader that tests compare
data/lmdb_dataset.py and the converter's output with (bench/bench_data.py measures against GR1-Training's own reader).

It follows GR1-Training's LMDBDataset_jpeg.LMDBDataset step by step (every value fetched and unpickled with
torch's pickle.loads where the reference does it, cur_episode re-read for every frame and action, each action
re-read for every chunk it belongs to). The one substitution: JPEGs are decoded with data.calvin_format.decode_jpeg
(Pillow/libjpeg-turbo, the same pixels as torchvision's decode_jpeg, which GR1-Training uses). As an oracle it spells
the schema out itself (key names, widths, the gripper mapping) rather than importing the project's definitions.
"""
from __future__ import annotations

import pickle

import torch
from torch.utils.data import Dataset

from data.calvin_format import CAMERA_SIZES, decode_jpeg
from data.lmdb_reader import open_lmdb  # one handle per process and path (py-lmdb's rule)


class ReferenceSchemaReader(Dataset):
    def __init__(self, lmdb_dir: str, seq_len: int, chunk_size: int, action_mode: str, start_ratio: float,
                 end_ratio: float):
        self.lmdb_dir, self.seq_len, self.chunk_size, self.action_mode = lmdb_dir, seq_len, chunk_size, action_mode
        with open_lmdb(lmdb_dir).begin() as txn:
            num_steps = pickle.loads(txn.get(b"cur_step")) + 1
        self.start = int(num_steps * start_ratio)
        self.end = int(num_steps * end_ratio) - seq_len - chunk_size
        self.txn = None

    def __len__(self) -> int:
        return self.end - self.start

    def _load(self, key: str):
        return pickle.loads(self.txn.get(key.encode()))

    def _image(self, key: str, size: int) -> torch.Tensor:
        pixels = decode_jpeg(self._load(key).numpy().tobytes(), size)  # (R, R, 3)
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if self.txn is None:
            self.txn = open_lmdb(self.lmdb_dir).begin()
        T, K = self.seq_len, self.chunk_size
        s = idx + self.start
        item = {
            "rgb_static": torch.zeros(T, 3, CAMERA_SIZES["rgb_static"], CAMERA_SIZES["rgb_static"], dtype=torch.uint8),
            "rgb_gripper": torch.zeros(T, 3, CAMERA_SIZES["rgb_gripper"], CAMERA_SIZES["rgb_gripper"],
                                       dtype=torch.uint8),
            "arm_state": torch.zeros(T, 6), "gripper_state": torch.zeros(T, 2), "actions": torch.zeros(T, K, 7),
            "mask": torch.zeros(T, K),
        }
        episode = self._load(f"cur_episode_{s}")
        item["inst_token"] = self._load(f"inst_token_{episode}")
        prefix = "rel_action" if self.action_mode == "ee_rel_pose" else "abs_action"
        for i in range(T):
            if self._load(f"cur_episode_{s + i}") != episode:
                continue
            for cam, size in CAMERA_SIZES.items():
                item[cam][i] = self._image(f"{cam}_{s + i}", size)
            robot_obs = self._load(f"robot_obs_{s + i}")
            item["arm_state"][i, :6] = robot_obs[:6]
            item["gripper_state"][i, ((robot_obs[-1] + 1) / 2).long()] = 1
            for j in range(K):
                if self._load(f"cur_episode_{s + i + j}") == episode:
                    item["mask"][i, j] = 1
                    item["actions"][i, j] = self._load(f"{prefix}_{s + i + j}")
                    item["actions"][i, j, -1] = (item["actions"][i, j, -1] + 1) / 2
        return {k: item[k] for k in ("rgb_static", "rgb_gripper", "inst_token", "arm_state", "gripper_state",
                                     "actions", "mask")}

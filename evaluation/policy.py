"""GR-1 as an evaluation policy: observation + instruction -> relative action (the EvalPolicy interface).

Per environment step the policy appends the new frame to a history of seq_len frames and, when its queue of
actions is empty, queries GR-1 at the last valid timestep and queues its first test_chunk_size actions.

The cached path (default) does only the work that is new at each step: the MAE and resampler run on the new frame
of each camera once and their tokens are kept per frame (frames are encoded independently of each other), the CLIP
embedding is kept per instruction, GPT-2 runs only the observation tokens plus the queried step's action queries,
and the pixel decoder runs only when videos are recorded. The uncached path recomputes everything as GR1-Training's
evaluator does; both give the same actions (tested).

Shape key: T window (seq_len), K chunk, Q latents, D hidden, S image size.
"""
from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import torch

from config import Config
from models.encoders import FrozenEncoders, tokenize
from models.gr1 import CAMERAS, GR1, Keep

RGB_KEYS = {"static": "rgb_static", "gripper": "rgb_gripper"}


def unpatchify(patches: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, P, p*p*3) -> (N, 3, S, S): the inverse of models.losses.patchify."""
    N, P, _ = patches.shape
    g, p = int(round(P ** 0.5)), patch_size
    x = patches.reshape(N, g, g, p, p, 3)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(N, 3, g * p, g * p)


class GR1Policy:
    def __init__(self, cfg: Config, encoders: FrozenEncoders, gr1: GR1, preprocessor, device: torch.device,
                 use_cache: bool = True, record_video: bool = False):
        self.cfg, self.encoders, self.gr1, self.pre, self.device = cfg, encoders, gr1, preprocessor, device
        self.use_cache, self.record_video = use_cache, record_video
        self._tokens: dict[str, torch.Tensor] = {}
        self.reset()

    def reset(self) -> None:
        T = self.cfg.seq_len
        self.frames: dict[str, deque] = {cam: deque(maxlen=T) for cam in CAMERAS}  # uint8 (3, H, W) per frame
        self.frame_tokens: dict[str, deque] = {cam: deque(maxlen=T) for cam in CAMERAS}  # (Q+1, D) per frame
        self.states: deque = deque(maxlen=T)  # (7,): arm 6 + gripper +-1
        self.queue: deque = deque()
        self.last_prediction: dict[str, np.ndarray] = {}

    # ---- observation bookkeeping ----
    def _observe(self, obs: dict) -> None:
        for cam in CAMERAS:
            image = np.ascontiguousarray(obs["rgb_obs"][RGB_KEYS[cam]])  # (H, W, 3) uint8
            self.frames[cam].append(torch.from_numpy(image).permute(2, 0, 1))
        robot = np.asarray(obs["robot_obs"], dtype=np.float64)
        self.states.append(torch.from_numpy(np.concatenate([robot[:6], robot[-1:]])).float())
        if self.use_cache:
            self._encode_newest_frame()

    @torch.no_grad()
    def _encode_newest_frame(self) -> None:
        """MAE + resampler + token embedding of the newest frame of each camera, kept for the next T steps."""
        static = self.frames["static"][-1][None, None].to(self.device)
        gripper = self.frames["gripper"][-1][None, None].to(self.device)
        images = dict(zip(CAMERAS, self.pre.process(static, gripper, train=False)))  # (1, 1, 3, S, S)
        for cam, (cls, patches) in self.encoders.encode_frames(images).items():
            self.frame_tokens[cam].append(self.gr1.frame_tokens(cls[:, 0], patches[:, 0], cam)[0])

    def _tokens_of(self, instruction: str) -> torch.Tensor:
        if instruction not in self._tokens:
            self._tokens[instruction] = tokenize(instruction).to(self.device)
        return self._tokens[instruction]

    def _state_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Zero-padded (1, T, 6) arm state, (1, T, 2) one-hot gripper state, (1, T) attention mask."""
        T, n = self.cfg.seq_len, len(self.states)
        states = torch.stack(list(self.states))  # (n, 7)
        arm = torch.zeros(1, T, 6)
        arm[0, :n] = states[:, :6]
        # Faithful to GR1-Training's evaluator: padded steps get gripper -1, i.e. one-hot [1, 0] (invisible anyway)
        gripper = -torch.ones(1, T)
        gripper[0, :n] = states[:, 6]
        one_hot = torch.nn.functional.one_hot(((gripper + 1) / 2).long(), 2).float()
        mask = torch.zeros(1, T, dtype=torch.long)
        mask[0, :n] = 1
        return arm.to(self.device), one_hot.to(self.device), mask.to(self.device)

    # ---- model queries ----
    @torch.no_grad()
    def _query_cached(self, lang: torch.Tensor, arm, gripper, mask) -> dict[str, torch.Tensor]:
        T, n = self.cfg.seq_len, len(self.states)
        frames = {}
        for cam in CAMERAS:
            tokens = torch.stack(list(self.frame_tokens[cam]))  # (n, Q+1, D)
            frames[cam] = torch.cat((tokens, tokens.new_zeros((T - n,) + tokens.shape[1:])))[None]
        keep = Keep(action_steps=[n - 1], frame_steps=[n - 1] if self.record_video else [])
        return self.gr1.predict(lang, arm, gripper, frames, mask, keep)

    @torch.no_grad()
    def _query_uncached(self, lang: torch.Tensor, arm, gripper, mask) -> dict[str, torch.Tensor]:
        """GR1-Training's evaluator: every frame of both cameras (zero-padded to T) re-encoded, everything decoded."""
        T, n = self.cfg.seq_len, len(self.states)
        padded = {}
        for cam in CAMERAS:
            stack = torch.stack(list(self.frames[cam]))  # (n, 3, H, W)
            padded[cam] = torch.cat((stack, stack.new_zeros((T - n,) + stack.shape[1:])))[None].to(self.device)
        images = dict(zip(CAMERAS, self.pre.process(padded["static"], padded["gripper"], train=False)))
        out = self.gr1(lang, arm, gripper, self.encoders.encode_frames(images), mask)
        last = [n - 1]
        return {k: v[:, last] for k, v in out.items()}

    def _video_frames(self, out: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        frames = {}
        for cam in CAMERAS:
            image = unpatchify(out[f"rgb_{cam}_pred"][0].float(), self.cfg.patch_size)  # (1, 3, S, S)
            pixels = self.pre.to_pixels(image)[0]  # [0, 255]
            frames[f"rgb_{cam}_pred"] = pixels.permute(1, 2, 0).round().byte().cpu().numpy()
        return frames

    def step(self, obs: dict, instruction: str) -> dict[str, Any]:
        self._observe(obs)
        if not self.queue:
            lang = self.encoders.encode_text(self._tokens_of(instruction), cache=self.use_cache)
            arm, gripper, mask = self._state_tensors()
            query = self._query_cached if self.use_cache else self._query_uncached
            out = query(lang, arm, gripper, mask)
            k = self.cfg.test_chunk_size
            arm_act = out["arm_action"][0, 0, :k].float()  # (k, 6)
            # Faithful to GR1-Training: open (+1) iff sigmoid(logit) > 0.5, else close (-1)
            grip_act = torch.where(torch.sigmoid(out["gripper_action"][0, 0, :k].float()) > 0.5, 1.0, -1.0)
            actions = torch.cat((arm_act, grip_act), dim=-1).cpu().numpy().astype(np.float64)  # (k, 7)
            self.queue.extend(actions)
            if self.record_video:
                self.last_prediction = self._video_frames(out)
        result: dict[str, Any] = {"action": self.queue.popleft()}
        result.update(self.last_prediction)
        return result

"""GR-1 as an evaluation policy (evaluation/policy.py) with a fake environment, no simulator: the action queue
(test_chunk_size actions per query), the history (padded to seq_len, then sliding; cleared by reset), the gripper
threshold, the cached path against the uncached one (GR1-Training's evaluator) and batched queries against per-env
ones. A tiny random GR-1 (configs/tiny.json: seq_len 4, chunk_size 3). The last two also run on CUDA (`pytest -m
cuda`, TF32 off)."""
from __future__ import annotations

import copy
import inspect
import os
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from config import load_config
from conftest import DEVICES, ROOT, strict_device
from data.preprocess import ImagePreprocessor
from evaluation.policy import GR1BatchPolicy, GR1Policy
from facts import ARM_DIM, PREDICTION_KEYS
from helpers import random_observation, random_policy_model

TINY = os.path.join(ROOT, "configs", "tiny.json")
TEXT = "push the red block to the left"


class FakeEnv:
    """CALVIN-shaped observations without a simulator: random camera images and robot state, except that the
    robot state's gripper entry follows the last action's gripper command. Records the actions it is given."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.actions: list[np.ndarray] = []
        self.gripper = 1.0

    def reset(self) -> dict:
        self.gripper = 1.0
        return self._observation()

    def step(self, action: np.ndarray) -> dict:
        self.actions.append(action)
        self.gripper = float(action[-1])
        return self._observation()

    def _observation(self) -> dict:
        obs = random_observation(self.rng)
        obs["robot_obs"][-1] = self.gripper
        return obs


def rollout(policy, env: FakeEnv, steps: int, text: str = TEXT) -> tuple[list[dict], list[dict]]:
    """(observations, policy outputs) of `steps` closed-loop steps from a reset."""
    observations, outputs = [env.reset()], []
    for _ in range(steps):
        outputs.append(policy.step(observations[-1], text))
        observations.append(env.step(outputs[-1]["action"]))
    return observations[:-1], outputs


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config(TINY, ["seed=3"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is fastest and deterministic
    yield (cfg, *random_policy_model(cfg))
    torch.set_num_threads(threads)


@pytest.fixture()
def queries(tiny, monkeypatch):
    """Every GR1.predict call of a test: (arguments bound to their names, outputs)."""
    _, _, gr1, _ = tiny
    calls, predict = [], gr1.predict
    signature = inspect.signature(predict)

    def recording(*args, **kwargs):
        out = predict(*args, **kwargs)
        calls.append((signature.bind(*args, **kwargs).arguments, out))
        return out

    monkeypatch.setattr(gr1, "predict", recording)
    return calls


def test_each_query_queues_test_chunk_size_actions(tiny, queries):
    cfg, encoders, gr1, pre = tiny
    policy = GR1Policy(cfg.replace(test_chunk_size=2), encoders, gr1, pre, "cpu")
    _, outputs = rollout(policy, FakeEnv(0), 7)
    assert len(queries) == 4  # steps 0, 2, 4, 6 query; the others take the queue's next action
    for step, out in enumerate(outputs):
        query, j = queries[step // 2][1], step % 2
        action = out["action"]
        assert action.shape == (7,) and action.dtype == np.float64
        np.testing.assert_array_equal(action[:ARM_DIM], query["arm_action"][0, 0, j].double().numpy())
        assert action[ARM_DIM] == (1.0 if query["gripper_action"][0, 0, j, 0] > 0 else -1.0)


def test_history_is_padded_to_seq_len_then_slides_and_reset_clears_it(tiny, queries):
    cfg, encoders, gr1, pre = tiny
    T = cfg.seq_len
    policy = GR1Policy(cfg, encoders, gr1, pre, "cpu")  # test_chunk_size 1: a query every step
    observations, _ = rollout(policy, FakeEnv(1), T + 2)
    for n, (args, _) in enumerate(queries):
        arm, gripper, frames, mask, keep = (args[k] for k in ("arm_state", "gripper_state", "frames",
                                                              "attention_mask", "keep"))
        valid = min(n + 1, T)
        window = observations[n + 1 - valid:n + 1]  # the last seq_len observations
        assert mask.tolist() == [[1] * valid + [0] * (T - valid)]
        assert keep.action_steps == [valid - 1] and keep.per_row
        robot = torch.tensor(np.stack([o["robot_obs"] for o in window]), dtype=torch.float32)
        torch.testing.assert_close(arm[0, :valid], robot[:, :ARM_DIM], rtol=0, atol=0)
        assert gripper[0, :valid].argmax(-1).tolist() == [int(g > 0) for g in robot[:, -1]]
        assert not arm[0, valid:].any() and gripper[0, valid:].tolist() == [[1.0, 0.0]] * (T - valid)
        for cam, tokens in frames.items():
            assert not tokens[0, valid:].any()
            if n >= T:  # full: the window slid by one frame, the tokens of a frame are kept, not recomputed
                previous = queries[n - 1][0]["frames"][cam]
                assert torch.equal(tokens[0, :T - 1], previous[0, 1:])
    policy.reset()
    policy.step(observations[0], TEXT)
    assert queries[-1][0]["attention_mask"].tolist() == [[1] + [0] * (T - 1)]


def test_the_gripper_opens_only_above_probability_one_half(tiny, monkeypatch):
    cfg, encoders, gr1, pre = tiny
    K = cfg.chunk_size  # 3
    logits = torch.tensor([-3.0, 0.0, 1e-4]).reshape(1, 1, K, 1)  # sigmoid: 0.05, exactly 0.5, just above 0.5
    arm = torch.arange(K * ARM_DIM, dtype=torch.float32).reshape(1, 1, K, ARM_DIM) / 7
    monkeypatch.setattr(gr1, "predict", lambda *args, **kwargs: {"arm_action": arm, "gripper_action": logits})
    policy = GR1Policy(cfg.replace(test_chunk_size=K), encoders, gr1, pre, "cpu")
    _, outputs = rollout(policy, FakeEnv(2), K)
    assert [out["action"][ARM_DIM] for out in outputs] == [-1.0, -1.0, 1.0]
    for j, out in enumerate(outputs):
        np.testing.assert_array_equal(out["action"][:ARM_DIM], arm[0, 0, j].double().numpy())


def on_device(tiny, device: str):
    """The tiny policy model on `device` (a copy on CUDA)."""
    cfg, encoders, gr1, pre = tiny
    if device == "cpu":
        return tiny
    dev = strict_device(device)
    return cfg, copy.deepcopy(encoders).to(dev), copy.deepcopy(gr1).to(dev), ImagePreprocessor(cfg, dev)


@pytest.mark.parametrize("device", DEVICES)
def test_cached_path_equals_the_uncached_one(tiny, device):
    """The cached path (per-frame tokens kept, GPT-2 over the observation tokens and one step's queries, frames
    decoded for that step only) gives GR1-Training's evaluator's actions and predicted frames, in closed loop."""
    cfg, encoders, gr1, pre = on_device(tiny, device)
    cfg = cfg.replace(test_chunk_size=2)
    cached = GR1Policy(cfg, encoders, gr1, pre, device, record_video=True)
    uncached = GR1Policy(cfg, encoders, gr1, pre, device, use_cache=False, record_video=True)
    _, ours = rollout(cached, FakeEnv(3), 9)
    _, reference = rollout(uncached, FakeEnv(3), 9)
    for a, b in zip(ours, reference):
        np.testing.assert_allclose(a["action"], b["action"], rtol=0, atol=1e-5)
        for key in PREDICTION_KEYS.values():
            assert np.abs(a[key].astype(int) - b[key].astype(int)).max() <= 1


@pytest.mark.parametrize("device", DEVICES)
def test_batched_queries_equal_per_env_queries(tiny, device):
    """3 envs starting 0, 2 and 5 steps apart (so their histories differ in length until all are full), chunks of 2
    actions (so they query at different ticks), another instruction each, predicted frames on: one batched policy
    gives each env the actions of its own single-env policy."""
    cfg, encoders, gr1, pre = on_device(tiny, device)
    cfg = cfg.replace(test_chunk_size=2)
    rng = np.random.default_rng(0)
    starts, length = (0, 2, 5), 12
    streams = [[random_observation(rng) for _ in range(length)] for _ in starts]
    texts = ["go push the red block right", "press the button to turn on the led light", "grasp and lift the red block"]
    single = []
    for stream, text in zip(streams, texts):
        policy = GR1Policy(cfg, encoders, gr1, pre, device, record_video=True)
        single.append([policy.step(obs, text) for obs in stream])
    batched = GR1BatchPolicy(cfg, encoders, gr1, pre, device, record_video=True)
    got: dict[int, list] = defaultdict(list)
    sizes = Counter()
    for tick in range(max(starts) + length):
        requests = {e: (streams[e][tick - s], texts[e]) for e, s in enumerate(starts) if 0 <= tick - s < length}
        sizes[len(requests)] += 1
        for e, out in batched.act(requests).items():
            got[e].append(out)
    assert sizes[3] >= 5  # the three envs were served together, with different history lengths
    action_diff = max(np.abs(a["action"] - b["action"]).max() for e in got for a, b in zip(got[e], single[e]))
    frame_diff = max(np.abs(a[k].astype(int) - b[k].astype(int)).max() for e in got for a, b in zip(got[e], single[e])
                     for k in PREDICTION_KEYS.values())
    assert [len(got[e]) for e in range(3)] == [length] * 3
    assert action_diff <= 1e-5 and frame_diff <= 1

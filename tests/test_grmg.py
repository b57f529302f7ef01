"""GR-MG's Ego4D-pretrained GR-1 (pretrained.pt) through the strict GR-MG converter.

Fixtures (tests/fixtures/grmg, made by running GR-MG's own model code, see the README there): the full-size key layouts
of GR-MG's Lightning checkpoints (pretraining and CALVIN policy configs), and a small random GR-MG saved by Lightning
with its inputs and intermediate outputs. GR-MG's code is not needed here.

Token layouts (no position embedding in GR-MG; zero wpe here, so only the visible tokens before a token matter):
  GR-MG pretraining: [goal patch latents x Q, goal cls] + T x [lang, static patch latents x Q, static cls,
                     static observation queries x (Q+1)]
  GR-1 (this project): T x [lang, state, static x (Q+1), gripper x (Q+1), action queries x K,
                     static observation queries x (Q+1), gripper observation queries x (Q+1)]
The parity test builds GR-MG's sequence from this project's modules (the goal tokens, from GR-MG's goal embeddings that
GR-1 drops, are taken from the fixture) and runs this project's embedding LayerNorm, GPT-2 and pixel decoder on it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from config import Config, ModelConfig, from_dict
from conftest import ROOT
from data_helpers import mini_lmdb  # noqa: F401 (session fixture)
from models.build import (
    CheckpointError,
    build_encoders,
    build_gr1,
    load_file,
    load_policy_state_dict,
    load_policy_weights,
)
from models.converters import GRMG_MAY_LACK, GRMG_ONLY_MODULES, grmg_config_values
from models.encoders import CLIPTextEncoder, FrozenEncoders, MAEEncoder
from models.gr1 import GR1
from training.state import find_training_state

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "grmg")
SMALL_CKPT = os.path.join(FIXTURES, "grmg_small.ckpt")
DEMO = os.path.join(ROOT, "configs", "demo.json")


def _layouts() -> dict:
    with open(os.path.join(FIXTURES, "grmg_layouts.json")) as f:
        return json.load(f)


def _small_io() -> dict:
    return torch.load(os.path.join(FIXTURES, "grmg_small_io.pt"), map_location="cpu", weights_only=True)


def small_config(**changes) -> Config:
    """This project's config for the small GR-MG: its architecture values, GR-MG's hard-coded 224 px / 16 px patches,
    and small frozen encoders (not used: the fixture gives MAE features)."""
    values = {**grmg_config_values(_small_io()["config"]["policy"]), "rgb_shape": 224, "patch_size": 16,
              "chunk_size": 2, "skip_frame": 1, "n_positions": 64, "mae_ckpt": "", "clip_ckpt": "", "mae_depth": 1,
              "mae_num_heads": 2, "clip_text_width": 16, "clip_text_layers": 1, "clip_text_heads": 2,
              "exact_attention": True}
    return from_dict({**values, **changes})


def _notes(report, prefix: str) -> set[str]:
    """Module names listed by the load-report note that starts with `prefix`."""
    (note,) = [n for n in report.notes if n.startswith(prefix)]
    return set(note[len(prefix):].split(", "))


@pytest.fixture(scope="module")
def converted():
    cfg = small_config()
    gr1 = build_gr1(cfg)
    report = load_policy_weights(gr1, None, SMALL_CKPT, cfg)
    return cfg, gr1.eval(), report


def test_small_checkpoint_loads_shared_modules_exactly(converted):
    cfg, gr1, report = converted
    assert report.format == "gr-mg"
    file_sd = {k[len("model."):]: v for k, v in load_file(SMALL_CKPT)["state_dict"].items()}
    ours, fresh = gr1.state_dict(), build_gr1(cfg).state_dict()
    shared = set(file_sd) - {"embed_goal_image.weight", "embed_goal_image.bias", "embed_goal_patch.weight",
                             "embed_goal_patch.bias"}
    for k in shared:
        assert torch.equal(ours[k], file_sd[k]), k
    assert torch.count_nonzero(ours["transformer.wpe.weight"]) == 0
    assert _notes(report, "dropped GR-MG-only modules: ") == {"embed_goal_image", "embed_goal_patch"}
    kept = _notes(report, "not in the file, initialised as usual: ")
    assert kept == set(GRMG_MAY_LACK)
    for k in set(ours) - shared - {"transformer.wpe.weight"}:  # the usual (seeded) initialisation
        assert any(k.startswith(m + ".") for m in kept), k
        assert torch.equal(ours[k], fresh[k]), k


def test_shared_modules_reproduce_grmg_outputs(converted):
    cfg, gr1, _ = converted
    fx = _small_io()
    inp, ref = fx["inputs"], fx["outputs"]
    B, T = inp["cls"].shape[:2]
    L, Q = gr1.layout, gr1.layout.n_latents
    with torch.no_grad():
        latents = gr1.perceiver_resampler(inp["patches"].flatten(0, 1)).unflatten(0, (B, T))  # (B, T, Q, F)
        frames = gr1.frame_tokens(inp["cls"].flatten(0, 1), inp["patches"].flatten(0, 1), "static")
        frames = frames.unflatten(0, (B, T))  # (B, T, Q+1, D)
        no_state = torch.zeros(B, T, 6), torch.zeros(B, T, 2)  # state tokens are not part of GR-MG's sequence
        obs = gr1.observation_tokens(inp["lang"], *no_state, {"static": frames, "gripper": frames})
        queries = gr1.obs_queries.weight.expand(B, T, -1, -1)
        steps = torch.cat((obs[:, :, :1], obs[:, :, L.camera("static")], queries), dim=2)  # GR-MG's block
        tokens = torch.cat((ref["tokens_before_ln"][:, :Q + 1], steps.flatten(1, 2)), dim=1)
        mask = inp["attention_mask"]
        visible = torch.cat((mask[:, :, None].expand(B, T, Q + 2), torch.zeros(B, T, Q + 1, dtype=mask.dtype)), 2)
        visible = torch.cat((torch.ones(B, Q + 1, dtype=mask.dtype), visible.flatten(1)), dim=1)
        hidden = gr1.transformer(inputs_embeds=gr1.embed_ln(tokens), attention_mask=visible).last_hidden_state
        query_out = hidden[:, Q + 1:].unflatten(1, (T, -1))[:, :, -(Q + 1):]  # (B, T, Q+1, D)
        patches = gr1.decode_frames(query_out)  # (B, T, P, C)
    torch.testing.assert_close(latents, ref["resampler_latents"], rtol=0, atol=1e-6)
    torch.testing.assert_close(tokens, ref["tokens_before_ln"], rtol=0, atol=1e-6)
    torch.testing.assert_close(hidden, ref["gpt2_hidden"], rtol=0, atol=1e-5)  # eager vs fused attention
    torch.testing.assert_close(patches[:, :, :2], ref["obs_preds_first_patches"], rtol=0, atol=1e-5)
    torch.testing.assert_close(patches.double().sum(-1), ref["obs_preds_patch_sums_float64"], rtol=0, atol=1e-4)


def test_gripper_camera_from_static(converted):
    cfg, _, _ = converted
    gr1 = build_gr1(cfg.replace(grmg_init_gripper_from_static=True))
    report = load_policy_weights(gr1, None, SMALL_CKPT, cfg.replace(grmg_init_gripper_from_static=True))
    for hand, static in (("embed_hand_img", "embed_img"), ("embed_hand_patch", "embed_patch"),
                         ("obs_hand_queries", "obs_queries")):
        for part in ("weight", "bias"):
            if hasattr(getattr(gr1, hand), part):
                assert torch.equal(getattr(getattr(gr1, hand), part), getattr(getattr(gr1, static), part))
    assert _notes(report, "gripper camera initialised from the static camera: ") == {
        "embed_hand_img <- embed_img", "embed_hand_patch <- embed_patch", "obs_hand_queries <- obs_queries"}
    assert not {"embed_hand_img", "embed_hand_patch", "obs_hand_queries"} & _notes(
        report, "not in the file, initialised as usual: ")


@pytest.mark.parametrize("layout_name", ["pretrain", "train"])
def test_every_full_size_grmg_key_is_loaded_or_listed_as_dropped(layout_name):
    """GR-MG's released pretrained.pt layout (pretrain.json) and its CALVIN policy layout (train.json), with the frozen
    MAE and CLIP inside, at full size on the meta device."""
    layout = _layouts()[layout_name]
    cfg = Config()  # configs.json: GR1-Training's sizes = GR-MG's
    assert {k: v for k, v in grmg_config_values(layout["policy"]).items() if getattr(cfg, k) != v} == {}
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gr1, encoders = GR1(ModelConfig.from_config(cfg)), FrozenEncoders(MAEEncoder(), CLIPTextEncoder())
    dtypes = {"float32": torch.float32, "float16": torch.float16}
    own = gr1.state_dict()  # decoder_pos_embed is a real tensor even here: match each tensor's device
    sd = {k: torch.empty(shape, dtype=dtypes[dtype], device=own[k[6:]].device if k[6:] in own else "meta")
          for k, (shape, dtype) in layout["keys"].items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # copying the converter's zero wpe into a meta parameter is a no-op
        report = load_policy_state_dict(gr1, encoders, sd, cfg, layout_name)
    assert report.format == "gr-mg"
    assert "MAE weights taken from this file" in report.notes and "CLIP weights taken from this file" in report.notes
    dropped = _notes(report, "dropped GR-MG-only modules: ")
    targets = {"policy": gr1.state_dict(), "model_mae.": encoders.mae.state_dict(),
               "text_encoder.": encoders.clip_text.state_dict()}
    fate = {}
    for key, (shape, _) in layout["keys"].items():
        key = key[len("model."):]
        prefix = next((p for p in ("model_mae.", "text_encoder.") if key.startswith(p)), None)
        own, name = (targets[prefix], key[len(prefix):]) if prefix else (targets["policy"], key)
        if name in own and list(own[name].shape) == shape and key.split(".")[0] not in dropped:
            fate[key] = "loaded"
        elif key.split(".")[0] in dropped:
            fate[key] = "dropped"
        elif prefix == "text_encoder." and name.startswith(("visual.", "logit_scale")):
            fate[key] = "unused CLIP"
    assert set(fate) == {k[len("model."):] for k in layout["keys"]}, "keys neither loaded nor listed as dropped"
    n_unused = sum(f == "unused CLIP" for f in fate.values())
    assert f"dropped {n_unused} CLIP keys GR-1 does not use (image tower, logit_scale)" in report.notes
    has_actions = layout["training_targets"]["act_pred"]
    assert dropped == (set(GRMG_ONLY_MODULES) if has_actions else {"embed_goal_image", "embed_goal_patch"})
    kept = _notes(report, "not in the file, initialised as usual: ")
    lacks = set(GRMG_MAY_LACK) if not has_actions else {"action_chunk_queries", "pred_act_mlps", "pred_arm_act",
                                                        "pred_gripper_act", "transformer.wte"}
    assert kept == lacks


def test_mismatches_list_missing_unexpected_and_misshaped_keys():
    cfg = small_config()
    sd = load_file(SMALL_CKPT)["state_dict"]
    del sd["model.embed_ln.bias"]
    sd["model.embed_goal_depth.weight"] = torch.zeros(16, 8)
    sd["model.embed_timestep.weight"] = torch.zeros(4, 16)
    with pytest.raises(CheckpointError) as err:
        load_policy_state_dict(build_gr1(cfg), None, sd, cfg, "odd.ckpt")
    msg = str(err.value)
    assert "odd.ckpt" in msg and "missing (1): embed_ln.bias" in msg and "unexpected (1): embed_goal_depth.weight" \
        in msg and "embed_timestep.weight: file (4, 16) vs model (3, 16)" in msg


def test_checkpoint_hyper_parameters_must_agree_with_the_config():
    """Heads and activation do not show in the weights' shapes: the Lightning file's saved config is checked."""
    cfg = small_config(n_head=2)
    with pytest.raises(CheckpointError, match=r"n_head=4 \(config: 2\)"):
        load_policy_weights(build_gr1(cfg), None, SMALL_CKPT, cfg)


def test_a_file_of_neither_format_is_a_clear_error(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(4)}}, path)
    cfg = small_config()
    with pytest.raises(CheckpointError, match="is neither a GR-1 checkpoint .* nor GR-MG's.*conv1.weight, fc.bias"):
        load_policy_weights(build_gr1(cfg), None, str(path), cfg)


# ---------------------------------------------------------------- fine-tuning the demo config from a GR-MG file

def grmg_layout_state_dict(cfg: Config, seed: int) -> dict[str, torch.Tensor]:
    """Random weights in the layout of GR-MG's pretrained.pt for `cfg`'s sizes (made without GR-MG's code: checked
    against the layout GR-MG's code gives, below): GR-1's shared modules, goal-image embeddings, the frozen MAE and
    CLIP (with its image tower), all under Lightning's 'model.' prefix; no state, gripper-camera or action modules,
    no GPT-2 wte / wpe."""
    g = torch.Generator().manual_seed(seed)
    policy = {k: v for k, v in build_gr1(cfg).state_dict().items()
              if not any(k == m or k.startswith(m + ".") for m in (*GRMG_MAY_LACK, "transformer.wpe"))}
    for goal, like in (("embed_goal_image", "embed_img"), ("embed_goal_patch", "embed_patch")):
        policy.update({goal + k[len(like):]: v for k, v in policy.items() if k.startswith(like + ".")})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoders = build_encoders(cfg)
    sd = {f"model.{k}": torch.randn(v.shape, generator=g) for k, v in policy.items()}
    sd.update({f"model.model_mae.{k}": torch.randn(v.shape, generator=g) for k, v in encoders.mae.state_dict().items()})
    sd.update({f"model.text_encoder.{k}": torch.randn(v.shape, generator=g).half()
               for k, v in encoders.clip_text.state_dict().items()})
    sd["model.text_encoder.visual.proj"] = torch.zeros(2, 2).half()
    return sd


def test_layout_helper_matches_grmg_code():
    small = {k for k in _layouts()["small"]["keys"]}
    ours = {k for k in grmg_layout_state_dict(small_config(), 0) if not k.startswith(("model.model_mae.",
                                                                                        "model.text_encoder."))}
    assert ours == small


def test_demo_config_fine_tunes_from_a_grmg_checkpoint(mini_lmdb, tmp_path):  # noqa: F811
    with open(DEMO) as f:
        demo = from_dict(json.load(f))
    sd = grmg_layout_state_dict(demo, seed=1)
    ckpt = tmp_path / "pretrained.pt"
    torch.save({"state_dict": sd, "hyper_parameters": {"configs": {"policy": {
        "embed_dim": demo.embed_dim, "n_layer": demo.n_layer, "n_head": demo.n_head, "seq_len": demo.seq_len}}}}, ckpt)
    save = tmp_path / "run"
    cmd = [sys.executable, "Main.py", "--config", DEMO, f"LMDB_path={mini_lmdb}", f"save_path={save}",
           "load_grmg_ckpt=true", f"grmg_ckpt_path={ckpt}", "grmg_init_gripper_from_static=true",
           "max_train_steps=2", "bs_per_gpu=4", "workers_per_gpu=0", "print_steps=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"loaded gr-mg weights from {ckpt}" in proc.stdout
    assert "MAE weights taken from this file" in proc.stdout and "gripper camera initialised" in proc.stdout
    with open(save / "metrics.jsonl") as f:
        assert [json.loads(line)["update"] for line in f][-1] == 2
    trained = load_file(os.path.join(find_training_state(str(save)), "model.pt"))
    # Two Adam steps move each weight by at most ~lr per step: the run started from the file's weights
    for k in ("perceiver_resampler.latents", "transformer.h.0.attn.c_attn.weight", "decoder_pred.weight"):
        step = (trained[k] - sd[f"model.{k}"]).abs().max().item()
        assert 0 < step <= 3 * demo.lr_max, k
    assert (trained["embed_hand_img.weight"] - sd["model.embed_img.weight"]).abs().max() <= 3 * demo.lr_max

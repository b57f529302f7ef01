"""Checkpoint compatibility: full-size key layouts of GR1-Training and Bytedance GR-1 load strictly through the
converters; wrong files give errors that name the keys; our checkpoints round-trip; chunk-size adaptation is exact."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from config import Config, ModelConfig
from conftest import shared_path
from helpers import tiny_config, tiny_inputs
from models.build import (
    CheckpointError,
    build_encoders,
    build_gr1,
    load_policy_state_dict,
    load_policy_weights,
    save_checkpoint,
)
from models.encoders import CLIPTextEncoder, FrozenEncoders, MAEEncoder
from models.gr1 import GR1

FULL = Config()  # configs.json sizes = the reference's


def _keys_json(name: str) -> dict:
    return json.load(open(shared_path("fixtures", name)))


def _layout(groups: dict) -> dict[str, list]:
    return {k: v for group in groups.values() for k, v in group["keys"].items()}


def _meta_state_dict(layout: dict[str, list], gr1: GR1) -> dict[str, torch.Tensor]:
    """Tensors of the layout's shapes, on the meta device where the model's own tensor is (no memory used)."""
    dtypes = {"float32": torch.float32, "uint8": torch.uint8, "float16": torch.float16}
    own = gr1.state_dict()
    return {k: torch.zeros(shape, dtype=dtypes[dtype], device=own[k].device if k in own else "meta")
            for k, (shape, dtype, _) in layout.items()}


@pytest.fixture(scope="module")
def full_size_on_meta():
    """Full-size GR1 and encoders without allocating weights (shapes only)."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gr1 = GR1(ModelConfig.from_config(FULL))
        encoders = FrozenEncoders(MAEEncoder(), CLIPTextEncoder())
    return gr1, encoders


def test_full_size_layout_equals_gr1_training(full_size_on_meta):
    gr1, encoders = full_size_on_meta
    ref = _keys_json("gr1_training_state_dict_keys.json")
    layout = _layout(ref["chunk_size_10"]["groups"])
    policy = {k: v for k, v in layout.items() if not k.startswith(("model_mae.", "model_clip."))}
    assert {k: list(v.shape) for k, v in gr1.state_dict().items()} == {k: v[0] for k, v in policy.items()}
    assert len(policy) == ref["excluded_prefixes_when_saving"]["saved_n_keys_chunk10"] == 248
    trainable = {k for k, p in gr1.named_parameters() if p.requires_grad}
    assert trainable == {k for k, v in policy.items() if v[2] == "param,trainable"} - {"transformer.wte.weight"}
    mae = {k[len("model_mae."):]: v[0] for k, v in layout.items() if k.startswith("model_mae.")}
    assert {k: list(v.shape) for k, v in encoders.mae.state_dict().items()} == mae
    clip = {k[len("model_clip."):]: v[0] for k, v in layout.items() if k.startswith("model_clip.")}
    ours = {k: list(v.shape) for k, v in encoders.clip_text.state_dict().items()}
    assert all(clip[k] == shape for k, shape in ours.items())
    assert all(k.startswith("visual.") or k == "logit_scale" for k in set(clip) - set(ours))
    n_params = sum(p.numel() for p in gr1.parameters() if p.requires_grad)
    assert n_params == 46_385_095 - 384  # reference trainable count minus the unused (here frozen) wte


@pytest.mark.parametrize("variant", ["chunk_size_10", "chunk_size_1", "chunk_size_10+tf4.11", "bytedance"])
def test_full_size_checkpoints_load_strictly(full_size_on_meta, variant):
    gr1, encoders = full_size_on_meta
    if variant == "bytedance":
        layout = _layout(_keys_json("bytedance_gr1_state_dict_keys.json")["bytedance"]["groups"])
    else:
        ref = _keys_json("gr1_training_state_dict_keys.json")
        layout = _layout(ref[variant.split("+")[0]]["groups"])
        if variant.endswith("tf4.11"):
            for i in range(FULL.n_layer):
                layout[f"transformer.h.{i}.attn.bias"] = [[1, 1, 1024, 1024], "uint8", "buffer"]
                layout[f"transformer.h.{i}.attn.masked_bias"] = [[], "float32", "buffer"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # copying the converters' real tensors into meta parameters is a no-op
        report = load_policy_state_dict(gr1, encoders, _meta_state_dict(layout, gr1), FULL, variant)
    assert report.format == ("bytedance" if variant == "bytedance" else "gr1-training")
    assert "MAE weights taken from this file" in report.notes and "CLIP weights taken from this file" in report.notes
    if variant.endswith("tf4.11") or variant == "bytedance":
        assert any("attn.bias" in note for note in report.notes)
    if variant == "chunk_size_1":
        assert any("chunk size 1 to 10" in note for note in report.notes)


def test_wrong_file_names_missing_and_unexpected_keys(full_size_on_meta):
    gr1, _ = full_size_on_meta
    sd = {k: torch.empty_like(v) for k, v in gr1.state_dict().items()}
    del sd["embed_lang.weight"]
    sd["embed_language.weight"] = torch.empty(384, 512, device="meta")
    sd["pred_arm_act.weight"] = torch.empty(7, 192, device="meta")
    with pytest.raises(CheckpointError) as err:
        load_policy_state_dict(gr1, None, sd, FULL, "bad.pth")
    msg = str(err.value)
    assert "bad.pth" in msg and "missing (1): embed_lang.weight" in msg and "unexpected (1): embed_language.weight" \
        in msg and "pred_arm_act.weight: file (7, 192) vs model (6, 192)" in msg


def test_own_checkpoint_round_trip_is_exact(tmp_path):
    cfg = tiny_config()
    gr1 = build_gr1(cfg).eval()
    with torch.no_grad():
        for p in gr1.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path / "GR1_1.pth"
    save_checkpoint(gr1, str(path), cfg, epoch=1)
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"state_dict", "config", "format", "epoch"}
    assert not any(k.startswith(("model_mae", "model_clip")) for k in payload["state_dict"])
    other = build_gr1(cfg.replace(seed=1)).eval()
    load_policy_weights(other, None, str(path), cfg)
    for (k, a), b in zip(gr1.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    assert not list(tmp_path.glob("*.tmp*")), "temporary file left behind"


def test_chunk_adaptation():
    """chunk 1 -> K repeats the single query row, K -> 1 keeps row 0. Predictions stay identical for the first
    chunk position of the first timestep only: the tokens per timestep change with K, so later tokens move to other
    position ids (the adapted weights are a starting point for fine-tuning, not the same policy)."""
    one, four = tiny_config(chunk_size=1, test_chunk_size=1), tiny_config(chunk_size=4)
    src1 = build_gr1(one).eval()
    with torch.no_grad():
        src1.action_chunk_queries.weight.normal_()
    dst4 = build_gr1(four).eval()
    report = load_policy_state_dict(dst4, None, src1.state_dict(), four)
    assert any("chunk size 1 to 4" in n for n in report.notes)
    assert torch.equal(dst4.action_chunk_queries.weight, src1.action_chunk_queries.weight.expand(4, -1))
    src4 = build_gr1(four.replace(seed=3)).eval()
    with torch.no_grad():
        src4.action_chunk_queries.weight.normal_()
    dst1 = build_gr1(one).eval()
    load_policy_state_dict(dst1, None, src4.state_dict(), one)
    assert torch.equal(dst1.action_chunk_queries.weight, src4.action_chunk_queries.weight[:1])
    inputs = tiny_inputs(one)
    with torch.no_grad():
        a1, a4 = src1(*inputs)["arm_action"], dst4(*inputs)["arm_action"]
        b4, b1 = src4(*inputs)["arm_action"], dst1(*inputs)["arm_action"]
    torch.testing.assert_close(a4[:, 0, 0], a1[:, 0, 0], rtol=0, atol=2e-6)
    torch.testing.assert_close(b1[:, 0, 0], b4[:, 0, 0], rtol=0, atol=2e-6)
    with pytest.raises(CheckpointError, match="only 1 <-> K"):
        load_policy_state_dict(build_gr1(tiny_config(chunk_size=3)), None, src4.state_dict(), tiny_config(chunk_size=3))


def test_encoder_weight_files_load_strictly(tmp_path):
    """MAE (['model'], with MAE-pretraining decoder keys dropped) and CLIP (full CLIP state dict) files."""
    cfg = tiny_config()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = build_encoders(cfg)
    with torch.no_grad():  # unlike the seeded random init, so that only loading can give these weights
        for t in source.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.rand_like(t))
    mae_sd = {**source.mae.state_dict(), "mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.zeros(2)}
    torch.save({"model": mae_sd}, tmp_path / "mae.pth")
    clip_sd = {**source.clip_text.state_dict(), "visual.proj": torch.zeros(3), "logit_scale": torch.zeros(())}
    torch.save(clip_sd, tmp_path / "clip.pt")
    encoders = build_encoders(cfg.replace(mae_ckpt=str(tmp_path / "mae.pth"), clip_ckpt=str(tmp_path / "clip.pt")))
    for a, b in zip(source.state_dict().values(), encoders.state_dict().values()):
        assert torch.equal(a, b)
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 32)}}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="MAE image encoder"):
        build_encoders(cfg.replace(mae_ckpt=str(tmp_path / "bad.pth")))
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_encoders(cfg.replace(mae_ckpt=str(tmp_path / "nowhere.pth")))


def test_random_encoders_are_the_same_in_every_run():
    """Without MAE/CLIP weights a policy is trained and evaluated on random encoders: training (global RNG seeded
    with its seed) and evaluate_calvin.py (another RNG state) must build the very same ones."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        a = build_encoders(tiny_config())
        torch.manual_seed(123)
        b = build_encoders(tiny_config(seed=7))
    after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(1)), "building the encoders must leave the global RNG alone"
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k

"""Build this project's GR-1 from the reference parity fixtures (../shared/fixtures/parity_*.{json,pt}).

The fixtures were produced by running GR1-Training (and Bytedance GR-1) with random weights; the .json records the
hyper-parameters, the .pt the full state dict, inputs, outputs, losses and gradients. Regenerating them needs the
reference code (see ../shared/reference/GR1_REFERENCE.md §5); they are read in place, never copied.
"""
from __future__ import annotations

import json
import os
import warnings

import torch

from config import Config, from_dict
from conftest import shared_path
from models.build import build_encoders, build_gr1, load_policy_weights

REFERENCE_OUTPUT_NAMES = {  # reference output key -> this project's
    "arm_action_preds": "arm_action", "gripper_action_preds": "gripper_action",
    "obs_preds": "rgb_static_pred", "obs_hand_preds": "rgb_gripper_pred"}


def fixture_config(meta: dict, **extra) -> Config:
    """Config equal to the fixture's reference constructor arguments."""
    hp, mae, clip = meta["gr1_hparams"], meta["mae"], meta["clip"]
    return from_dict({
        "embed_dim": hp["embed_dim"], "n_layer": hp["n_layer"], "n_head": hp["n_head"],
        "activation_function": hp["activation_function"], "dropout": hp["dropout"],
        "n_positions": hp["n_positions"], "resampler_depth": hp["resampler_depth"],
        "resampler_dim_head": hp["resampler_dim_head"], "resampler_heads": hp["resampler_heads"],
        "resampler_num_latents": hp["resampler_num_latents"], "seq_len": hp["seq_len"],
        "chunk_size": hp.get("chunk_size", 1), "test_chunk_size": 1, "skip_frame": hp.get("skip_frame", 0),
        "rgb_shape": mae["img_size"][0], "patch_size": mae["patch_size"],
        "without_norm_pixel_loss": hp.get("without_norm_pixel_loss", hp.get("without_norm_pix_loss")),
        "img_feat_dim": hp["img_feat_dim"], "patch_feat_dim": hp["patch_feat_dim"],
        "lang_feat_dim": hp["lang_feat_dim"], "mae_depth": mae["depth"], "mae_num_heads": mae["num_heads"],
        "clip_text_width": clip["transformer_width"], "clip_text_layers": clip["transformer_layers"],
        "clip_text_heads": clip["transformer_heads"], "mae_ckpt": "", "clip_ckpt": "", "clip_precision": "fp32",
        "arm_loss_ratio": hp.get("arm_loss_ratio", 100), **extra}, source=meta.get("file", "fixture"))


def load_fixture(name: str, tmp_dir: str, device: torch.device | str = "cpu", **extra):
    """(cfg, encoders, gr1, fixture dict, load report) with the fixture's weights loaded through the converters, the
    model on `device` (the fixture dict stays on the CPU)."""
    meta = json.load(open(shared_path("fixtures", f"{name}.json")))
    fx = torch.load(shared_path("fixtures", f"{name}.pt"), map_location="cpu", weights_only=True)
    cfg = fixture_config(meta, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random-encoder warnings: the fixture file brings the encoder weights
        encoders = build_encoders(cfg)
    gr1 = build_gr1(cfg)
    path = os.path.join(tmp_dir, f"{name}_state_dict.pth")
    torch.save({"state_dict": fx["state_dict"]}, path)
    report = load_policy_weights(gr1, encoders, path, cfg)
    gr1.eval()
    return cfg, encoders.to(device), gr1.to(device), fx, report


def fixture_inputs(fx: dict, device: torch.device | str = "cpu") -> dict:
    """The fixture's model inputs as this project names them, on `device`."""
    inp = fx["inputs"]
    return to_device({"images": {"static": inp["rgb"].float(), "gripper": inp["hand_rgb"].float()},
                      "arm_state": inp["state"]["arm"].float(), "gripper_state": inp["state"]["gripper"].float(),
                      "tokens": inp["language"], "attention_mask": inp["attention_mask"]}, device)


def to_device(tree, device: torch.device | str):
    """Every tensor of nested dicts on `device`."""
    if isinstance(tree, dict):
        return {k: to_device(v, device) for k, v in tree.items()}
    return tree.to(device) if isinstance(tree, torch.Tensor) else tree


def run_model(encoders, gr1, inputs: dict, keep=None, frame_mask=None) -> dict:
    features = encoders.encode_frames(inputs["images"], frame_mask)
    lang = encoders.encode_text(inputs["tokens"])
    return gr1(lang, inputs["arm_state"], inputs["gripper_state"], features, inputs["attention_mask"], keep)

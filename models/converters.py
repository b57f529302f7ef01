"""Explicit converters from every supported GR-1 checkpoint layout to this project's modules (models/build.py loads
their output with strict=True).

Checkpoint formats read (detected from the keys, each converted explicitly, then loaded with strict=True):

- this project's and GR1-Training's ``GR1_<epoch>.pth``: ``{'state_dict': ...}`` without model_mae / model_clip keys.
  Files saved by transformers 4.11 carry 24 extra GPT-2 buffers (``attn.bias``, ``attn.masked_bias``), dropped
  after a shape check. ``action_chunk_queries`` is adapted between chunk sizes (chunk 1 -> K repeats the single
  row, K -> 1 keeps row 0). This is a starting point for fine-tuning, not the same policy: the number of tokens per
  timestep changes with K, so later tokens get other GPT-2 position embeddings.
- Bytedance GR-1's ``snapshot_ABC.pt``: no position embedding (``transformer.wpe`` set to ZERO, which is what
  Bytedance's GPT computes; GR1-Training leaves it random) and no chunk queries (set to zero: chunk size 1).
- A full reference model state dict (with model_mae.* / model_clip.*): the encoder weights go to the frozen encoders.
- GR-MG's Ego4D-pretrained GR-1 (``pretrained.pt``) and its other policy checkpoints (Lightning files, keys under
  ``model.``): see :func:`convert_grmg_state_dict`.

Prefixes added by DDP (``module.``) or torch.compile (``_orig_mod.``) are stripped.
"""
from __future__ import annotations

import torch

from config import Config
from models.files import CheckpointError

_GPT2_OLD_BUFFERS = (".attn.bias", ".attn.masked_bias")  # persistent in transformers <= 4.11, unused here
_MAE_PRETRAIN_EXTRA = ("mask_token", "decoder_")  # MAE pretraining decoder keys, if a full MAE checkpoint is given
_CLIP_UNUSED = ("visual.", "logit_scale", "input_resolution", "context_length", "vocab_size")


# ---------------------------------------------------------------- converters

def split_encoder_keys(sd: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """A reference GR1 state dict -> (policy keys, model_mae.* keys, model_clip.* keys) with prefixes removed."""
    policy, mae, clip = {}, {}, {}
    for k, v in sd.items():
        if k.startswith("model_mae."):
            mae[k[len("model_mae."):]] = v
        elif k.startswith("model_clip."):
            clip[k[len("model_clip."):]] = v
        else:
            policy[k] = v
    return policy, mae, clip


def detect_format(sd: dict[str, torch.Tensor]) -> str:
    """'bytedance' (no wpe, no chunk queries) or 'gr1-training' (this project's format too)."""
    if "transformer.wpe.weight" not in sd and "action_chunk_queries.weight" not in sd:
        return "bytedance"
    return "gr1-training"


def _drop_old_gpt2_buffers(sd: dict[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
    dropped = [k for k in sd if k.startswith("transformer.h.") and k.endswith(_GPT2_OLD_BUFFERS)]
    for k in dropped:
        if k.endswith(".attn.bias") and sd[k].dim() != 4:
            raise CheckpointError(f"unexpected shape {tuple(sd[k].shape)} for GPT-2 causal buffer {k}")
    if dropped:
        notes.append(f"dropped {len(dropped)} transformers<=4.11 GPT-2 buffers (attn.bias / attn.masked_bias)")
    return {k: v for k, v in sd.items() if k not in dropped}


def _adapt_chunk_queries(sd: dict[str, torch.Tensor], chunk_size: int, notes: list[str]) -> None:
    key = "action_chunk_queries.weight"
    rows = sd[key].shape[0]
    if rows == chunk_size:
        return
    if rows == 1:
        sd[key] = sd[key].expand(chunk_size, -1).clone()
    elif chunk_size == 1:
        sd[key] = sd[key][:1].clone()
    else:
        raise CheckpointError(f"cannot adapt action_chunk_queries from chunk size {rows} to {chunk_size} "
                              f"(only 1 <-> K is exact); set chunk_size={rows}")
    notes.append(f"action_chunk_queries adapted from chunk size {rows} to {chunk_size} (position ids shift: "
                 "fine-tune before comparing results)")


def convert_policy_state_dict(sd: dict[str, torch.Tensor], cfg: Config, notes: list[str]) -> tuple[dict, str]:
    """Any supported GR-1 checkpoint's policy keys -> this project's GR1 state dict (model_* keys removed)."""
    fmt = detect_format(sd)
    sd = _drop_old_gpt2_buffers(sd, notes)
    if fmt == "bytedance":
        # Bytedance's GPT has no position embedding; zero reproduces it exactly (GR1-Training leaves wpe random).
        sd["transformer.wpe.weight"] = torch.zeros(cfg.n_positions, cfg.embed_dim)
        sd["action_chunk_queries.weight"] = torch.zeros(cfg.chunk_size, cfg.embed_dim)
        notes.append("Bytedance snapshot: transformer.wpe and action_chunk_queries set to zero")
    else:
        _adapt_chunk_queries(sd, cfg.chunk_size, notes)
    return sd, fmt


def convert_mae_state_dict(sd: dict[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
    """MAE checkpoint ['model'] -> MAEEncoder keys: drops the MAE pretraining decoder if present."""
    extra = [k for k in sd if k.startswith(_MAE_PRETRAIN_EXTRA)]
    if extra:
        notes.append(f"dropped {len(extra)} MAE pretraining-decoder keys")
    return {k: v for k, v in sd.items() if k not in extra}


def convert_clip_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI CLIP state dict -> CLIPTextEncoder keys (the visual tower and logit scale are not used by GR-1)."""
    return {k: v for k, v in sd.items() if not k.startswith(_CLIP_UNUSED)}


# ---------------------------------------------------------------- GR-MG (bytedance/GR-MG's Ego4D-pretrained GR-1)
# GR-MG's GR_MG is GR-1 plus a goal image, trained by Lightning (state_dict keys under 'model.'); its pretrained.pt
# was trained with video prediction only (no state, no gripper camera, no action head). Token layout differences
# (documented in the README): GR-MG puts the goal image's Q+1 tokens before the T timestep blocks and has no
# position embedding; a pretraining block is [lang, static Q+1, static observation queries Q+1].

GRMG_FORMAT = "gr-mg"
_GRMG_PREFIX = "model."  # GR-MG's LightningModule holds the network as .model
_GRMG_MARKERS = ("embed_goal_image.weight", "embed_goal_patch.weight")  # every GR_MG has goal-image embeddings
_GRMG_ENCODERS = {"model_mae.": "model_mae.", "text_encoder.": "model_clip."}  # its frozen MAE / CLIP -> ours
# GR-MG modules GR-1 does not have, dropped by name: goal-image embeddings, the CVAE action encoder, the transformer
# action decoder (its pred_*_act layers read that decoder, not GR-1's MLP) and the progress head.
GRMG_ONLY_MODULES = (
    "embed_goal_image", "embed_goal_patch",
    "embed_arm_action", "embed_gripper_action", "embed_action", "action_encoder_cls_token", "encode_action",
    "action_encoder_positional_embeddings", "pred_style_vector", "embed_style_vector",
    "proj_action_output_embed", "decode_action", "action_mask_token_embedding", "action_decoder_positional_embeddings",
    "pred_arm_act", "pred_gripper_act",
    "progress_queries", "proj_progress_output_embed", "decode_progress", "progress_mask_token_embedding",
    "pred_progress")
# GR-1 modules a GR-MG file may lack (pretrained.pt lacks them all); they keep the model's own initialisation.
GRMG_MAY_LACK = ("embed_arm_state", "embed_gripper_state", "embed_state", "embed_hand_img", "embed_hand_patch",
                 "obs_hand_queries", "action_queries", "action_chunk_queries", "pred_act_mlps", "pred_arm_act",
                 "pred_gripper_act", "transformer.wte")
_GRIPPER_FROM_STATIC = {"embed_hand_img": "embed_img", "embed_hand_patch": "embed_patch",
                        "obs_hand_queries": "obs_queries"}  # grmg_init_gripper_from_static: gripper <- static
_SHARED_MARKERS = ("embed_lang.weight", "perceiver_resampler.latents", "transformer.ln_f.weight")  # in every format
# Architecture keys of GR-MG's config['policy'] with the same name here, and its resampler_params' names here
_GRMG_POLICY_KEYS = ("embed_dim", "n_layer", "n_head", "activation_function", "seq_len", "img_feat_dim",
                     "patch_feat_dim", "lang_feat_dim")
_GRMG_RESAMPLER_KEYS = {"depth": "resampler_depth", "dim_head": "resampler_dim_head", "heads": "resampler_heads",
                        "num_latents": "resampler_num_latents", "num_media_embeds": "resampler_num_media_embeds"}


def _unprefixed(key: str) -> str:
    return key[len(_GRMG_PREFIX):] if key.startswith(_GRMG_PREFIX) else key


def _module_of(key: str, modules: tuple[str, ...]) -> str | None:
    """The entry of `modules` that `key` belongs to ('embed_state' owns 'embed_state.weight'), if any."""
    return next((m for m in modules if key == m or key.startswith(m + ".")), None)


def is_grmg_state_dict(sd: dict[str, torch.Tensor]) -> bool:
    return any(_unprefixed(k) in _GRMG_MARKERS for k in sd)


def check_known_layout(sd: dict[str, torch.Tensor], source: str) -> None:
    """A one-line error for a file that is no GR-1 checkpoint of any supported format (rather than a list of
    hundreds of missing keys)."""
    if not any(_unprefixed(k) in _SHARED_MARKERS for k in sd):
        first = ", ".join(list(sd)[:5]) or "none"
        raise CheckpointError(f"{source} is neither a GR-1 checkpoint (this project's, GR1-Training's, Bytedance's "
                              f"snapshot) nor GR-MG's: it has none of the keys they all share "
                              f"({', '.join(_SHARED_MARKERS)}); its first keys are: {first}")


def grmg_config_values(policy: dict) -> dict:
    """GR-MG's config['policy'] (its JSON config, saved as hyper-parameters in its checkpoints) -> this project's
    architecture keys with their values."""
    values = {k: policy[k] for k in _GRMG_POLICY_KEYS if k in policy}
    resampler = policy.get("resampler_params", {})
    values.update({ours: resampler[theirs] for theirs, ours in _GRMG_RESAMPLER_KEYS.items() if theirs in resampler})
    return values


def check_grmg_hyper_parameters(raw: dict, cfg: Config, path: str) -> None:
    """A GR-MG Lightning checkpoint saves its config; architecture values the weights' shapes cannot reveal (heads,
    activation) must agree with the config, like every other architecture value."""
    hparams = raw.get("hyper_parameters") if isinstance(raw, dict) else None
    configs = hparams.get("configs") if isinstance(hparams, dict) else None  # GR-MG's Policy_Trainer(configs)
    policy = configs.get("policy") if isinstance(configs, dict) else None
    if not isinstance(policy, dict):
        return
    wrong = [f"{k}={v!r} (config: {getattr(cfg, k)!r})" for k, v in grmg_config_values(policy).items()
             if v != getattr(cfg, k)]
    if wrong:
        raise CheckpointError(f"{path} was trained with other architecture settings: {', '.join(wrong)}; set these "
                              "config keys to the checkpoint's values")


def convert_grmg_state_dict(sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor], cfg: Config,
                            notes: list[str]) -> tuple[dict, dict, dict]:
    """A GR-MG checkpoint's state dict -> (GR1 policy keys, MAE keys, CLIP keys), loaded strictly afterwards.

    Shared modules keep their names and load exactly. GR-MG-only modules (GRMG_ONLY_MODULES) are dropped by name.
    GR-1 modules the file lacks (GRMG_MAY_LACK) take their values from `own`, the model's state dict (its usual
    initialisation), or with cfg.grmg_init_gripper_from_static the gripper camera's from the static camera's.
    GR-MG's GPT-2 has no position embedding: transformer.wpe is set to zero (exact), unless the file has one.
    """
    renamed = {}
    for key, value in sd.items():
        key = _unprefixed(key)
        src = next((s for s in _GRMG_ENCODERS if key.startswith(s)), None)
        renamed[_GRMG_ENCODERS[src] + key[len(src):] if src else key] = value
    policy, mae, clip = split_encoder_keys(renamed)
    unused_clip = [k for k in clip if k.startswith(_CLIP_UNUSED)]
    if unused_clip:
        notes.append(f"dropped {len(unused_clip)} CLIP keys GR-1 does not use (image tower, logit_scale)")
    dropped = sorted({_module_of(k, GRMG_ONLY_MODULES) for k in policy} - {None})
    policy = _drop_old_gpt2_buffers({k: v for k, v in policy.items() if not _module_of(k, GRMG_ONLY_MODULES)}, notes)
    if dropped:
        notes.append(f"dropped GR-MG-only modules: {', '.join(dropped)}")
    if "transformer.wpe.weight" not in policy:
        policy["transformer.wpe.weight"] = torch.zeros(cfg.n_positions, cfg.embed_dim)
        notes.append("transformer.wpe set to zero (GR-MG's GPT-2 has no position embedding)")
    if cfg.grmg_init_gripper_from_static:
        copied = []
        for hand, static in _GRIPPER_FROM_STATIC.items():
            hand_keys = [k for k in own if _module_of(k, (hand,))]
            if any(k in policy for k in hand_keys):
                continue  # the file has this gripper module: it loads as it is
            static_keys = [static + k[len(hand):] for k in hand_keys]
            if all(k in policy for k in static_keys):
                policy.update({h: policy[s].clone() for h, s in zip(hand_keys, static_keys)})
                copied.append(f"{hand} <- {static}")
        if copied:
            notes.append(f"gripper camera initialised from the static camera: {', '.join(copied)}")
    kept = sorted({_module_of(k, GRMG_MAY_LACK) for k in own if k not in policy} - {None})
    policy.update({k: v for k, v in own.items() if k not in policy and _module_of(k, GRMG_MAY_LACK)})
    if kept:
        notes.append(f"not in the file, initialised as usual: {', '.join(kept)}")
    return policy, mae, clip

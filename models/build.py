"""The only constructor of GR-1: builds the network and its frozen encoders from a Config, loads weights strictly
through explicit converters, and saves checkpoints.

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

import glob
import os
import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from config import Config, adopt_checkpoint_config, expand_path
from models.encoders import CLIPTextEncoder, FrozenEncoders, MAEEncoder
from models.files import CheckpointError, checkpoint_path, is_torchscript_archive, load_file, read_torchscript_tensors
from models.gr1 import GR1
from models.layers import Attention

CHECKPOINT_FORMAT = "gr1-training"  # value of the 'format' entry this project adds to its checkpoints
_GPT2_OLD_BUFFERS = (".attn.bias", ".attn.masked_bias")  # persistent in transformers <= 4.11, unused here
_MAE_PRETRAIN_EXTRA = ("mask_token", "decoder_")  # MAE pretraining decoder keys, if a full MAE checkpoint is given
_CLIP_UNUSED = ("visual.", "logit_scale", "input_resolution", "context_length", "vocab_size")


@dataclass
class LoadReport:
    path: str
    format: str
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        extra = "; ".join(self.notes)
        return f"loaded {self.format} weights from {self.path}" + (f" ({extra})" if extra else "")


# ---------------------------------------------------------------- files (read by models/files.py: no code runs)

def tensor_dict(raw: object, entry: str, path: str, what: str) -> dict[str, torch.Tensor]:
    """raw[entry] if present, else raw itself, checked to be a {name: tensor} dict."""
    sd = raw.get(entry, raw) if isinstance(raw, dict) else raw
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{path} is not {what} (expected a state dict or {{'{entry}': state dict}})")
    return sd


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _load_strict(module: nn.Module, sd: dict[str, torch.Tensor], path: str, what: str) -> None:
    """load_state_dict(strict=True) with an error that lists missing, unexpected and wrongly shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(sd) if sd[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        def listing(name: str, items: list[str]) -> str:
            return f"\n  {name} ({len(items)}): " + ", ".join(items[:12]) + (" ..." if len(items) > 12 else "")
        raise CheckpointError(f"{path} does not fit the {what}:" + (listing("missing", missing) if missing else "")
                              + (listing("unexpected", unexpected) if unexpected else "")
                              + (listing("shape mismatch", shapes) if shapes else "")
                              + "\n  Check that the config (embed_dim, n_layer, chunk_size, ...) matches the file "
                              "(GR1-Training's and Bytedance's checkpoints record no config: their shapes come from "
                              "the config file).")
    module.load_state_dict(sd, strict=True)


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


# ---------------------------------------------------------------- builders

def set_exact_attention(module: nn.Module, exact: bool) -> None:
    """Switch every ViT-style attention (MAE, pixel decoder) between the reference's exact rounding and fused SDPA."""
    for m in module.modules():
        if isinstance(m, Attention):
            m.exact = exact


def _clip_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.clip_precision == "fp16" or (cfg.clip_precision == "auto" and device.type == "cuda"):
        return torch.float16  # Faithful to GR1-Training: clip.load on CUDA returns fp16 weights
    return torch.float32


def load_clip_file(path: str) -> dict[str, torch.Tensor]:
    """OpenAI's ViT-B-32.pt (a TorchScript archive, read as data: models/files.py) or a plain state-dict file."""
    path = expand_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP weights not found: {path} (set clip_ckpt to the ViT-B-32.pt that "
                                "clip.load('ViT-B/32') downloads to ~/.cache/clip/)")
    if is_torchscript_archive(path):
        return {k: v.float() for k, v in read_torchscript_tensors(path).items()}
    return tensor_dict(load_file(path), "state_dict", path, "a CLIP state dict or TorchScript archive")


RANDOM_ENCODER_SEED = 0  # initialises the frozen encoders where no weights are configured


def build_encoders(cfg: Config, device: torch.device | str = "cpu") -> FrozenEncoders:
    """The frozen MAE and CLIP text encoders, with weights from cfg.mae_ckpt / cfg.clip_ckpt ('' = random)."""
    device = torch.device(device)
    # Random encoders (no weights configured) are the same in every process and run, whatever the global RNG state or
    # the training seed: a policy trained on them is evaluated on the very same features.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_ENCODER_SEED)
        mae = MAEEncoder(cfg.rgb_shape, cfg.patch_size, cfg.img_feat_dim, cfg.mae_depth, cfg.mae_num_heads)
        clip_text = CLIPTextEncoder(cfg.lang_feat_dim, cfg.clip_text_width, cfg.clip_text_layers,
                                    cfg.clip_text_heads)
    notes: list[str] = []
    if cfg.mae_ckpt:
        sd = tensor_dict(load_file(cfg.mae_ckpt, "mae"), "model", cfg.mae_ckpt, "an MAE checkpoint")
        _load_strict(mae, convert_mae_state_dict(sd, notes), cfg.mae_ckpt, "MAE image encoder")
    else:
        warnings.warn("mae_ckpt is empty: the frozen MAE image encoder keeps its RANDOM initialisation (seeded: the "
                      "same in every run)", stacklevel=2)
    if cfg.clip_ckpt:
        _load_strict(clip_text, convert_clip_state_dict(load_clip_file(cfg.clip_ckpt)), cfg.clip_ckpt,
                     "CLIP text encoder")
    else:
        warnings.warn("clip_ckpt is empty: the frozen CLIP text encoder keeps its RANDOM initialisation (seeded: "
                      "the same in every run)", stacklevel=2)
    set_exact_attention(mae, cfg.exact_attention)
    return FrozenEncoders(mae, clip_text, _clip_dtype(cfg, device)).to(device)


def build_gr1(cfg: Config) -> GR1:
    """A randomly initialised GR1 (seeded by cfg.seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        gr1 = GR1(cfg)
    set_exact_attention(gr1, cfg.exact_attention)
    return gr1


def default_weights_path(cfg: Config, for_eval: bool = False) -> str | None:
    """Which policy weights a run starts from: ckpt_path if set (training and evaluation alike; for_eval is kept for
    callers and changes nothing), else the Bytedance snapshot with load_bytedance_ckpt, else
    save_path/GR1_<load_epoch>.pth as GR1-Training does: None (random) if it does not exist and load_epoch is 0, an
    error naming the file for any other load_epoch (GR1-Training silently trained from scratch)."""
    if cfg.ckpt_path:
        return cfg.ckpt_path
    if cfg.load_bytedance_ckpt:
        return cfg.bytedance_ckpt_path
    if cfg.load_grmg_ckpt:
        return cfg.grmg_ckpt_path
    path = checkpoint_path(cfg.save_path, cfg.load_epoch)
    if cfg.load_epoch and not os.path.isfile(path):
        raise CheckpointError(f"load_epoch={cfg.load_epoch} but {path} does not exist (load_epoch=0 starts from "
                              "random weights)")
    return path if os.path.isfile(path) else None


def weights_kind(cfg: Config, path: str) -> str:
    """Which extra globals (models/files.py SAFE_GLOBALS) a policy weights file may hold: the Bytedance snapshot's."""
    return "bytedance" if cfg.load_bytedance_ckpt and path == cfg.bytedance_ckpt_path else "checkpoint"


def saved_config(path: str, kind: str = "checkpoint") -> dict | None:
    """The config a checkpoint of this project records (None for GR1-Training's and Bytedance's, which record none)."""
    raw = load_file(path, kind)
    saved = raw.get("config") if isinstance(raw, dict) else None
    return saved if isinstance(saved, dict) else None


def config_for_checkpoint(cfg: Config, path: str, explicit: frozenset[str] = frozenset()) -> Config:
    """cfg with the architecture a checkpoint was trained with, so that the model can be rebuilt from the file alone
    (config.adopt_checkpoint_config). Files without a config (GR1-Training, Bytedance) keep cfg's values."""
    saved = saved_config(path, weights_kind(cfg, path))
    return cfg if saved is None else adopt_checkpoint_config(cfg, saved, explicit, path)


def load_policy_weights(gr1: GR1, encoders: FrozenEncoders | None, path: str, cfg: Config,
                        kind: str = "checkpoint") -> LoadReport:
    """Load any supported GR-1 checkpoint file strictly (see the module docstring for the conversions); `kind`
    names the globals the file may pickle besides tensors (models/files.py SAFE_GLOBALS)."""
    raw = load_file(path, kind)
    sd = tensor_dict(raw, "state_dict", path, "a GR-1 checkpoint")
    check_grmg_hyper_parameters(raw, cfg, path)
    return load_policy_state_dict(gr1, encoders, sd, cfg, path)


def load_policy_state_dict(gr1: GR1, encoders: FrozenEncoders | None, sd: dict[str, torch.Tensor], cfg: Config,
                           source: str = "state dict") -> LoadReport:
    """Convert and strictly load a GR-1 state dict; model_mae.* / model_clip.* keys, if present, go to `encoders`
    (ignored when encoders is None)."""
    sd = _strip_prefixes(sd)
    check_known_layout(sd, source)
    report = LoadReport(source, "")
    if is_grmg_state_dict(sd):
        policy_sd, mae_sd, clip_sd = convert_grmg_state_dict(sd, gr1.state_dict(), cfg, report.notes)
        report.format = GRMG_FORMAT
    else:
        policy_sd, mae_sd, clip_sd = split_encoder_keys(sd)
        policy_sd, report.format = convert_policy_state_dict(policy_sd, cfg, report.notes)
    _load_strict(gr1, policy_sd, source, "GR1 policy")
    if encoders is not None and mae_sd:
        _load_strict(encoders.mae, convert_mae_state_dict(mae_sd, report.notes), source, "MAE image encoder")
        report.notes.append("MAE weights taken from this file")
    if encoders is not None and clip_sd:
        dtype = encoders.clip_text.token_embedding.weight.dtype
        _load_strict(encoders.clip_text, convert_clip_state_dict(clip_sd), source, "CLIP text encoder")
        encoders.clip_text.to(dtype)
        encoders._text_cache = {}
        report.notes.append("CLIP weights taken from this file")
    return report


def build_model(cfg: Config, device: torch.device | str = "cpu", weights: str | None = "default",
                for_eval: bool = False) -> tuple[FrozenEncoders, GR1, LoadReport | None]:
    """Frozen encoders and the GR1 network on `device`, with policy weights from `weights` ('default': the rule of
    default_weights_path; None: random init; else a path)."""
    encoders = build_encoders(cfg, device)
    gr1 = build_gr1(cfg)
    path = default_weights_path(cfg, for_eval) if weights == "default" else weights
    report = load_policy_weights(gr1, encoders, path, cfg, weights_kind(cfg, path)) if path else None
    return encoders, gr1.to(device), report


# ---------------------------------------------------------------- saving

def policy_state_dict(gr1: nn.Module) -> dict[str, torch.Tensor]:
    """GR1-Training's checkpoint layout: the trainable network's keys (no frozen encoders), on CPU."""
    return {k: v.detach().cpu() for k, v in _strip_prefixes(gr1.state_dict()).items()}


def save_checkpoint(gr1: nn.Module, path: str, cfg: Config, **extra) -> None:
    """Write {'state_dict', 'config', 'format', **extra} atomically (temp file + rename). Temporary files that a
    killed save left beside it are removed; non-finite weights are never written."""
    sd = policy_state_dict(gr1)
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"not saving {path}: {len(bad)} tensors hold NaN or inf (first: {bad[0]})")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale_temporaries(directory)
    payload = {"state_dict": sd, "config": cfg.to_dict(), "format": CHECKPOINT_FORMAT, **extra}
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def remove_stale_temporaries(directory: str) -> None:
    """Delete <name>.pth.tmp<pid> files of saves that were killed (not this process's)."""
    for tmp in glob.glob(os.path.join(glob.escape(directory), "*.pth.tmp*")):
        match = re.search(r"\.pth\.tmp(\d+)$", tmp)
        if match and int(match.group(1)) != os.getpid():
            try:
                os.remove(tmp)
            except FileNotFoundError:
                pass

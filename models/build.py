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

Prefixes added by DDP (``module.``) or torch.compile (``_orig_mod.``) are stripped.
"""
from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from config import Config, expand_path
from models.encoders import CLIPTextEncoder, FrozenEncoders, MAEEncoder
from models.gr1 import GR1
from models.layers import Attention, PerceiverAttention

CHECKPOINT_FORMAT = "gr1-training"  # value of the 'format' entry this project adds to its checkpoints
_GPT2_OLD_BUFFERS = (".attn.bias", ".attn.masked_bias")  # persistent in transformers <= 4.11, unused here
_MAE_PRETRAIN_EXTRA = ("mask_token", "decoder_")  # MAE pretraining decoder keys, if a full MAE checkpoint is given
_CLIP_UNUSED = ("visual.", "logit_scale", "input_resolution", "context_length", "vocab_size")


class CheckpointError(RuntimeError):
    """A weights file does not fit the model; the message names the file and the offending keys."""


@dataclass
class LoadReport:
    path: str
    format: str
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        extra = "; ".join(self.notes)
        return f"loaded {self.format} weights from {self.path}" + (f" ({extra})" if extra else "")


# ---------------------------------------------------------------- files

def load_file(path: str) -> dict:
    """torch.load on CPU; weights_only first, full unpickling only as an explicit, warned fallback."""
    path = expand_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        warnings.warn(f"{path} holds more than tensors; unpickling it fully (only do this for files you trust)",
                      stacklevel=2)
        return torch.load(path, map_location="cpu", weights_only=False)


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
                              + "\n  Check that the config (embed_dim, n_layer, chunk_size, ...) matches the file.")
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


# ---------------------------------------------------------------- builders

def set_exact_attention(module: nn.Module, exact: bool) -> None:
    """Switch every attention (MAE, pixel decoder, resampler) between the reference's exact rounding and fused SDPA."""
    for m in module.modules():
        if isinstance(m, (Attention, PerceiverAttention)):
            m.exact = exact


def _clip_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.clip_precision == "fp16" or (cfg.clip_precision == "auto" and device.type == "cuda"):
        return torch.float16  # Faithful to GR1-Training: clip.load on CUDA returns fp16 weights
    return torch.float32


def load_clip_file(path: str) -> dict[str, torch.Tensor]:
    """OpenAI's ViT-B-32.pt is a TorchScript archive; a plain state-dict file works too."""
    path = expand_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP weights not found: {path} (set clip_ckpt to the ViT-B-32.pt that "
                                "clip.load('ViT-B/32') downloads to ~/.cache/clip/)")
    try:
        return {k: v.float() for k, v in torch.jit.load(path, map_location="cpu").state_dict().items()}
    except RuntimeError:
        sd = load_file(path)
        return sd.get("state_dict", sd)


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
        sd = load_file(cfg.mae_ckpt)
        _load_strict(mae, convert_mae_state_dict(sd.get("model", sd), notes), cfg.mae_ckpt, "MAE image encoder")
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
    """Which policy weights a run starts from, as GR1-Training decides (ckpt_path first when evaluating)."""
    if for_eval and cfg.ckpt_path:
        return cfg.ckpt_path
    if cfg.load_bytedance_ckpt:
        return cfg.bytedance_ckpt_path
    path = os.path.join(cfg.save_path, f"GR1_{cfg.load_epoch}.pth")
    return path if os.path.isfile(path) else None


def load_policy_weights(gr1: GR1, encoders: FrozenEncoders | None, path: str, cfg: Config) -> LoadReport:
    """Load any supported GR-1 checkpoint file strictly (see the module docstring for the conversions)."""
    raw = load_file(path)
    sd = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a GR-1 checkpoint (expected a state dict or {{'state_dict': ...}})")
    return load_policy_state_dict(gr1, encoders, sd, cfg, path)


def load_policy_state_dict(gr1: GR1, encoders: FrozenEncoders | None, sd: dict[str, torch.Tensor], cfg: Config,
                           source: str = "state dict") -> LoadReport:
    """Convert and strictly load a GR-1 state dict; model_mae.* / model_clip.* keys, if present, go to `encoders`
    (ignored when encoders is None)."""
    policy_sd, mae_sd, clip_sd = split_encoder_keys(_strip_prefixes(sd))
    report = LoadReport(source, "")
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
    report = load_policy_weights(gr1, encoders, path, cfg) if path else None
    return encoders, gr1.to(device), report


# ---------------------------------------------------------------- saving

def policy_state_dict(gr1: nn.Module) -> dict[str, torch.Tensor]:
    """GR1-Training's checkpoint layout: the trainable network's keys (no frozen encoders), on CPU."""
    return {k: v.detach().cpu() for k, v in _strip_prefixes(gr1.state_dict()).items()}


def save_checkpoint(gr1: nn.Module, path: str, cfg: Config, **extra) -> None:
    """Write {'state_dict', 'config', 'format', **extra} atomically (temp file + rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = {"state_dict": policy_state_dict(gr1), "config": cfg.to_dict(), "format": CHECKPOINT_FORMAT, **extra}
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)

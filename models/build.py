"""The only constructor of GR-1: builds the network and its frozen encoders from a Config, loads weights strictly
(after the explicit conversions of models/converters.py, which lists the checkpoint formats read), and saves
checkpoints. Prefixes added by DDP (``module.``) or torch.compile (``_orig_mod.``) are stripped.
"""
from __future__ import annotations

import glob
import os
import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from config import Config, ModelConfig, adopt_checkpoint_config, expand_path
from models.converters import (
    GRMG_FORMAT,
    check_grmg_hyper_parameters,
    check_known_layout,
    convert_clip_state_dict,
    convert_grmg_state_dict,
    convert_mae_state_dict,
    convert_policy_state_dict,
    is_grmg_state_dict,
    split_encoder_keys,
)
from models.encoders import CLIPTextEncoder, FrozenEncoders, MAEEncoder
from models.files import CheckpointError, checkpoint_path, is_torchscript_archive, load_file, read_torchscript_tensors
from models.gr1 import GR1
from models.layers import Attention

CHECKPOINT_FORMAT = "gr1-training"  # value of the 'format' entry this project adds to its checkpoints


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
        gr1 = GR1(ModelConfig.from_config(cfg))
    set_exact_attention(gr1, cfg.exact_attention)
    return gr1


def default_weights_path(cfg: Config) -> str | None:
    """Which policy weights a run starts from: ckpt_path if set (training and evaluation alike), else the Bytedance
    snapshot with load_bytedance_ckpt (GR-MG's with load_grmg_ckpt), else save_path/GR1_<load_epoch>.pth as
    GR1-Training does: None (random) if it does not exist and load_epoch is 0, an error naming the file for any other
    load_epoch (GR1-Training silently trained from scratch)."""
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
        # (a strict load copies into the existing tensors: each keeps its dtype, fp16 or fp32 as CLIP's cast left it)
        _load_strict(encoders.clip_text, convert_clip_state_dict(clip_sd), source, "CLIP text encoder")
        encoders._text_cache = {}
        report.notes.append("CLIP weights taken from this file")
    return report


def build_model(cfg: Config, device: torch.device | str = "cpu", weights: str | None = "default"
                ) -> tuple[FrozenEncoders, GR1, LoadReport | None]:
    """Frozen encoders and the GR1 network on `device`, with policy weights from `weights` ('default': the rule of
    default_weights_path; None: random init; else a path)."""
    encoders = build_encoders(cfg, device)
    gr1 = build_gr1(cfg)
    path = default_weights_path(cfg) if weights == "default" else weights
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

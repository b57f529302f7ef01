"""The only reader of config files: typed, validated, overridable, saved with checkpoints.

Config files are flat JSON objects with GR1-Training's key names (``configs.json``), so a reference config file
loads unchanged. Every key is declared once in :class:`Config` with its type and meaning; an unknown or misspelt key
is an error naming the closest valid key, and ``key=value`` command-line overrides work for every entry point::

    accelerate launch Main.py --config configs.json bs_per_gpu=8 "save_path='./Save/'"
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from facts import ACTION_DIM, ARM_DIM, TokenLayout

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs.json")


class ConfigError(ValueError):
    """A config file or override is wrong; the message says which key and how to fix it."""


@dataclass(frozen=True)
class Config:
    """Every setting of training, evaluation and conversion. Field comments are the documentation."""

    # ---- GR1-Training keys (names and defaults as in the reference configs.json) ----
    evaluate_during_training: bool = True  # run the CALVIN evaluation after each checkpoint save
    record_evaluation_video: bool = False  # write real/predicted frame videos per subtask during evaluation
    compile_model: bool = False  # torch.compile the trainable network
    bytedance_ckpt_path: str = "./snapshot_ABC.pt"  # Bytedance GR-1 snapshot, used when load_bytedance_ckpt
    load_bytedance_ckpt: bool = False  # start from the Bytedance snapshot (converted: wpe zeroed, chunk queries 0)
    load_epoch: int = 0  # start from save_path/GR1_<load_epoch>.pth (0: if it exists); checkpoint numbers continue
    save_epochs: int = 1  # save GR1_<epoch>.pth every this many epochs (and always after the last epoch)
    num_epochs: int = 20  # epochs to train
    num_sequences: int = 1000  # evaluation sequences: CALVIN's get_sequences(num_sequences); 1000 = the official list
    ep_len: int = 360  # env steps allowed per subtask
    print_steps: int = 100  # batches between log lines / TensorBoard points
    lr_max: float = 0.0009  # peak learning rate of the cosine schedule
    weight_decay: float = 0.0001  # AdamW weight decay (applied to every trainable tensor, as the reference)
    arm_loss_ratio: float = 100.0  # weight of the smooth-L1 arm action loss in the total loss
    num_warmup_epochs: float = 1.0  # linear warm-up length in epochs
    bs_per_gpu: int = 19  # batch size per process
    workers_per_gpu: int = 7  # DataLoader workers per process
    prefetch_factor: int = 2  # batches prefetched per DataLoader worker
    gradient_accumulation_steps: int = 3  # batches per optimiser step
    rgb_static_pad: int = 10  # random-shift padding of the 200 px static camera (pixels; 0: no shift)
    rgb_gripper_pad: int = 4  # random-shift padding of the 84 px gripper camera (pixels; 0: no shift)
    rgb_shape: int = 224  # network input resolution
    patch_size: int = 16  # ViT / pixel-decoder patch size
    rgb_mean: tuple[float, ...] = (0.485, 0.456, 0.406)  # image normalisation mean (ImageNet)
    rgb_std: tuple[float, ...] = (0.229, 0.224, 0.225)  # image normalisation std (ImageNet)
    LMDB_path: str = "../calvin_lmdb/"  # LMDB written by calvin2lmdb.py
    save_path: str = "./Save/"  # checkpoints, logs, evaluation results
    mae_ckpt: str = "./mae_pretrain_vit_base.pth"  # MAE ViT-B/16 weights (['model']); "" = random (tests/demo)
    embed_dim: int = 384  # GPT-2 hidden size
    n_layer: int = 12  # GPT-2 layers
    n_head: int = 12  # GPT-2 heads
    activation_function: str = "relu"  # GPT-2 MLP activation
    dropout: float = 0.1  # GPT-2 residual, attention and embedding dropout
    n_positions: int = 1024  # GPT-2 learned position embeddings
    device: str = "cuda"  # accepted for compatibility; accelerate chooses the device
    resampler_depth: int = 3  # perceiver resampler layers
    resampler_dim_head: int = 128  # perceiver resampler head size
    resampler_heads: int = 4  # perceiver resampler heads
    resampler_num_media_embeds: int = 1  # perceiver resampler media embeddings (must be 1)
    resampler_num_latents: int = 9  # resampled patch tokens per image
    seq_len: int = 10  # history window (timesteps)
    chunk_size: int = 10  # actions predicted per timestep (GR-Chunk)
    test_chunk_size: int = 1  # actions executed per policy query during evaluation
    skip_frame: int = 3  # observation queries of step t predict frame t + skip_frame
    action_mode: str = "ee_rel_pose"  # 'ee_rel_pose' (rel_actions) or 'ee_abs_pose' (actions)
    act_dim: int = ACTION_DIM  # arm (6) + gripper (1)
    state_dim: int = ACTION_DIM  # arm (6) + gripper (1)
    use_hand_rgb: bool = True  # use the gripper camera (must be true, as the reference)
    clip_backbone: str = "ViT-B/32"  # CLIP model name (informational; weights come from clip_ckpt)
    act_pred: bool = True  # train the action head (must be true, as the reference)
    fwd_pred: bool = True  # train the static-camera video head (must be true, as the reference)
    fwd_pred_hand: bool = True  # train the gripper-camera video head (must be true, as the reference)
    fwd_pred_next_n: int = 3  # accepted for compatibility (unused by the reference); see skip_frame
    without_norm_pixel_loss: bool = False  # use raw (not per-patch standardised) pixel targets
    img_feat_dim: int = 768  # MAE width (cls token features)
    patch_feat_dim: int = 768  # MAE width (patch token features)
    lang_feat_dim: int = 512  # CLIP text embedding size

    # ---- keys added by this project ----
    clip_ckpt: str = "~/.cache/clip/ViT-B-32.pt"  # OpenAI CLIP weights (the file clip.load downloads); "" = random
    clip_precision: str = "auto"  # text tower dtype: 'auto' (fp16 on CUDA, fp32 on CPU, as clip.load), 'fp32', 'fp16'
    clip_text_width: int = 512  # CLIP text transformer width
    clip_text_layers: int = 12  # CLIP text transformer layers
    clip_text_heads: int = 8  # CLIP text transformer heads
    mae_depth: int = 12  # MAE ViT blocks
    mae_num_heads: int = 12  # MAE ViT heads
    seed: int = 0  # seed of model init, data order and augmentation
    resume: bool = False  # continue the run in save_path from its saved training state (exact; none yet: start)
    save_steps: int = 1000  # also save the full training state every this many optimiser steps (0 = epochs only)
    max_train_steps: int = 0  # stop after this many optimiser steps in total (0 = run all epochs)
    lr_schedule: str = "per_step"  # 'per_step' (cosine warm-up per optimiser step) or 'reference' (staircase)
    mixed_precision: str = "bf16"  # 'bf16', 'fp16' or 'no'; on CPU always 'no'
    split: str = "auto"  # 'calvin' (CALVIN training/validation splits), 'ratio' (reference), 'auto' (calvin if known)
    train_ratio: float = 0.9  # with split='ratio': fraction of LMDB steps used for training
    eval_backend: str = "builtin"  # 'builtin' (pybullet scene shipped here) or 'calvin' (real calvin_env)
    calvin_dataset_path: str = ""  # CALVIN split folder with validation/.hydra/merged_config.yaml ('' = shipped)
    ckpt_path: str = ""  # policy weights to evaluate, and training's starting weights ('' = see load_epoch)
    eval_feature_cache: bool = True  # cache per-frame encoder features during evaluation
    eval_policy: str = "gr1"  # 'gr1'; baselines: 'zero' (never moves), 'expert' (built-in scene's scripted expert)
    builtin_tasks: str = ""  # built-in scene: comma-separated tasks the evaluation chains use ('' = all 11)
    eval_dir: str = ""  # evaluation outputs ('' = save_path/eval/)
    eval_sequence_start: int = 0  # skip the sequences before this position (evaluate a tail of the list)
    exact_attention: bool = False  # attention as the reference computes it (bit-identical, slower)
    load_grmg_ckpt: bool = False  # start from GR-MG's Ego4D-pretrained GR-1 (grmg_ckpt_path), converted strictly
    grmg_ckpt_path: str = "./pretrained.pt"  # GR-MG's pretrained.pt (or another GR-MG policy checkpoint)
    grmg_init_gripper_from_static: bool = False  # gripper-camera embeddings / observation queries a GR-MG file lacks
    #                                              start as copies of its static camera's (else: random init)
    frame_sharing: int = 1  # training batches in groups of this many consecutive windows of one episode, one random
    #                         shift per group, each distinct frame encoded once (1 = independent windows; README)
    log_with: str = "tensorboard"  # experiment trackers (accelerate): 'tensorboard', 'wandb', ... comma-separated;
    #                                'none' = metrics.jsonl and training_curves.png only
    eval_envs_per_process: int = 1  # simulator worker processes per accelerate process (about the CPU cores per GPU)
    eval_reset: str = "deterministic"  # 'deterministic' (reset restores the whole simulator state) or 'reference'
    eval_sequence_count: int = 0  # evaluate sequences [eval_sequence_start, start + this) of the list (0 = to its end)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists) that load_config reads back to an equal Config."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> Config:
        """A validated copy with some values changed."""
        return from_dict({**self.to_dict(), **changes}, source="replace()")


@dataclass(frozen=True)
class ModelConfig:
    """The part of Config that GR1 (models/gr1.py), its losses (models/losses.py) and a checkpoint's architecture
    need: ModelConfig.from_config(cfg). The meaning of each field is its comment in Config."""

    # ---- architecture: the network's shapes and its input preprocessing. Checkpoints written here record these
    # (in their 'config'), and evaluate_calvin.py / fine-tuning from ckpt_path rebuild the model with their values.
    rgb_shape: int
    patch_size: int
    rgb_mean: tuple[float, ...]
    rgb_std: tuple[float, ...]
    embed_dim: int
    n_layer: int
    n_head: int
    activation_function: str
    n_positions: int
    resampler_depth: int
    resampler_dim_head: int
    resampler_heads: int
    resampler_num_media_embeds: int
    resampler_num_latents: int
    seq_len: int
    chunk_size: int
    action_mode: str
    act_dim: int
    state_dim: int
    use_hand_rgb: bool
    img_feat_dim: int
    patch_feat_dim: int
    lang_feat_dim: int
    clip_text_width: int
    clip_text_layers: int
    clip_text_heads: int
    mae_depth: int
    mae_num_heads: int
    # ---- training behaviour of the network and its losses (not architecture: a fine-tuning run may change them)
    dropout: float
    skip_frame: int
    without_norm_pixel_loss: bool
    arm_loss_ratio: float

    @classmethod
    def from_config(cls, cfg: Config) -> ModelConfig:
        return cls(**{name: getattr(cfg, name) for name in _MODEL_FIELDS})

    @property
    def layout(self) -> TokenLayout:
        """One timestep's token block (facts.TokenLayout)."""
        return TokenLayout(self.resampler_num_latents, self.chunk_size)

    @property
    def grid(self) -> int:
        """Patches per image side (rgb_shape / patch_size)."""
        return self.rgb_shape // self.patch_size


_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
_NOT_ARCHITECTURE = ("dropout", "skip_frame", "without_norm_pixel_loss", "arm_loss_ratio")
ARCHITECTURE_KEYS = tuple(name for name in _MODEL_FIELDS if name not in _NOT_ARCHITECTURE)
# Frozen-encoder weight files: taken from the config, except that a model trained on the seeded RANDOM encoders
# ('' in its checkpoint) keeps them unless the key is given explicitly (its features come from those encoders).
ENCODER_WEIGHT_KEYS = ("mae_ckpt", "clip_ckpt")
# What the model was trained to predict, tied to seq_len: taken from a checkpoint unless given (a given value may
# differ: fine-tuning may change it).
OBJECTIVE_KEYS = ("skip_frame",)

_CHOICES = {
    "action_mode": ("ee_rel_pose", "ee_abs_pose"),
    "activation_function": ("relu", "gelu", "gelu_new", "silu", "tanh"),
    "clip_precision": ("auto", "fp32", "fp16"),
    "lr_schedule": ("per_step", "reference"),
    "mixed_precision": ("bf16", "fp16", "no"),
    "split": ("auto", "calvin", "ratio"),
    "eval_backend": ("builtin", "calvin"),
    "eval_policy": ("gr1", "zero", "expert"),
    "eval_reset": ("deterministic", "reference"),
}
_MUST_BE_TRUE = ("use_hand_rgb", "act_pred", "fwd_pred", "fwd_pred_hand")
_NON_NEGATIVE = ("load_epoch", "skip_frame", "workers_per_gpu", "save_steps", "max_train_steps", "rgb_static_pad",
                 "rgb_gripper_pad", "seed", "eval_sequence_start", "eval_sequence_count")
_POSITIVE_FLOATS = ("lr_max",)
_NON_NEGATIVE_FLOATS = ("weight_decay", "arm_loss_ratio", "num_warmup_epochs")
_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _field_type(name: str) -> str:
    return str(_FIELDS[name].type)


def _coerce(name: str, value: Any, source: str) -> Any:
    """Check one value against its declared type; ints are accepted for floats, lists for tuples."""
    kind = _field_type(name)

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{source}: '{name}' must be {expected}, got {value!r} ({type(value).__name__})")

    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad("an integer")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad("a finite number")
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if kind.startswith("tuple"):
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise bad("a list of numbers")
        return tuple(float(v) for v in value)
    raise AssertionError(f"unhandled config type {kind} for {name}")


def _unknown_key_error(key: str, source: str) -> ConfigError:
    lower = {k.lower(): k for k in _FIELDS}
    if key.lower() in lower:  # e.g. 'lmdb_path' for 'LMDB_path'
        close = [lower[key.lower()]]
    else:
        close = [lower[k] for k in difflib.get_close_matches(key.lower(), lower, n=1, cutoff=0.5)]
    hint = f"; did you mean '{close[0]}'?" if close else "; see config.py for the valid keys"
    return ConfigError(f"{source}: unknown config key '{key}'{hint}")


def _check_consistency(cfg: Config, source: str) -> None:
    """Cross-field checks, each with a message that says what to change."""
    def fail(msg: str) -> None:
        raise ConfigError(f"{source}: {msg}")

    for name in _CHOICES:
        if getattr(cfg, name) not in _CHOICES[name]:
            fail(f"'{name}' must be one of {list(_CHOICES[name])}, got {getattr(cfg, name)!r}")
    for name in _MUST_BE_TRUE:
        if not getattr(cfg, name):
            fail(f"'{name}'=false is not supported: GR1 always trains with it on (as GR1-Training does)")
    for name in _NON_NEGATIVE:
        if getattr(cfg, name) < 0:
            fail(f"'{name}' must be >= 0, got {getattr(cfg, name)}")
    for name, f in _FIELDS.items():
        if str(f.type) == "int" and name not in _NON_NEGATIVE and getattr(cfg, name) <= 0:
            fail(f"'{name}' must be > 0, got {getattr(cfg, name)}")
    if len(cfg.rgb_mean) != 3 or len(cfg.rgb_std) != 3:
        fail("'rgb_mean' and 'rgb_std' must have 3 entries (RGB)")
    if cfg.rgb_shape % cfg.patch_size:
        fail(f"'rgb_shape' ({cfg.rgb_shape}) must be a multiple of 'patch_size' ({cfg.patch_size})")
    if cfg.embed_dim % cfg.n_head:
        fail(f"'embed_dim' ({cfg.embed_dim}) must be divisible by 'n_head' ({cfg.n_head})")
    if cfg.embed_dim % 16:
        fail(f"'embed_dim' ({cfg.embed_dim}) must be divisible by 16 (the pixel decoder has 16 heads)")
    if cfg.img_feat_dim != cfg.patch_feat_dim:
        fail("'img_feat_dim' and 'patch_feat_dim' are both the MAE width and must be equal")
    if cfg.img_feat_dim % cfg.mae_num_heads:
        fail(f"'img_feat_dim' ({cfg.img_feat_dim}) must be divisible by 'mae_num_heads' ({cfg.mae_num_heads})")
    if cfg.clip_text_width % cfg.clip_text_heads:
        fail("'clip_text_width' must be divisible by 'clip_text_heads'")
    if cfg.act_dim != ACTION_DIM or cfg.state_dim != ACTION_DIM:
        fail(f"'act_dim' and 'state_dim' must be {ACTION_DIM} (CALVIN: {ARM_DIM} arm + 1 gripper)")
    if cfg.resampler_num_media_embeds != 1:
        fail("'resampler_num_media_embeds' must be 1 (one image per resampler call)")
    if cfg.test_chunk_size > cfg.chunk_size:
        fail(f"'test_chunk_size' ({cfg.test_chunk_size}) cannot exceed 'chunk_size' ({cfg.chunk_size})")
    if cfg.skip_frame >= cfg.seq_len:
        fail(f"'skip_frame' ({cfg.skip_frame}) must be smaller than 'seq_len' ({cfg.seq_len})")
    if cfg.eval_policy == "expert" and cfg.eval_backend != "builtin":
        fail("'eval_policy'='expert' exists only in the built-in scene (eval_backend='builtin')")
    if cfg.eval_sequence_start >= cfg.num_sequences:
        fail(f"'eval_sequence_start' ({cfg.eval_sequence_start}) must be smaller than 'num_sequences' "
             f"({cfg.num_sequences})")
    if cfg.eval_sequence_start + cfg.eval_sequence_count > cfg.num_sequences:
        fail(f"'eval_sequence_start' + 'eval_sequence_count' ({cfg.eval_sequence_start} + {cfg.eval_sequence_count}) "
             f"exceeds 'num_sequences' ({cfg.num_sequences})")
    if cfg.load_grmg_ckpt and cfg.load_bytedance_ckpt:
        fail("'load_grmg_ckpt' and 'load_bytedance_ckpt' are both true: choose one starting checkpoint")
    if cfg.load_grmg_ckpt and not cfg.grmg_ckpt_path:
        fail("'load_grmg_ckpt' is true but 'grmg_ckpt_path' is empty: set it to GR-MG's pretrained.pt")
    if cfg.frame_sharing > cfg.bs_per_gpu:
        fail(f"'frame_sharing' ({cfg.frame_sharing}) cannot exceed 'bs_per_gpu' ({cfg.bs_per_gpu}): a group of windows "
             "shares frames only inside one batch")
    if not 0.0 < cfg.train_ratio < 1.0:
        fail(f"'train_ratio' must be in (0, 1), got {cfg.train_ratio}")
    for name in _POSITIVE_FLOATS:
        if not getattr(cfg, name) > 0:
            fail(f"'{name}' must be > 0, got {getattr(cfg, name)}")
    for name in _NON_NEGATIVE_FLOATS:
        if getattr(cfg, name) < 0:
            fail(f"'{name}' must be >= 0, got {getattr(cfg, name)}")
    if not all(s > 0 for s in cfg.rgb_std):
        fail(f"'rgb_std' entries must be > 0, got {list(cfg.rgb_std)}")
    if not 0.0 <= cfg.dropout < 1.0:
        fail(f"'dropout' must be in [0, 1), got {cfg.dropout}")
    tokens = TokenLayout(cfg.resampler_num_latents, cfg.chunk_size).per_step * cfg.seq_len
    if tokens > cfg.n_positions:
        fail(f"seq_len x tokens per step = {tokens} exceeds 'n_positions' ({cfg.n_positions})")


def from_dict(values: dict[str, Any], source: str = "config") -> Config:
    """Validate a flat dict (missing keys take their defaults) into a Config."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: a config must be a JSON object, got {type(values).__name__}")
    kwargs = {}
    for key, value in values.items():
        if key not in _FIELDS:
            raise _unknown_key_error(key, source)
        kwargs[key] = _coerce(key, value, source)
    cfg = Config(**kwargs)
    _check_consistency(cfg, source)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """'key=value' -> (key, value); the value is read as JSON, else taken as a plain string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{text}' must look like key=value")
    if key not in _FIELDS:
        raise _unknown_key_error(key, "command line")
    if _field_type(key) == "str":
        return key, raw  # paths and names are never JSON-decoded ('1e-3' stays a string)
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        lowered = raw.strip().lower()
        if lowered in ("true", "false"):
            return key, lowered == "true"
        return key, raw


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a config file (default: configs.json beside this file) and apply key=value overrides."""
    path = path or DEFAULT_CONFIG
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            values = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config must be a JSON object")
    for key in values:
        if key not in _FIELDS:
            raise _unknown_key_error(key, path)
    for text in overrides:
        key, value = parse_override(text)
        values[key] = value
    return from_dict(values, source=path if not overrides else f"{path} + command line")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The --config flag and key=value overrides shared by every entry point."""
    parser.add_argument("--config", default=None, help="config file (default: configs.json beside config.py)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. bs_per_gpu=8")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def explicit_keys(args: argparse.Namespace) -> frozenset[str]:
    """Keys the user set explicitly: those of a --config file given on the command line and the key=value overrides
    (the default configs.json, read when --config is absent, sets none)."""
    keys = {parse_override(text)[0] for text in args.overrides}
    if args.config:
        with open(args.config) as f:
            keys.update(json.load(f))
    return frozenset(keys)


def adopt_checkpoint_config(cfg: Config, saved: dict[str, Any], explicit: frozenset[str], source: str) -> Config:
    """cfg with the architecture keys (and random-encoder choices) a checkpoint was trained with.

    An explicit key that contradicts the checkpoint is an error naming both values."""
    saved_cfg = from_dict({k: v for k, v in saved.items() if k in _FIELDS}, source=f"{source} (its saved config)")
    changes = {}
    for key in ARCHITECTURE_KEYS:
        if key not in saved:
            continue
        ours, theirs = getattr(cfg, key), getattr(saved_cfg, key)
        if key in explicit and ours != theirs:
            raise ConfigError(f"{key}={ours!r} was given, but {source} was trained with {key}={theirs!r}: drop the key "
                              "(the checkpoint's value is used) or use a checkpoint of that architecture")
        changes[key] = theirs
    for key in ENCODER_WEIGHT_KEYS:
        if saved.get(key) == "" and key not in explicit:
            changes[key] = ""
    for key in OBJECTIVE_KEYS:
        if key in saved and key not in explicit:
            changes[key] = getattr(saved_cfg, key)
    return cfg.replace(**changes)


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as JSON (atomically)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    os.replace(tmp, path)


def expand_path(path: str) -> str:
    """'~' and environment variables expanded; '' stays ''."""
    return os.path.expandvars(os.path.expanduser(path)) if path else path


__all__ = ["ARCHITECTURE_KEYS", "Config", "ConfigError", "DEFAULT_CONFIG", "ENCODER_WEIGHT_KEYS", "ModelConfig",
           "OBJECTIVE_KEYS", "add_config_arguments", "adopt_checkpoint_config", "config_from_args", "expand_path",
           "explicit_keys", "from_dict", "load_config", "parse_override", "save_config"]

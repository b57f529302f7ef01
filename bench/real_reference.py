"""The real GR1-Training code, run beside ours: imported at run time from a local clone that is never committed.

    --reference_dir PATH   a clone of https://github.com/EDiRobotics/GR1-Training (any commit with models/gr1.py)

import_reference() imports its modules unchanged (models/gr1.py, models/vision_transformer.py, PreProcess.py,
LMDBDataset_jpeg.py, Main.py for masked_loss, evaluation/calvin_evaluation.py) and OpenAI's clip package, and
build_reference_gr1() builds its GR1 with Main.py's arguments; its full state dict (with model_mae.* and
model_clip.*) then goes into our model through our own converter (models/build.py), so both hold the same weights.

Its imports need flamingo-pytorch, einops, einops-exts and openai-clip (requirements-bench.txt). Names that are not
installed are given by stand-in modules created in sys.modules here (listed by the benches when used):

- torchvision: transforms.v2.Resize is F.interpolate(bicubic, antialias=True) on the flattened leading dims (what
  torchvision's v2 Resize computes on float tensors, bit for bit: GR1_REFERENCE.md section 6); io.decode_jpeg
  decodes with simplejpeg, else Pillow (libjpeg-turbo with its default settings, as torchvision: the same pixels;
  the decode cost can differ a little from torchvision's); the transforms that clip.py imports at module level are
  never called by the benches.
- pkg_resources (setuptools >= 81 has none): only `packaging`, which clip.py imports from it.
- calvin_agent.models.calvin_base_model.CalvinBaseModel: the evaluator's base class, an interface without code.

The stand-ins are in sys.modules only while the reference is imported (its modules keep the names they imported), so
that other libraries' probes for torchvision still find none. The reference's packages `models`, `evaluation` and
`utils` share names with ours: they are imported with our project root off sys.path and then kept under
sys.modules['gr1_training.<name>'], and ours are put back.
"""
from __future__ import annotations

import importlib
import importlib.util
import io
import os
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SHARED_NAMES = ("models", "evaluation", "utils", "Main")  # top-level names both projects use
_MODULES = ("models.gr1", "models.vision_transformer", "PreProcess", "LMDBDataset_jpeg", "Main",
            "evaluation.calvin_evaluation")
STAND_IN_HELP = ("Where torchvision, pkg_resources or calvin_agent are not installed, stand-in modules providing the "
                 "few names the reference imports are created in sys.modules at run time (bench/real_reference.py: "
                 "torchvision's v2 Resize as bicubic antialiased F.interpolate, decode_jpeg with simplejpeg/Pillow).")


# ---------------------------------------------------------------- stand-ins

class _Resize(nn.Module):
    """torchvision.transforms.v2.Resize on float tensors (..., H, W): bicubic, antialiased, align_corners=False."""

    def __init__(self, size, interpolation=None, antialias=True):
        super().__init__()
        self.size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        self.antialias = antialias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-3]
        out = F.interpolate(x.reshape((-1,) + x.shape[-3:]), size=self.size, mode="bicubic", align_corners=False,
                            antialias=self.antialias)
        return out.reshape(lead + out.shape[-3:])


def _decode_jpeg(data: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """torchvision.io.decode_jpeg: uint8 bytes tensor -> (3, H, W) uint8 RGB."""
    raw = data.numpy().tobytes()
    try:
        import simplejpeg
        pixels = simplejpeg.decode_jpeg(raw, colorspace="RGB")
    except ImportError:
        from PIL import Image
        pixels = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).contiguous()


def _not_used(*args, **kwargs):
    raise NotImplementedError("stand-in torchvision: this transform is not available (install torchvision)")


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    module.__stand_in__ = True
    return module


def install_stand_ins() -> list[str]:
    """Stand-ins in sys.modules for the missing modules the reference imports; returns the names created."""
    import transformers  # noqa: F401  (it probes for torchvision when imported: before any stand-in exists)
    created = []
    if importlib.util.find_spec("torchvision") is None:
        transforms = _module("torchvision.transforms", Compose=_not_used, Resize=_not_used, CenterCrop=_not_used,
                             ToTensor=_not_used, Normalize=_not_used)
        transforms.v2 = _module("torchvision.transforms.v2", Resize=_Resize)
        tv_io = _module("torchvision.io", decode_jpeg=_decode_jpeg)
        sys.modules.update({"torchvision": _module("torchvision", transforms=transforms, io=tv_io),
                            "torchvision.transforms": transforms, "torchvision.transforms.v2": transforms.v2,
                            "torchvision.io": tv_io})
        created.append("torchvision")
    if importlib.util.find_spec("pkg_resources") is None:
        import packaging.version
        sys.modules["pkg_resources"] = _module("pkg_resources", packaging=packaging)
        created.append("pkg_resources")
    if importlib.util.find_spec("calvin_agent") is None:
        base = _module("calvin_agent.models.calvin_base_model", CalvinBaseModel=type("CalvinBaseModel", (), {}))
        models = _module("calvin_agent.models", calvin_base_model=base)
        sys.modules.update({"calvin_agent": _module("calvin_agent", models=models), "calvin_agent.models": models,
                            "calvin_agent.models.calvin_base_model": base})
        created.append("calvin_agent")
    return created


# ---------------------------------------------------------------- import

@dataclass
class Reference:
    """The reference's modules, imported from `path`."""

    path: str
    gr1: types.ModuleType  # models/gr1.py
    vits: types.ModuleType  # models/vision_transformer.py
    preprocess: types.ModuleType  # PreProcess.py
    lmdb: types.ModuleType  # LMDBDataset_jpeg.py
    main: types.ModuleType  # Main.py (masked_loss)
    evaluation: types.ModuleType  # evaluation/calvin_evaluation.py
    clip: types.ModuleType  # OpenAI's clip package, as the reference imports it
    stand_ins: list[str] = field(default_factory=list)

    def describe(self) -> str:
        commit = _git_head(self.path)
        used = f"; stand-in modules: {', '.join(self.stand_ins)}" if self.stand_ins else ""
        return f"real GR1-Training from {self.path}{f' at {commit}' if commit else ''}{used}"


def _git_head(path: str) -> str:
    head = os.path.join(path, ".git", "HEAD")
    try:
        with open(head) as f:
            ref = f.read().strip()
        if ref.startswith("ref: "):
            with open(os.path.join(path, ".git", ref[5:])) as f:
                ref = f.read().strip()
        return ref[:7]
    except OSError:
        return ""


def import_reference(path: str) -> Reference:
    """Import the reference's modules from a clone at `path` (SystemExit with a one-line error if it is not one)."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(os.path.join(path, "models", "gr1.py")):
        raise SystemExit(f"error: --reference_dir {path} is not a GR1-Training clone (no models/gr1.py)")
    stand_ins = install_stand_ins()
    ours = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] in _SHARED_NAMES}
    saved_path = list(sys.path)
    sys.path[:] = [path] + [p for p in sys.path if os.path.realpath(p or ".") != ROOT]
    try:
        loaded = {name: importlib.import_module(name) for name in _MODULES}
        import clip
    except ImportError as e:
        raise SystemExit(f"error: importing GR1-Training from {path} failed ({e}); pip install -r "
                         "requirements-bench.txt") from e
    finally:
        sys.path[:] = saved_path
        for k in [k for k in sys.modules if k.split(".")[0] in _SHARED_NAMES]:
            sys.modules[f"gr1_training.{k}"] = sys.modules.pop(k)
        sys.modules.update(ours)
        for k in [k for k in sys.modules if k.split(".")[0] in stand_ins]:
            del sys.modules[k]  # the reference keeps what it imported; other libraries' probes find nothing
    return Reference(path, loaded["models.gr1"], loaded["models.vision_transformer"], loaded["PreProcess"],
                     loaded["LMDBDataset_jpeg"], loaded["Main"], loaded["evaluation.calvin_evaluation"], clip,
                     stand_ins)


# ---------------------------------------------------------------- the reference model

def build_reference_gr1(ref: Reference, cfg, device: torch.device) -> nn.Module:
    """GR1-Training's GR1 as its Main.py builds it (CLIP ViT-B/32 and the MAE ViT inside), random weights.

    GPT-2's embedding dropout follows cfg.dropout (the reference leaves it at GPT2Config's 0.1; the benches run with
    dropout 0 so that losses can be compared step by step). On CUDA the CLIP model is fp16, as clip.load returns it.
    """
    clip_model = ref.clip.model.CLIP(
        embed_dim=cfg.lang_feat_dim, image_resolution=224, vision_layers=12, vision_width=768,  # ViT-B/32 visual
        vision_patch_size=32, context_length=77, vocab_size=49408, transformer_width=cfg.clip_text_width,
        transformer_heads=cfg.clip_text_heads, transformer_layers=cfg.clip_text_layers)
    mae = ref.vits.VisionTransformer(  # vit_base(patch_size=16, num_classes=0) for the default sizes
        img_size=[cfg.rgb_shape], patch_size=cfg.patch_size, embed_dim=cfg.img_feat_dim, depth=cfg.mae_depth,
        num_heads=cfg.mae_num_heads, mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    model = ref.gr1.GR1(
        clip_model, mae, rgb_shape=cfg.rgb_shape, patch_size=cfg.patch_size, state_dim=cfg.state_dim,
        act_dim=cfg.act_dim, hidden_size=cfg.embed_dim, sequence_length=cfg.seq_len, chunk_size=cfg.chunk_size,
        training_target=["act_pred", "fwd_pred", "fwd_pred_hand"], img_feat_dim=cfg.img_feat_dim,
        patch_feat_dim=cfg.patch_feat_dim, lang_feat_dim=cfg.lang_feat_dim,
        resampler_params={"depth": cfg.resampler_depth, "dim_head": cfg.resampler_dim_head,
                          "heads": cfg.resampler_heads, "num_latents": cfg.resampler_num_latents,
                          "num_media_embeds": cfg.resampler_num_media_embeds},
        without_norm_pixel_loss=cfg.without_norm_pixel_loss, use_hand_rgb=True, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=4 * cfg.embed_dim, activation_function=cfg.activation_function,
        n_positions=cfg.n_positions, resid_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, embd_pdrop=cfg.dropout)
    model = model.to(device)
    if device.type == "cuda":
        ref.clip.model.convert_weights(model.model_clip)  # clip.load on CUDA returns fp16 weights
    return model


def reference_preprocessor(ref: Reference, cfg, device: torch.device):
    return ref.preprocess.PreProcess(cfg.rgb_static_pad, cfg.rgb_gripper_pad, cfg.rgb_shape, list(cfg.rgb_mean),
                                     list(cfg.rgb_std), device)


def reference_losses(ref: Reference, model: nn.Module, preprocessor, batch: dict, cfg, train: bool = True
                     ) -> dict[str, torch.Tensor]:
    """The body of GR1-Training's train() for one batch (Main.py): rgb_process, the model, masked_loss x 4."""
    masked_loss = ref.main.masked_loss
    static, gripper = preprocessor.rgb_process(batch["rgb_static"], batch["rgb_gripper"], train=train)
    obs_mask = batch["mask"][..., 0]
    pred = model(rgb=static, hand_rgb=gripper, state={"arm": batch["arm_state"], "gripper": batch["gripper_state"]},
                 language=batch["inst_token"].to(static.device), attention_mask=obs_mask)
    loss = {
        "rgb_static": masked_loss(pred["obs_preds"], pred["obs_targets"], obs_mask, cfg.skip_frame, F.mse_loss),
        "rgb_gripper": masked_loss(pred["obs_hand_preds"], pred["obs_hand_targets"], obs_mask, cfg.skip_frame,
                                   F.mse_loss),
        "action_arm": masked_loss(pred["arm_action_preds"], batch["actions"][..., :6], batch["mask"], 0,
                                  F.smooth_l1_loss),
        "action_gripper": masked_loss(pred["gripper_action_preds"], batch["actions"][..., -1:], batch["mask"], 0,
                                      F.binary_cross_entropy_with_logits)}
    loss["total"] = (loss["rgb_static"] + loss["rgb_gripper"] + cfg.arm_loss_ratio * loss["action_arm"]
                     + loss["action_gripper"])
    return loss


def load_into_ours(reference_model: nn.Module, gr1: nn.Module, encoders, cfg) -> str:
    """The reference model's full state dict -> our GR1 and frozen encoders, through our converter (strict)."""
    from models.build import load_policy_state_dict
    sd = {k: v.detach().float().cpu() for k, v in reference_model.state_dict().items()}
    report = load_policy_state_dict(gr1, encoders, sd, cfg, "the reference model's state dict")
    return str(report)


def reference_beside_ours(path: str, cfg, device: torch.device, gr1: nn.Module, encoders):
    """Import GR1-Training from `path`, build its GR1 and its PreProcess, and load the model's weights into ours
    (printing what was used and loaded) -> (Reference, its GR1, its PreProcess)."""
    ref = import_reference(path)
    print(ref.describe())
    model = build_reference_gr1(ref, cfg, device)
    print(load_into_ours(model, gr1, encoders, cfg))
    return ref, model, reference_preprocessor(ref, cfg, device)


# ---------------------------------------------------------------- alternating timing

@dataclass
class Timing:
    wall: list[float] = field(default_factory=list)  # seconds per call
    cpu_share: list[float] = field(default_factory=list)  # process CPU seconds / wall seconds / threads

    def median(self) -> float:
        return statistics.median(self.wall)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(paths: dict[str, Callable[[int], object]], rounds: int, device: torch.device, threads: int,
              verbose: bool = True) -> dict[str, Timing]:
    """Call each path once per round, alternating which goes first, and time every call (wall and CPU share).

    The CPU share (process CPU time / wall time / threads) tells a step that another process slowed down on a shared
    machine (well below 1 on CPU); it is reported, not used to drop steps.
    """
    timings = {name: Timing() for name in paths}
    names = list(paths)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            synchronize(device)
            cpu0, t0 = time.process_time(), time.perf_counter()
            paths[name](r)
            synchronize(device)
            wall = time.perf_counter() - t0
            timings[name].wall.append(wall)
            timings[name].cpu_share.append((time.process_time() - cpu0) / wall / max(1, threads))
            if verbose:
                print(f"    round {r} {name:>9s}: {wall:8.3f} s (CPU share {timings[name].cpu_share[-1]:.2f})",
                      flush=True)
    return timings


def paired_ratios(base: Timing, ours: Timing) -> list[float]:
    """base / ours per round: robust to load that drifts over minutes."""
    return [b / o for b, o in zip(base.wall, ours.wall)]


def machine_line(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return f"device {torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"CPU, {threads} threads of {os.cpu_count()} cores, torch {torch.__version__}, load average {load:.1f} "
            "at the start")

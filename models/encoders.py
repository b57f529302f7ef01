"""Frozen pretrained encoders of GR-1 and the CLIP tokenizer.

- :class:`MAEEncoder`: ViT-B/16 with the MAE / timm parameter names; returns the final-normed cls token and patch
  tokens of each image (the reference's ``vit_base(patch_size=16, num_classes=0)``).
- :class:`CLIPTextEncoder`: OpenAI CLIP's text tower, built here (models/layers.py CLIPTransformer) with CLIP's
  parameter names, so OpenAI's weights load strictly (the visual tower, which GR-1 never uses, is not built).
- :func:`tokenize`: OpenAI CLIP's BPE tokenizer (vocabulary shipped with the openai-clip package, works offline).
- :class:`FrozenEncoders`: both encoders, always in eval mode, never trained, outside the trainable checkpoint.

openai-clip is used for its tokenizer only. Its package ``__init__`` imports torchvision and pkg_resources, which the
tokenizer does not need, so the tokenizer's module (``clip/simple_tokenizer.py``) is loaded from the installed package
by path (see _clip_tokenizer_module); tests/test_encoders.py checks that it still gives CLIP's token ids.

Shape letters (README "Architecture"): B batch, N images, S image side, P patches, F MAE width, E CLIP embedding,
W CLIP text width, L context length (77).
"""
from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import nn

from models.layers import Block, CLIPTransformer, FP32LayerNorm

CONTEXT_LENGTH = 77
CLIP_VOCAB_SIZE = 49408


def clip_version() -> str:
    """The installed openai-clip's version (for error messages)."""
    try:
        return importlib.metadata.version("openai-clip")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _clip_tokenizer_module() -> ModuleType:
    """``clip.simple_tokenizer`` from the openai-clip package, without running the package's __init__."""
    alias = "_gr1_openai_clip_simple_tokenizer"
    if alias in sys.modules:
        return sys.modules[alias]
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("openai-clip is not installed: pip install -r requirements.txt")
    path = os.path.join(list(spec.submodule_search_locations)[0], "simple_tokenizer.py")
    if not os.path.isfile(path):
        raise ImportError(f"openai-clip {clip_version()} has no clip/simple_tokenizer.py (the tokenizer moved): "
                          "install the version in requirements.txt")
    module_spec = importlib.util.spec_from_file_location(alias, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "SimpleTokenizer"):
        raise ImportError(f"openai-clip {clip_version()}: clip/simple_tokenizer.py has no SimpleTokenizer: install "
                          "the version in requirements.txt")
    sys.modules[alias] = module
    return module


_TOKENIZER = None


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """CLIP token ids, int32 (N, L): <start>, BPE tokens, <end>, zero padding. Equal to clip.tokenize."""
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = _clip_tokenizer_module().SimpleTokenizer()
    texts = [texts] if isinstance(texts, str) else list(texts)
    sot, eot = _TOKENIZER.encoder["<|startoftext|>"], _TOKENIZER.encoder["<|endoftext|>"]
    result = torch.zeros(len(texts), context_length, dtype=torch.int32)
    for i, text in enumerate(texts):
        tokens = [sot] + _TOKENIZER.encode(text) + [eot]
        if len(tokens) > context_length:
            raise ValueError(f"instruction is {len(tokens)} CLIP tokens, more than {context_length}: {text!r}")
        result[i, :len(tokens)] = torch.tensor(tokens, dtype=torch.int32)
    return result


class MAEEncoder(nn.Module):
    """ViT image encoder: (N, 3, S, S) -> normed cls (N, F) and normed patch tokens (N, P, F)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12):
        super().__init__()
        num_patches = (img_size // patch_size) ** 2
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, eps=1e-6) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)  # (N, P, F)
        if x.shape[1] + 1 != self.pos_embed.shape[1]:
            raise ValueError(f"MAE expects {self.pos_embed.shape[1] - 1} patches per image, got {x.shape[1]}: "
                             "rgb_shape must match the MAE checkpoint's image size")
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed  # (N, 1 + P, F)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x[:, 0], x[:, 1:]


class CLIPTextEncoder(nn.Module):
    """OpenAI CLIP text tower: token ids (B, L) -> text embedding (B, E) at each sequence's end token.

    Modules are created in the order of CLIP's model.CLIP (transformer, token embedding, positional embedding,
    ln_final, text projection), so a seeded random init is the one CLIP's classes give (tests/test_encoders.py)."""

    def __init__(self, embed_dim: int = 512, width: int = 512, layers: int = 12, heads: int = 8,
                 context_length: int = CONTEXT_LENGTH, vocab_size: int = CLIP_VOCAB_SIZE):
        super().__init__()
        self.transformer = CLIPTransformer(width, layers, heads)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.ln_final = FP32LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def half_as_clip(self) -> CLIPTextEncoder:
        """fp16 as clip.load gives the model on CUDA (openai-clip's convert_weights): the weights of the linear and
        attention layers and the text projection in fp16; the LayerNorms, the token and positional embeddings stay in
        fp32 (the LayerNorms compute in fp32)."""
        for m in self.modules():
            tensors = ["weight", "bias"] if isinstance(m, nn.Linear) else []
            if isinstance(m, nn.MultiheadAttention):
                tensors = ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                           "bias_k", "bias_v"]
            for name in tensors:
                tensor = getattr(m, name, None)
                if tensor is not None:
                    tensor.data = tensor.data.half()
        self.text_projection.data = self.text_projection.data.half()
        return self

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        dtype = self.text_projection.dtype  # CLIP's: its blocks run in the dtype of its matmul weights
        x = self.token_embedding(tokens).type(dtype) + self.positional_embedding.type(dtype)  # (B, L, W)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # CLIP's blocks are sequence-first
        x = self.ln_final(x).type(dtype)
        return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ self.text_projection  # (B, E)


class FrozenEncoders(nn.Module):
    """MAE image encoder and CLIP text encoder, frozen: eval mode, no gradients, not in trained checkpoints.

    Text embeddings are cached per instruction (CALVIN has a few hundred distinct ones) because the weights never
    change; the cache is keyed by token ids and lives on the encoders' device.

    The MAE runs under torch.inference_mode (no autograd bookkeeping at all). Under autocast to a lower precision
    (bf16 mixed-precision training on GPU) it runs a copy whose Linear / Conv2d weights are stored in that precision:
    autocast would cast the frozen fp32 weights to the same values at every call (it caches casts only for weights
    that require grad), so the features are the same, without the casts.
    """

    def __init__(self, mae: MAEEncoder, clip_text: CLIPTextEncoder, text_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.mae = mae
        if text_dtype not in (torch.float32, torch.float16):
            raise ValueError(f"CLIP's text tower runs in fp32 or fp16 (as clip.load gives it), not {text_dtype}")
        self.clip_text = clip_text.half_as_clip() if text_dtype == torch.float16 else clip_text
        self.requires_grad_(False)
        self.eval()
        self._text_cache: dict[bytes, torch.Tensor] = {}
        self._cast_mae: dict[tuple, MAEEncoder] = {}  # at most one: (dtype, weights' versions) -> cast copy

    def train(self, mode: bool = True) -> FrozenEncoders:
        return super().train(False)  # frozen encoders never switch to training mode

    def _apply(self, fn, recurse=True):
        self._text_cache, self._cast_mae = {}, {}  # moved or cast: cached embeddings and copies are stale
        return super()._apply(fn, recurse)

    def _image_encoder(self) -> MAEEncoder:
        """The MAE, or under autocast to another dtype its copy with matmul weights stored in that dtype (made once,
        and again if the MAE's weights are loaded or changed in place)."""
        device_type = self.mae.pos_embed.device.type
        if not torch.is_autocast_enabled(device_type):
            return self.mae
        dtype = torch.get_autocast_dtype(device_type)
        if dtype == self.mae.pos_embed.dtype:
            return self.mae
        key = (dtype, sum(p._version for p in self.mae.parameters()))
        if key not in self._cast_mae:
            cast = copy.deepcopy(self.mae)
            for module in cast.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)):  # what autocast runs in `dtype`; norms stay fp32
                    module.to(dtype)
            self._cast_mae = {key: cast}
        return self._cast_mae[key]

    def encode_frames(self, images: dict[str, torch.Tensor], frame_mask: torch.Tensor | None = None
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """images[cam] (B, T, 3, S, S) -> features[cam] = (cls (B, T, F), patches (B, T, P, F)).

        All cameras go through the MAE in one batch. With frame_mask (B, T), padded frames are not encoded (their
        features are zero): GR-1 hides padded frames' tokens from every other token, so this changes no output.
        A frame_mask on the host (while the images are on a GPU) chooses the frames without waiting for the device.
        """
        mae = self._image_encoder()
        with torch.inference_mode():
            cams = list(images)
            B, T = images[cams[0]].shape[:2]
            flat = torch.cat([images[c].flatten(0, 1) for c in cams])  # (n_cams B T, 3, S, S)
            valid = None if frame_mask is None else (frame_mask.flatten() > 0).repeat(len(cams))
            if valid is None or bool(valid.all()):
                cls, patches = mae(flat)
            else:
                index = valid.nonzero()[:, 0]  # (N,) frames to encode
                if index.device != flat.device:
                    index = (index.pin_memory() if flat.is_cuda else index).to(flat.device, non_blocking=True)
                cls_v, patches_v = mae(flat.index_select(0, index))
                cls = cls_v.new_zeros((flat.shape[0],) + cls_v.shape[1:])
                patches = patches_v.new_zeros((flat.shape[0],) + patches_v.shape[1:])
                cls[index], patches[index] = cls_v, patches_v
            cls, patches = cls.unflatten(0, (len(cams), B, T)), patches.unflatten(0, (len(cams), B, T))
        if torch.is_grad_enabled():  # the trainable layers save their inputs for backward: inference tensors can't be
            cls, patches = cls.clone(), patches.clone()
        return {c: (cls[i], patches[i]) for i, c in enumerate(cams)}

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor, cache: bool = True) -> torch.Tensor:
        """(B, L) token ids -> (B, E) float32 L2-normalised CLIP embeddings (as GR1-Training normalises them).

        cache=False recomputes every row (what GR1-Training does; used by the reference-style benchmark path)."""
        if not cache:
            return self._embed(tokens)
        keys = [row.tobytes() for row in tokens.detach().to("cpu", torch.int32).numpy()]
        missing = sorted({k for k in keys if k not in self._text_cache})
        if len(self._text_cache) + len(missing) > 65536:  # bound memory for pathological inputs
            self._text_cache = {}
        for key in missing:
            # One instruction at a time: a batched matmul's rounding depends on the batch, so an embedding computed
            # alongside others would depend on which batch met the instruction first, and a resumed run (empty
            # cache) would differ from an uninterrupted one in the last bits.
            row = keys.index(key)
            self._text_cache[key] = self._embed(tokens[row:row + 1])[0]
        return torch.stack([self._text_cache[k] for k in keys])

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.clip_text.positional_embedding.device)  # token ids may come from the host
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            emb = self.clip_text(tokens.long())
            # Faithful to GR1-Training: divide by (norm + 1e-6) in CLIP's dtype, then cast to float.
            return (emb / (emb.norm(dim=1, keepdim=True) + 1e-6)).float()

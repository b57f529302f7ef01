"""Small layers no maintained library gives with GR-1's exact numbers and parameter names.

- :class:`Block`: pre-norm ViT block with the timm / MAE parameter names (``norm1, attn.qkv, attn.proj, norm2,
  mlp.fc1, mlp.fc2``), used by the MAE image encoder and GR-1's pixel decoder.
- :class:`PerceiverResampler`: flamingo-pytorch's resampler with its parameter names (``latents, media_pos_emb,
  layers.<i>.0.*`` attention, ``layers.<i>.1.*`` feed-forward, ``norm``).
- :class:`CLIPTransformer`: OpenAI CLIP's text transformer with its parameter names (``resblocks.<i>.attn.*``
  (torch's MultiheadAttention), ``ln_1, mlp.c_fc, mlp.c_proj, ln_2``), built from the same torch modules in the same
  order, so CLIP's weights load strictly, compute the same numbers and a seeded random init is the same.
- :func:`sincos_pos_embed_2d`: MAE's fixed 2-D sin-cos position table.

Shape letters (README "Architecture"): B batch, L tokens, W width, H heads, d head size, Q latents.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, exact: bool) -> torch.Tensor:
    """Softmax attention over the last two dims of (B, H, L, d) tensors, no mask.

    exact=True computes softmax((q @ k^T) * scale) @ v in that order, bit-identical to the reference ViT;
    exact=False uses PyTorch's fused scaled_dot_product_attention (same maths, different rounding, faster).
    """
    if exact:
        attn = (q @ k.transpose(-2, -1)) * scale
        return attn.softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.exact = False  # set by the owner: True reproduces the reference's rounding bit for bit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, W = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, W // self.num_heads).permute(2, 0, 3, 1, 4)
        out = attention(qkv[0], qkv[1], qkv[2], self.scale, self.exact)  # (B, H, L, d)
        return self.proj(out.transpose(1, 2).reshape(B, L, W))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)). No dropout (none is used)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PerceiverAttention(nn.Module):
    """Latents attend to concat(media, latents); flamingo-pytorch's parameter names and operation order."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.scale = dim_head ** -0.5
        self.heads = heads
        inner = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """media (B, P, F) MAE patch tokens, latents (B, Q, F) -> (B, Q, F)."""
        media = self.norm_media(media)
        latents = self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((media, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, H, *, d)
        sim = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, Q, P + Q)
        # Faithful to flamingo-pytorch: max-subtraction before softmax (changes rounding, not the maths).
        attn = (sim - sim.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).flatten(-2)  # (B, Q, H * d)
        return self.to_out(out)


class PerceiverResampler(nn.Module):
    """(B, P, F) patch tokens of one image -> (B, Q, F) latents. One media embedding (one image per call)."""

    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, num_latents: int, ff_mult: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.media_pos_emb = nn.Parameter(torch.randn(1, 1, dim))
        self.layers = nn.ModuleList([
            nn.ModuleList([
                PerceiverAttention(dim, dim_head, heads),
                nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),
                              nn.Linear(dim * ff_mult, dim, bias=False)),
            ])
            for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        media = media + self.media_pos_emb[0]  # (B, P, F)
        latents = self.latents.expand(media.shape[0], -1, -1)  # (B, Q, F)
        for attn, ff in self.layers:
            latents = attn(media, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)


class FP32LayerNorm(nn.LayerNorm):
    """CLIP's LayerNorm: computed in float32 whatever the input's dtype, returned in the input's dtype (CLIP's text
    tower runs in fp16 on CUDA, as clip.load gives it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    """CLIP's activation x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class CLIPResidualBlock(nn.Module):
    """CLIP's text block, sequence-first (L, B, W): x + attn(ln_1(x)) under a causal mask, then x + mlp(ln_2(x)).

    Modules are created in CLIP's order (attention, ln_1, c_fc, c_proj, ln_2), so a seeded random init draws the same
    numbers as CLIP's own class."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = FP32LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = FP32LayerNorm(width)

    def forward(self, x: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=causal_mask)[0]
        return x + self.mlp(self.ln_2(x))


class CLIPTransformer(nn.Module):
    """CLIP's text transformer: (L, B, W) -> (L, B, W), each token attending to itself and the tokens before it."""

    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList([CLIPResidualBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = x.shape[0]
        # Made per call rather than held as a buffer: CLIP's files hold no mask (not even in a TorchScript archive,
        # which would keep a non-persistent buffer), and text embeddings are computed once per instruction anyway.
        causal_mask = torch.full((L, L), float("-inf"), dtype=x.dtype, device=x.device).triu_(1)  # (L, L)
        for block in self.resblocks:
            x = block(x, causal_mask)
        return x


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table, (grid_size**2, dim) float32; the first half of dim encodes the column."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    coords = np.arange(grid_size, dtype=np.float32)
    grid_w, grid_h = np.meshgrid(coords, coords)  # Faithful to MAE: the width coordinate comes first

    def one_axis(pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=float) / (dim / 4.0))  # (dim/4,)
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (grid_size**2, dim/2)

    table = np.concatenate([one_axis(grid_w), one_axis(grid_h)], axis=1)
    return torch.from_numpy(table).float()

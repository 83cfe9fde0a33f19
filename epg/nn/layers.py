"""Transformer building blocks shared by the encoder and decoder (METHOD.md §2.1–§2.2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm32(nn.LayerNorm):
    """Affine LayerNorm computed in fp32 that returns the input dtype (METHOD.md §2.1, §2.2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def timestep_embedding(c_noise: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [cos(c·f), sin(c·f)], f_k = exp(-ln(1e4)·k/(D/2)), no MLP (METHOD.md §1.6)."""
    half = dim // 2
    k = torch.arange(half, device=c_noise.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(10000.0) * k / half)
    args = c_noise.float().reshape(-1, 1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention through SDPA: no qkv bias, output projection with bias (METHOD.md §2.1)."""

    def __init__(self, dim: int, num_heads: int, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        # The decoder's only dropout sits on the attention output (METHOD.md §2.2, 0.5 for the CM).
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class Mlp(nn.Module):
    """Two-layer MLP with exact GELU, hidden width ratio·D (METHOD.md §2.1)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm ViT block: x += MHA(LN(x)); x += MLP(LN(x)) (METHOD.md §2.1)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = LayerNorm32(dim, eps=1e-5)
        self.attn = Attention(dim, num_heads)
        self.norm2 = LayerNorm32(dim, eps=1e-5)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def xavier_init_linears(module: nn.Module, split_qkv: bool = False) -> None:
    """Xavier-uniform weights, zero biases for every Linear (METHOD.md §2.3).

    With ``split_qkv`` (the stage-1 encoder) the fused qkv weight takes the bound of separate D×D matrices,
    U(±√(6/(2D))); the stage-2 rule is plain Xavier on every Linear.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    if not split_qkv:
        return
    for m in module.modules():
        if isinstance(m, Attention):
            dim = m.qkv.in_features
            bound = math.sqrt(6.0 / (2 * dim))
            nn.init.uniform_(m.qkv.weight, -bound, bound)

"""Transformer building blocks shared by the encoder and decoder (method.md §2.1–§2.2).

The encoder's block and patch embedding, and the attention, MLP and fp32 LayerNorm of encoder and decoder, are timm's:
with no qkv bias and a LayerNorm of eps 1e-5 they have the official state-dict keys and give the outputs of the
layers they replaced bit for bit (tests/test_nn_layers.py keeps those as the reference). The decoder's adaLN block
stays ours (epg/nn/decoder.py says why).
"""

from __future__ import annotations

import math

import torch
from timm.layers import Attention, LayerNormFp32, Mlp, PatchEmbed
from timm.models.vision_transformer import Block as TimmBlock
from torch import nn

__all__ = [
    "Attention",
    "Block",
    "LayerNorm32",
    "Mlp",
    "PatchEmbed",
    "make_attention",
    "timestep_embedding",
    "xavier_init_linears",
]


class LayerNorm32(LayerNormFp32):
    """Affine LayerNorm computed in fp32 that returns the input dtype, eps 1e-5 (method.md §2.1, §2.2)."""

    def __init__(self, dim: int, eps: float = 1e-5, **kwargs) -> None:
        super().__init__(dim, eps=eps, **kwargs)  # timm's default eps is 1e-6; the official model's is PyTorch's


def timestep_embedding(c_noise: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [cos(c·f), sin(c·f)], f_k = exp(-ln(1e4)·k/(D/2)), no MLP (method.md §1.6)."""
    half = dim // 2
    k = torch.arange(half, device=c_noise.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(10000.0) * k / half)
    args = c_noise.float().reshape(-1, 1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def make_attention(dim: int, num_heads: int, proj_drop: float = 0.0) -> Attention:
    """timm's multi-head self-attention: no qkv bias, output projection with bias, dropout after it (method.md §2.1)."""
    _check_heads(dim, num_heads)
    return _always_sdpa(Attention(dim, num_heads, qkv_bias=False, proj_drop=proj_drop))


class Block(TimmBlock):
    """timm's pre-norm ViT block: x += MHA(LN(x)); x += MLP(LN(x)), fp32 LayerNorms, no dropout (method.md §2.1)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        _check_heads(dim, num_heads)
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias=False, norm_layer=LayerNorm32)
        _always_sdpa(self.attn)


def _check_heads(dim: int, num_heads: int) -> None:
    if dim % num_heads:
        raise ValueError(f"width {dim} is not divisible by {num_heads} heads")


def _always_sdpa(attn: Attention) -> Attention:
    # timm picks SDPA or an explicit softmax from the TIMM_FUSED_ATTN environment variable; keep SDPA.
    attn.fused_attn = True
    return attn


def xavier_init_linears(module: nn.Module, split_qkv: bool = False) -> None:
    """Xavier-uniform weights, zero biases for every Linear (method.md §2.3).

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

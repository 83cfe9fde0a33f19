"""The ViT encoder shared by stage 1 and stage 2 (method.md §2.1)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from epg.nn.layers import Block, LayerNorm32, PatchEmbed, timestep_embedding, xavier_init_linears


class EPGEncoder(nn.Module):
    """ViT on noisy pixels: [CLS]×T + time token + patches, learned absolute positions (method.md §2.1)."""

    def __init__(
        self,
        image_size: int = 256,
        patch_size: int = 16,
        dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        num_cls_tokens: int = 1,
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        self.image_size, self.patch_size, self.dim, self.depth = image_size, patch_size, dim, depth
        self.num_cls_tokens = num_cls_tokens
        self.num_patches = (image_size // patch_size) ** 2
        self.num_prefix = num_cls_tokens + 1  # CLS tokens + the time token
        self.grad_checkpointing = grad_checkpointing
        # timm's conv patchify, kernel = stride = p, 3 → D with bias, tokens row by row (method.md §2.1).
        self.patch_embed = PatchEmbed(image_size, patch_size, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, num_cls_tokens, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + self.num_prefix, dim))
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = LayerNorm32(dim, eps=1e-5)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Stage-1 initialisation (method.md §2.3)."""
        xavier_init_linears(self, split_qkv=True)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        w = self.patch_embed.proj.weight
        bound = math.sqrt(6.0 / (w.shape[1] * w.shape[2] * w.shape[3] + w.shape[0]))
        nn.init.uniform_(w, -bound, bound)
        nn.init.zeros_(self.patch_embed.proj.bias)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(
        self, x_in: torch.Tensor, c_noise: torch.Tensor, cls_cond: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return (final-LN tokens (B, T+1+N, D), per-block outputs before the final LN).

        ``x_in`` is the preconditioned image c_in·x, ``c_noise`` (B,) the noise condition, ``cls_cond`` (B, D) an
        optional class embedding added to every CLS token before the positional embedding (stage 2).
        """
        b = x_in.shape[0]
        patches = self.patch_embed(x_in)
        cls = self.cls_token.expand(b, -1, -1)
        if cls_cond is not None:
            cls = cls + cls_cond.unsqueeze(1).to(cls.dtype)
        temb = timestep_embedding(c_noise.expand(b) if c_noise.ndim == 0 else c_noise, self.dim)
        x = torch.cat([cls, temb.unsqueeze(1).to(patches.dtype), patches], dim=1) + self.pos_embed
        skips = []
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            skips.append(x)
        return self.norm(x), skips

    def representation(self, x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        """h = LN_final(x_L[CLS_0]), the stage-1 feature (method.md §2.1)."""
        tokens, _ = self(x_in, c_noise)
        return tokens[:, 0]

"""The stage-2 decoder: adaLN blocks with U-ViT long skips from the encoder (method.md §2.2)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from epg.nn.layers import LayerNorm32, Mlp, make_attention, xavier_init_linears


class DecoderBlock(nn.Module):
    """Skip fusion LN_s(W_skip·[x; s]) followed by an adaLN-gated transformer block (method.md §2.2).

    Built from timm's attention and MLP, but not on timm's ``Block``: that block has no adaLN modulation or skip
    fusion, and its ``proj_drop`` would also drop inside and after the MLP, where the official decoder drops only
    the attention output.
    """

    def __init__(self, dim: int, enc_dim: int, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0) -> None:
        super().__init__()
        self.skip_linear = nn.Linear(dim + enc_dim, dim)
        self.skip_norm = nn.LayerNorm(dim)
        self.norm1 = LayerNorm32(dim, eps=1e-5)
        self.attn = make_attention(dim, num_heads, proj_drop=drop)
        self.norm2 = LayerNorm32(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(enc_dim, 6 * dim))

    def forward(self, x: torch.Tensor, skip: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = self.skip_norm(self.skip_linear(torch.cat([x, skip], dim=-1)))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class EPGDecoder(nn.Module):
    """Decoder over all encoder tokens; block j takes encoder block L−1−j's output (method.md §2.2)."""

    def __init__(
        self,
        enc_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        patch_size: int,
        grid_size: int,
        num_prefix: int,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        out_chans: int = 3,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.patch_size, self.grid_size, self.num_prefix, self.out_chans = patch_size, grid_size, num_prefix, out_chans
        self.grad_checkpointing = grad_checkpointing
        # Official layout: 'encoder_to_decoder' exists only when the widths differ.
        self.encoder_to_decoder = nn.Linear(enc_dim, dim) if dim != enc_dim else nn.Identity()
        self.decoder_blocks = nn.ModuleList(
            [DecoderBlock(dim, enc_dim, num_heads, mlp_ratio, drop) for _ in range(depth)]
        )
        self.out_norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, patch_size * patch_size * out_chans)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Stage-2 initialisation: Xavier Linears, zero adaLN and output layers (method.md §2.3)."""
        xavier_init_linears(self)
        for block in self.decoder_blocks:
            nn.init.zeros_(block.adaLN_modulation[1].weight)
            nn.init.zeros_(block.adaLN_modulation[1].bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, p·p·C) → (B, C, H, W); token (m, n) fills block (m, n), channels laid out (p_row, p_col, C)."""
        b, g, p, c = tokens.shape[0], self.grid_size, self.patch_size, self.out_chans
        x = tokens.reshape(b, g, g, p, p, c)
        return torch.einsum("bmnpqc->bcmpnq", x).reshape(b, c, g * p, g * p)

    def forward(self, tokens: torch.Tensor, skips: list[torch.Tensor], c: torch.Tensor) -> torch.Tensor:
        """Map final-LN encoder tokens, per-block encoder outputs and the condition c (B, D) to an image."""
        if len(skips) != len(self.decoder_blocks):
            raise ValueError(f"decoder has {len(self.decoder_blocks)} blocks but got {len(skips)} encoder skips")
        x = self.encoder_to_decoder(tokens)
        for block, skip in zip(self.decoder_blocks, reversed(skips), strict=True):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, skip, c, use_reentrant=False)
            else:
                x = block(x, skip, c)
        x = self.out(self.out_norm(x[:, self.num_prefix :]))
        return self.unpatchify(x)

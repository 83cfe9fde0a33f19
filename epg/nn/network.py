"""Whole networks: the stage-2 generator F(x_in, c_noise, y) and the stage-1 representation model (method.md §2)."""

from __future__ import annotations

import torch
from torch import nn

from epg.nn.decoder import EPGDecoder
from epg.nn.encoder import EPGEncoder
from epg.nn.heads import Projector
from epg.nn.layers import timestep_embedding
from epg.nn.presets import EPGConfig, get_config


def build_encoder(cfg: EPGConfig) -> EPGEncoder:
    """The encoder of a config (method.md §2.1)."""
    return EPGEncoder(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        dim=cfg.enc_dim,
        depth=cfg.enc_depth,
        num_heads=cfg.enc_heads,
        num_cls_tokens=cfg.num_cls_tokens,
        mlp_ratio=cfg.mlp_ratio,
        grad_checkpointing=cfg.grad_checkpointing,
    )


class EPGNetwork(nn.Module):
    """Stage-2 network F_θ(c_in·x, c_noise, y): encoder + decoder + shared class table (method.md §2.1–§2.3)."""

    def __init__(self, cfg: EPGConfig) -> None:
        super().__init__()
        if cfg.dec_depth != cfg.enc_depth:
            raise ValueError(
                f"dec_depth {cfg.dec_depth} must equal enc_depth {cfg.enc_depth}: each decoder block takes one skip"
            )
        self.config = cfg
        self.encoder = build_encoder(cfg)
        self.decoder = EPGDecoder(
            enc_dim=cfg.enc_dim,
            dim=cfg.dec_dim,
            depth=cfg.dec_depth,
            num_heads=cfg.dec_heads,
            patch_size=cfg.patch_size,
            grid_size=cfg.image_size // cfg.patch_size,
            num_prefix=self.encoder.num_prefix,
            mlp_ratio=cfg.mlp_ratio,
            drop=cfg.drop,
            grad_checkpointing=cfg.grad_checkpointing,
        )
        # Row num_classes is the null label used for classifier-free guidance (method.md §2.1).
        self.class_embed = nn.Embedding(cfg.num_classes + 1, cfg.enc_dim) if cfg.num_classes else None
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)

    @property
    def null_label(self) -> int | None:
        """Label index of the unconditional (dropped) class, or None for an unconditional network."""
        return self.config.num_classes if self.class_embed is not None else None

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Raw output F for preconditioned input ``x_in``; ``y`` (B,) int labels (null label = num_classes)."""
        if c_noise.ndim == 0:
            c_noise = c_noise.expand(x_in.shape[0])
        e = None
        if self.class_embed is not None:
            if y is None:
                raise ValueError("this network is class-conditional: pass labels y (use the null label for none)")
            e = self.class_embed(y)
        tokens, skips = self.encoder(x_in, c_noise, cls_cond=e)
        c = timestep_embedding(c_noise, self.config.enc_dim)
        if e is not None:
            c = c + e
        return self.decoder(tokens, skips, c)


class EPGRepresentation(nn.Module):
    """Stage-1 model: encoder + projector; returns (z = g(h), h) (method.md §2.1)."""

    def __init__(self, cfg: EPGConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = build_encoder(cfg)
        self.projection_head = Projector(cfg.enc_dim, cfg.proj_hidden, cfg.proj_out)

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if c_noise.ndim == 0:
            c_noise = c_noise.expand(x_in.shape[0])
        h = self.encoder.representation(x_in, c_noise)
        return self.projection_head(h), h


def build_network(preset: str | EPGConfig, **overrides) -> EPGNetwork:
    """The raw stage-2 network F(x_in, c_noise, y) of a preset, e.g. ``build_network("EPG-XL/16")``."""
    return EPGNetwork(get_config(preset, **overrides))


def build_representation(preset: str | EPGConfig, **overrides) -> EPGRepresentation:
    """The stage-1 encoder + projector of a preset (its encoder part), e.g. ``build_representation("RCM-B/16")``."""
    return EPGRepresentation(get_config(preset, **overrides))

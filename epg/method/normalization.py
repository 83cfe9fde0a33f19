"""Pixel normalisations of method.md §1.1 and their inverses."""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("imagenet", "simple")


def _check(mode: str) -> None:
    if mode not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {mode!r}: choose one of {NORMALIZATIONS}")


def _stats(mode: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, scale) so that x = (u - mean) / scale, shaped to broadcast over (..., C, H, W)."""
    if mode == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN, dtype=like.dtype, device=like.device)
        scale = 2 * torch.tensor(IMAGENET_STD, dtype=like.dtype, device=like.device)
    else:
        mean = torch.full((3,), 0.5, dtype=like.dtype, device=like.device)
        scale = torch.full((3,), 0.5, dtype=like.dtype, device=like.device)
    return mean.view(3, 1, 1), scale.view(3, 1, 1)


def normalize(u: torch.Tensor, mode: str = "imagenet") -> torch.Tensor:
    """Map pixels u in [0, 1] (channels at dim -3) to model space (§1.1): (u - μ)/(2s) or 2u - 1."""
    _check(mode)
    mean, scale = _stats(mode, u)
    return (u - mean) / scale


def denormalize(x: torch.Tensor, mode: str = "imagenet") -> torch.Tensor:
    """Inverse of :func:`normalize` (§1.1: u = x·2s + μ), not clamped."""
    _check(mode)
    mean, scale = _stats(mode, x)
    return x * scale + mean


def to_uint8(x: torch.Tensor, mode: str = "imagenet") -> torch.Tensor:
    """Model-space images (B, 3, H, W) to uint8 NHWC, clamped to [0, 255] and rounded (§6.1 output)."""
    u = denormalize(x.float(), mode).clamp(0, 1)
    return (u * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()

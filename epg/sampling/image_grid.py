"""The one sample-grid maker: FinetuneModule's logged grid, the demo's class grid PNG and InLoopFID's grid.

:func:`sample_grid` samples images 0…n−1 with per-image noise fixed by (settings.seed, i) (as the generate loop,
method.md §6) and labels either cycling over the classes or ``per_class`` rows of one class each, and tiles them;
:func:`pick_grid` tiles a spread of already-sampled uint8 images (InLoopFID's samples). Both tile with
:func:`tile` (torchvision's make_grid, 2 px padding), so a grid looks the same wherever it is made.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from epg.method.normalization import denormalize
from epg.sampling.generate import SampleSettings, sample_indices


def tile(pixels: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """A (3, H, W) grid of float images (N, 3, h, w) in [0, 1]; ``nrow`` per row (default ⌈√N⌉)."""
    from torchvision.utils import make_grid

    return make_grid(pixels, nrow=nrow or math.ceil(math.sqrt(len(pixels))), padding=2)


def grid_labels(count: int, num_classes: int | None, per_class: int | None = None) -> torch.Tensor | None:
    """Labels of grid images 0…count−1: i mod C, or class i // per_class (rows of one class); None unconditional."""
    if not num_classes:
        return None
    if per_class:
        return torch.arange(count) // per_class % num_classes
    return torch.arange(count) % num_classes


@torch.no_grad()
def sample_grid(
    denoiser: nn.Module,
    settings: SampleSettings,
    count: int,
    normalization: str = "imagenet",
    per_class: int | None = None,
    nrow: int | None = None,
) -> torch.Tensor:
    """A (3, H, W) grid in [0, 1] on the CPU of ``count`` samples of an eval-mode denoiser.

    Image i starts from noise fixed by (settings.seed, i); its label is i mod C, or i // ``per_class`` (so each
    row of ``nrow = per_class`` shows one class). Unlike the generate loop the pixels are not rounded to uint8.
    """
    labels = grid_labels(count, settings.num_classes or denoiser.null_label, per_class)
    x = sample_indices(denoiser, range(count), labels, settings)
    pixels = denormalize(x.float(), normalization).clamp(0, 1).cpu()
    return tile(pixels, nrow or per_class)


def pick_grid(images: torch.Tensor, count: int) -> torch.Tensor:
    """A (3, H, W) grid in [0, 1] of up to ``count`` uint8 images (N, H, W, 3) spread evenly over the N."""
    picks = np.linspace(0, len(images) - 1, min(count, len(images))).round().astype(int)
    chosen = images[torch.from_numpy(picks)].permute(0, 3, 1, 2).float() / 255
    return tile(chosen)

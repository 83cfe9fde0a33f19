"""Per-image noise and labels that depend only on (seed, index), so resumed or split runs make the same images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

LABEL_MODES = ("balanced", "random")


def image_seeds(seed: int, index: int) -> tuple[int, int, int]:
    """Independent seeds for image ``index``'s initial noise, random label and in-loop sampler noise."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed {seed} and index {index} must be non-negative")
    noise, label, loop = np.random.SeedSequence([seed, index]).generate_state(3)
    return int(noise), int(label), int(loop)


def image_noise(seed: int, indices: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Standard normal z of ``shape`` per image, drawn on the CPU (identical on every device), stacked."""
    gens = [torch.Generator().manual_seed(image_seeds(seed, i)[0]) for i in indices]
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in gens])


def loop_generators(seed: int, indices: Sequence[int], device: torch.device | str) -> list[torch.Generator]:
    """One generator per image on ``device`` for the noise a stochastic sampler draws inside its loop."""
    return [torch.Generator(device=device).manual_seed(image_seeds(seed, i)[2]) for i in indices]


def class_labels(indices: Sequence[int], num: int, num_classes: int, mode: str, seed: int) -> np.ndarray:
    """Labels of images ``indices`` out of ``num`` (METHOD.md §6.4).

    ``balanced``: image i gets class ⌊i·C/num⌋, i.e. num/C consecutive images per class in class order (exact when C
    divides num, else counts differ by at most one). ``random``: uniform over the C classes, seeded per image; the
    official code draws from the training set's class frequencies, which for ImageNet are close to uniform.
    """
    if mode not in LABEL_MODES:
        raise ValueError(f"unknown label mode {mode!r}: choose one of {LABEL_MODES}")
    idx = np.asarray(indices, dtype=np.int64)
    if mode == "balanced":
        return idx * num_classes // num
    return np.array([np.random.default_rng(image_seeds(seed, int(i))[1]).integers(num_classes) for i in idx], np.int64)

"""Per-image noise and labels that depend only on (seed, index), so resumed or split runs make the same images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from epg.io import seed_words

LABEL_MODES = ("balanced", "random")


def image_seeds(seed: int, index: int) -> tuple[int, int, int]:
    """Independent seeds for image ``index``'s initial noise, random label and in-loop sampler noise."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed {seed} and index {index} must be non-negative")
    noise, label, loop = seed_words(seed, index, count=3)  # numpy's SeedSequence([seed, index]), three uint32 words
    return int(noise), int(label), int(loop)


def image_noise(seed: int, indices: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Standard normal z of ``shape`` per image, drawn on the CPU (identical on every device), stacked."""
    gens = [torch.Generator().manual_seed(image_seeds(seed, i)[0]) for i in indices]
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in gens])


def loop_generators(seed: int, indices: Sequence[int], device: torch.device | str) -> list[torch.Generator]:
    """One generator per image on ``device`` for the noise a stochastic sampler draws inside its loop."""
    return [torch.Generator(device=device).manual_seed(image_seeds(seed, i)[2]) for i in indices]


def class_labels(
    indices: Sequence[int],
    num: int,
    num_classes: int,
    mode: str,
    seed: int,
    class_counts: Sequence[int] | None = None,
) -> np.ndarray:
    """Labels of images ``indices`` out of ``num`` (method.md §6.4).

    ``balanced``: image i gets class ⌊i·C/num⌋, i.e. num/C consecutive images per class in class order (exact when C
    divides num, else counts differ by at most one). ``random``: one draw per image seeded by (seed, i), from the
    training set's class frequencies ``class_counts`` (C counts in label order; the official sampler draws from the
    class counts of its training data) or, when None, uniformly over the C classes.
    """
    if mode not in LABEL_MODES:
        raise ValueError(f"unknown label mode {mode!r}: choose one of {LABEL_MODES}")
    idx = np.asarray(indices, dtype=np.int64)
    if mode == "balanced":
        return idx * num_classes // num
    rngs = [np.random.default_rng(image_seeds(seed, int(i))[1]) for i in idx]
    if class_counts is None:
        return np.array([rng.integers(num_classes) for rng in rngs], np.int64)
    counts = np.asarray(class_counts, dtype=np.int64)
    if counts.shape != (num_classes,) or (counts < 0).any() or counts.sum() == 0:
        raise ValueError(
            f"class_counts must be {num_classes} non-negative counts (one per class, not all 0), got {counts.tolist()}"
        )
    # Draw one of the N training images uniformly and take its class: P(c) = counts[c] / N exactly.
    edges = np.cumsum(counts)
    draws = np.array([rng.integers(edges[-1]) for rng in rngs], np.int64)
    return np.searchsorted(edges, draws, side="right").astype(np.int64)

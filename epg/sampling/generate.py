"""The one generate loop: images i of N from noise and labels fixed by (seed, i) (method.md §6, §6.4, §8).

`epg sample`, `epg predict`, `epg fid sweep`, the in-loop FID and the demo all turn indices into images here, with
the settings that decide them travelling as one :class:`SampleSettings`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from epg.method.normalization import to_uint8
from epg.sampling.entry import sample
from epg.sampling.guidance import Guidance
from epg.sampling.per_image import class_labels, image_noise, loop_generators


@dataclass(frozen=True)
class SampleSettings:
    """Everything besides the network that decides image i (method.md §6): sampler, guidance, labels, seed, ….

    ``num_classes`` is the number of classes labels are drawn from (None: the network's; no labels for an
    unconditional network); ``class_counts`` are the training frequencies of random labels (None: uniform, §6.4);
    ``options`` go to the sampler (``append_zero``, ``s_churn``, ``sigma_mid``, …); ``autocast`` None samples in fp32.
    """

    sampler: str = "heun"
    steps: int | None = None
    guidance: float | Guidance | None = None
    labels: str = "balanced"
    seed: int = 0
    clamp: float | None = 1.0
    autocast: torch.dtype | None = None
    num_classes: int | None = None
    class_counts: Sequence[int] | None = None
    options: Mapping[str, object] = field(default_factory=dict)


def image_labels(denoiser: nn.Module, indices: Sequence[int], num: int, settings: SampleSettings) -> np.ndarray | None:
    """Class labels of images ``indices`` out of ``num`` (method.md §6.4); None for an unconditional network."""
    num_classes = settings.num_classes or denoiser.null_label
    if num_classes is None:
        return None
    return class_labels(indices, num, num_classes, settings.labels, settings.seed, settings.class_counts)


@torch.no_grad()
def sample_indices(
    denoiser: nn.Module, indices: Sequence[int], y: torch.Tensor | None, settings: SampleSettings
) -> torch.Tensor:
    """The sampler's output (B, 3, H, W) for images ``indices`` with labels ``y`` (None: unconditional).

    Image i's initial noise and in-loop sampler noise depend only on (settings.seed, i): the one place where
    indices become samples, for :func:`generate` and the sample grids (:mod:`epg.sampling.image_grid`).
    """
    indices = [int(i) for i in indices]
    device = next(denoiser.parameters()).device
    size = denoiser.image_size
    z = image_noise(settings.seed, indices, (3, size, size)).to(device)
    return sample(
        denoiser,
        z,
        None if y is None else y.to(device),
        sampler=settings.sampler,
        steps=settings.steps,
        guidance=settings.guidance,
        clamp=settings.clamp,
        autocast=settings.autocast,
        generator=loop_generators(settings.seed, indices, device),
        **settings.options,
    )


@torch.no_grad()
def generate(
    denoiser: nn.Module, indices: Sequence[int], num: int, settings: SampleSettings, normalization: str = "imagenet"
) -> torch.Tensor:
    """uint8 images (B, H, W, 3) on the CPU for images ``indices`` out of ``num``, sampled as one batch.

    ``denoiser`` is a :class:`~epg.method.denoiser.Denoiser` in eval mode on its device. Image i's initial noise,
    label and in-loop sampler noise depend only on (seed, i), so any batching, resume or split over devices gives the
    same image (up to the rounding of batched kernels).
    """
    labels = image_labels(denoiser, [int(i) for i in indices], num, settings)
    y = None if labels is None else torch.from_numpy(labels)
    return to_uint8(sample_indices(denoiser, indices, y, settings), normalization).cpu()


def generate_batches(
    denoiser: nn.Module,
    indices: Sequence[int],
    num: int,
    settings: SampleSettings,
    normalization: str = "imagenet",
    batch_size: int = 100,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(indices, uint8 images) per batch of ``batch_size`` of ``indices``, in order (see :func:`generate`)."""
    indices = list(indices)
    for start in range(0, len(indices), batch_size):
        batch = indices[start : start + batch_size]
        yield batch, generate(denoiser, batch, num, settings, normalization)

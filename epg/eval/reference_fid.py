"""FID against fixed reference statistics as a torchmetrics metric, summed over DDP ranks (method.md §8).

torchmetrics' ``FrechetInceptionDistance`` with the Inception of `epg fid`: torch-fidelity's TF-compatible
``inception-v3-compat`` with our offline weights, resizing like the TF graph (TF1 bilinear, so ``antialias=False``;
torchmetrics' default antialiased resize gives other features). Its states are feature sums that torchmetrics'
``compute()`` adds up over the ranks, so each rank feeds only its own share of the samples.

The real side is never fed images: it holds a reference's μ and Σ, written as the sums that n images with those
statistics give (n·μ, (n−1)·Σ + n·μμᵀ, n). Only global rank 0 holds them and the other ranks keep zeros, so the summed
states carry the reference on every rank and every rank computes the same FID.

Against `epg fid calc` on the same images: the same features (same network, weights and resize; IEEE convolutions on
CUDA via :func:`epg.eval.inception.ieee_convolutions` around ``update``) and the same Fréchet distance up to round-off:
torchmetrics takes the eigenvalues of Σ·Σ_ref (2048×2048, float64, result in float32) where `epg fid calc` uses an
exact N×N form for N ≤ 2048 (tests/test_eval_callback.py).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from epg.eval.inception_weights import ensure_inception_weights


class ReferenceFID(FrechetInceptionDistance):
    """FID of uint8 images (B, 3, H, W) fed with ``update(images, real=False)`` against :meth:`set_reference`'s."""

    def __init__(self, weights: str | os.PathLike | None = None, **kwargs) -> None:
        super().__init__(
            feature=2048,
            reset_real_features=False,  # reset() clears the samples only
            feature_extractor_weights_path=str(weights if weights is not None else ensure_inception_weights()),
            antialias=False,
            **kwargs,
        )
        self.orig_dtype = torch.float32  # compute()'s result dtype, else only set by update(): a rank may get no images

    def set_reference(self, mu: np.ndarray | torch.Tensor, sigma: np.ndarray | torch.Tensor, count: int = 2) -> None:
        """Hold the reference's mean (D,) and covariance (D, D) as the real side's sums over ``count`` images."""
        mu = torch.as_tensor(mu, dtype=torch.float64, device=self.device)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=self.device)
        if mu.shape != self.real_features_sum.shape or sigma.shape != self.real_features_cov_sum.shape:
            raise ValueError(f"reference statistics {tuple(mu.shape)}, {tuple(sigma.shape)} are not 2048-d")
        n = max(int(count), 2)  # the statistics do not depend on it; compute() needs at least 2
        self.real_features_sum = n * mu
        self.real_features_cov_sum = (n - 1) * sigma + n * torch.outer(mu, mu)
        self.real_features_num_samples = torch.tensor(n, device=self.device)

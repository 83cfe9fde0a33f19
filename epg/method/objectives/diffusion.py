"""Stage 2a: the diffusion (DM) x0 loss with its σ draw and weights (method.md §4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from epg.method.curriculum import dm_sigma_index
from epg.method.denoiser import Denoiser
from epg.method.noise import SIGMA_DATA, append_dims, karras_sigma
from epg.method.objectives.base import FinetuneLoss, Terms, class_labels, gaussian_like, nonfinite_span

DM_WEIGHTINGS = ("inverse_spacing", "edm", "uniform")
SIGMA_BUCKETS = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)  # unshifted σ edges of the per-bucket loss logs


def dm_loss_weight(index: torch.Tensor, n: int) -> torch.Tensor:
    """w_i = 1/(σ_i − σ_{i+1}) on the unshifted N-grid, σ_N from the formula past its end (method.md §4 step 4)."""
    index = index.to(torch.float64)
    return 1.0 / (karras_sigma(index, n) - karras_sigma(index + 1, n)).to(index.device)


def diffusion_weight(index: torch.Tensor, sigma_shifted: torch.Tensor, weighting: str, n_grid: int) -> torch.Tensor:
    """Per-sample DM loss weight (B,) float32.

    "inverse_spacing": 1/(σ_i − σ_{i+1}) on the unshifted grid (the paper, method.md §4 step 4);
    "edm": EDM's λ = (σ′² + σ_d²)/(σ′·σ_d)² in shifted units (an option for small-budget runs);
    "uniform": 1.
    """
    if weighting == "inverse_spacing":
        return dm_loss_weight(index, n_grid).float()
    if weighting == "edm":
        s = sigma_shifted.double()
        return ((s**2 + SIGMA_DATA**2) / (s * SIGMA_DATA) ** 2).float()
    if weighting == "uniform":
        return torch.ones_like(sigma_shifted, dtype=torch.float32)
    raise ValueError(f"unknown weighting {weighting!r}: choose one of {DM_WEIGHTINGS}")


@dataclass(kw_only=True)
class DiffusionTerms(Terms):
    """One diffusion loss evaluation (``loss``: the batch mean of w·mean_pixels((D − x0)²)) and its per-sample
    diagnostics."""

    weighted: torch.Tensor  # (B,) w·mse
    mse: torch.Tensor  # (B,) unweighted mean squared x0 error
    sigma: torch.Tensor  # (B,) unshifted σ (a grid point)


class DiffusionLoss(FinetuneLoss):
    """The DM x0 loss of method.md §4; the defaults are the paper's.

    Args:
        p_mean, p_std: ln σ ~ N(p_mean, p_std²), unshifted, snapped to the grid (§4 step 2).
        sigma_grid: size N of that Karras grid (1280).
        weighting: "inverse_spacing" (the paper's 1/(σ_i − σ_{i+1})), "edm" or "uniform" (:func:`diffusion_weight`).
    """

    parameterization = "x0"
    sampler = "heun"  # method.md §6.1

    def __init__(
        self,
        p_mean: float = -1.2,
        p_std: float = 1.6,
        sigma_grid: int = 1280,
        weighting: str = "inverse_spacing",
    ) -> None:
        if weighting not in DM_WEIGHTINGS:
            raise ValueError(f"weighting must be one of {DM_WEIGHTINGS}, got {weighting!r}")
        self.p_mean, self.p_std, self.sigma_grid, self.weighting = p_mean, p_std, sigma_grid, weighting

    def __call__(
        self, module: nn.Module, batch: tuple[torch.Tensor, ...], updates: int, generator: torch.Generator
    ) -> DiffusionTerms:
        """The loss of the online denoiser ``module.denoiser()`` on ``batch`` = (x0, y, …) (:meth:`terms`)."""
        return self.terms(module.denoiser(), batch[0], class_labels(module, batch), generator)

    def terms(
        self, denoiser: Denoiser, x0: torch.Tensor, y: torch.Tensor | None, generator: torch.Generator | None = None
    ) -> DiffusionTerms:
        """Log-normal σ snapped to the N-grid, shifted noise, weight per ``weighting`` (method.md §4).

        ``y`` already carries dropped labels (null label) from the data loader; the ``denoiser`` must use "x0" output.
        """
        n_grid = self.sigma_grid
        index = dm_sigma_index(x0.shape[0], self.p_mean, self.p_std, n_grid, generator=generator, device=x0.device)
        sigma = karras_sigma(index, n_grid).to(x0.device)  # unshifted, float64
        sigma_shifted = (denoiser.shift * sigma).float()
        x_noisy = x0 + append_dims(sigma_shifted, x0.ndim) * gaussian_like(x0, generator)
        d = denoiser(x_noisy, sigma_shifted, y)
        mse = (d.float() - x0.float()).square().flatten(1).mean(1)
        weighted = diffusion_weight(index, sigma_shifted, self.weighting, n_grid) * mse
        sigma = sigma.float()
        span = nonfinite_span(weighted, denoiser.shift * sigma)
        return DiffusionTerms(
            loss=weighted.mean(), logs={}, span=span, weighted=weighted, mse=mse.detach(), sigma=sigma
        )

    def details(self, terms: DiffusionTerms) -> dict[str, tuple[torch.Tensor, int]]:
        """The unweighted x0 MSE and the weighted loss per unshifted-σ bucket (:func:`sigma_buckets`)."""
        return {"x0_mse": (terms.mse.mean(), terms.mse.shape[0]), **sigma_buckets(terms.sigma, terms.weighted)}


def sigma_buckets(sigma: torch.Tensor, weighted: torch.Tensor) -> dict[str, tuple[torch.Tensor, int]]:
    """``loss_sigma_<bucket>`` → (mean weighted DM loss, sample count) for the buckets of :data:`SIGMA_BUCKETS`
    present among the unshifted ``sigma`` (syncs with the device)."""
    weighted = weighted.detach()
    edges = torch.tensor(SIGMA_BUCKETS, device=sigma.device, dtype=sigma.dtype)
    bucket = torch.bucketize(sigma, edges)
    names = [f"lt{SIGMA_BUCKETS[0]:g}"]
    names += [f"{lo:g}-{hi:g}" for lo, hi in zip(SIGMA_BUCKETS[:-1], SIGMA_BUCKETS[1:], strict=True)]
    names += [f"ge{SIGMA_BUCKETS[-1]:g}"]
    out = {}
    for i in bucket.unique().tolist():
        mask = bucket == i
        out[f"loss_sigma_{names[i]}"] = (weighted[mask].mean(), int(mask.sum()))
    return out


@torch.no_grad()
def denoising_mse(
    denoiser: Denoiser, x0: torch.Tensor, y: torch.Tensor | None, sigma: float, noise: torch.Tensor
) -> torch.Tensor:
    """Per-sample MSE (B,) of D(x0 + σ′·noise, σ′) against x0 at unshifted level ``sigma`` (validation metric)."""
    sigma_shifted = torch.full((x0.shape[0],), denoiser.shift * sigma, device=x0.device, dtype=torch.float32)
    d = denoiser(x0 + denoiser.shift * sigma * noise, sigma_shifted, y)
    return (d.float() - x0.float()).square().flatten(1).mean(1)

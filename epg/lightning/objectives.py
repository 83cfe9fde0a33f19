"""Stage-2 losses as plain functions of networks and tensors: diffusion (METHOD.md §4) and ECT consistency (§5)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from epg.method.curriculum import dm_loss_weight, dm_sigma_index, ect_sample_tr
from epg.method.denoiser import Denoiser
from epg.method.losses import gather_local_first, info_nce, pseudo_huber
from epg.method.noise import SIGMA_DATA, append_dims, c_in, c_noise, karras_sigma

LOSS_WEIGHTINGS = ("inverse_spacing", "edm", "uniform")
CM_WEIGHTINGS = ("inverse_gap", "inverse_gap_scaled")


@dataclass
class DiffusionTerms:
    """One diffusion loss evaluation: the scalar to minimise and per-sample diagnostics."""

    loss: torch.Tensor  # scalar: mean over the batch of w·mean_pixels((D − x0)²)
    weighted: torch.Tensor  # (B,) w·mse
    mse: torch.Tensor  # (B,) unweighted mean squared x0 error
    sigma: torch.Tensor  # (B,) unshifted σ (a 1280-grid point)


@dataclass
class ConsistencyTerms:
    """One ECT loss evaluation: the scalar to minimise and per-sample diagnostics."""

    loss: torch.Tensor  # scalar: mean over the batch of w·ℓ + aux_weight·ℓ_aux
    consistency: torch.Tensor  # (B,) w·ℓ (pseudo-Huber metric times 1/(t′ − r′))
    aux: torch.Tensor  # (B,) InfoNCE of the frozen stage-1 features (zeros when there is no aux net)
    weight: torch.Tensor  # (B,) 1/(t′ − r′), 0 where t′ = r′
    t: torch.Tensor  # (B,) unshifted t
    r: torch.Tensor  # (B,) unshifted r


def gaussian_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard-normal noise shaped like ``x``, drawn from ``generator`` (which must live on x's device)."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def diffusion_weight(
    index: torch.Tensor, sigma_shifted: torch.Tensor, weighting: str = "inverse_spacing", n_grid: int = 1280
) -> torch.Tensor:
    """Per-sample loss weight (B,) float32.

    "inverse_spacing": 1/(σ_i − σ_{i+1}) on the unshifted grid (the paper, METHOD.md §4 step 4);
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
    raise ValueError(f"unknown loss_weighting {weighting!r}: choose one of {LOSS_WEIGHTINGS}")


def diffusion_loss(
    denoiser: Denoiser,
    x0: torch.Tensor,
    y: torch.Tensor | None,
    *,
    p_mean: float = -1.2,
    p_std: float = 1.6,
    n_grid: int = 1280,
    weighting: str = "inverse_spacing",
    generator: torch.Generator | None = None,
) -> DiffusionTerms:
    """The DM x0 loss: log-normal σ snapped to the N-grid, shifted noise, weight per ``weighting`` (METHOD.md §4).

    ``y`` already carries dropped labels (null label) from the data loader; the ``denoiser`` must use "x0" output.
    """
    index = dm_sigma_index(x0.shape[0], p_mean, p_std, n_grid, generator=generator, device=x0.device)
    sigma = karras_sigma(index, n_grid).to(x0.device)  # unshifted, float64
    sigma_shifted = (denoiser.shift * sigma).float()
    x_noisy = x0 + append_dims(sigma_shifted, x0.ndim) * gaussian_like(x0, generator)
    d = denoiser(x_noisy, sigma_shifted, y)
    mse = (d.float() - x0.float()).square().flatten(1).mean(1)
    weighted = diffusion_weight(index, sigma_shifted, weighting, n_grid) * mse
    return DiffusionTerms(weighted.mean(), weighted, mse.detach(), sigma.float())


def _rng_devices(x: torch.Tensor) -> list[int]:
    """CUDA device indices whose RNG state must be forked along with the CPU's."""
    if x.device.type != "cuda":
        return []
    return [x.device.index if x.device.index is not None else torch.cuda.current_device()]


def shared_dropout_pair(
    online: Denoiser,
    target: Denoiser,
    x_t: torch.Tensor,
    t: torch.Tensor,
    x_r: torch.Tensor,
    r: torch.Tensor,
    y: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(D_θ(x_t, t′), sg[D_θ⁻(x_r, r′)]) with identical dropout masks in both passes (METHOD.md §5.2).

    The RNG state is forked around the online pass and restored for the target pass, so the target draws the same
    masks (both networks must be in train mode and call dropout in the same order on same-shaped tensors).
    """
    with torch.random.fork_rng(devices=_rng_devices(x_t)):
        d_t = online(x_t, t, y)
    with torch.no_grad():
        d_r = target(x_r, r, y)
    return d_t, d_r


def aux_features(aux_net: nn.Module, x: torch.Tensor, sigma_min_shifted: float) -> torch.Tensor:
    """Projector output z of the frozen stage-1 network at time σ′_min: W(c_in(σ′_min)·x, c_noise(σ′_min)) (§5.4)."""
    sigma = torch.full((x.shape[0],), sigma_min_shifted, device=x.device, dtype=torch.float32)
    x_in = append_dims(c_in(sigma), x.ndim) * x
    z, _ = aux_net(x_in.to(x.dtype), c_noise(sigma))
    return z


def consistency_loss(
    denoiser: Denoiser,
    target: Denoiser,
    aux_net: nn.Module | None,
    x0: torch.Tensor,
    y: torch.Tensor | None,
    *,
    stage: int,
    p_mean: float = -0.4,
    p_std: float = 1.6,
    q: float = 2.0,
    kappa: float = 8.0,
    b: float = 1.0,
    huber_c: float = 0.06,
    aux_weight: float = 1.0,
    aux_tau: float = 0.1,
    weighting: str = "inverse_gap",
    generator: torch.Generator | None = None,
) -> ConsistencyTerms:
    """ECT loss mean(w·ℓ + aux_weight·ℓ_aux) with w = 1/(t′ − r′) and the pseudo-Huber ℓ (METHOD.md §5.3–§5.4).

    ``denoiser`` and ``target`` use the "edm" output; ``target`` holds a copy of the online weights (stop-gradient).
    ``aux_net`` is the frozen stage-1 encoder + projector (eval mode); None, ``aux_weight`` 0 or stage a = 0 (a pure
    denoising warm-up, reached only with ``ect_delta`` 0) drops that term.
    Negatives of the auxiliary InfoNCE are gathered across ranks. ``weighting`` "inverse_gap" is the paper's
    w = 1/(t′ − r′); "inverse_gap_scaled" multiplies it by √(t′² + σ_d²)/σ_d = 1/(σ_d·c_in(t′)), an option for
    short runs: the pseudo-Huber metric is essentially a norm, so the gradient reaching the network output F at t′
    scales as w·c_out(t′) = σ_d·c_in(t′) for the denoising-like pairs (r′ = σ′_min), 40x smaller at t′ = 20 than near
    t′ = 0; the factor makes it the same at every t′.
    """
    if weighting not in CM_WEIGHTINGS:
        raise ValueError(f"unknown ect_weighting {weighting!r}: choose one of {CM_WEIGHTINGS}")
    t, r = ect_sample_tr(x0.shape[0], stage, p_mean, p_std, q, kappa, b, generator=generator, device=x0.device)
    t_shifted, r_shifted = (denoiser.shift * t).float(), (denoiser.shift * r).float()
    eps = gaussian_like(x0, generator)  # one ε shared by both points (§5.4 step 1)
    x_t = x0 + append_dims(t_shifted, x0.ndim) * eps
    x_r = x0 + append_dims(r_shifted, x0.ndim) * eps
    d_t, d_r = shared_dropout_pair(denoiser, target, x_t, t_shifted, x_r, r_shifted, y)
    sq_dist = (d_t.float() - d_r.float()).square().flatten(1).sum(1)
    gap = denoiser.shift * (t - r)  # shifted units, float64 so tiny gaps at late stages stay exact
    weight = torch.where(gap > 0, 1.0 / gap.clamp(min=1e-30), torch.zeros_like(gap))
    if weighting == "inverse_gap_scaled":
        weight = weight / (SIGMA_DATA * c_in(denoiser.shift * t))
    weight = weight.float()
    consistency = weight * pseudo_huber(sq_dist, huber_c)
    if aux_net is not None and aux_weight != 0 and stage != 0:  # active whenever a ≠ 0 (§5.4 step 6)
        f1 = aux_features(aux_net, d_t, denoiser.sigma_min)
        with torch.no_grad():
            f2 = aux_features(aux_net, x0, denoiser.sigma_min)
        aux = info_nce(f1, gather_local_first(f2), aux_tau)
    else:
        aux = torch.zeros_like(consistency)
    loss = (consistency + aux_weight * aux).mean()
    return ConsistencyTerms(loss, consistency, aux, weight, t.float(), r.float())


@torch.no_grad()
def denoising_mse(
    denoiser: Denoiser, x0: torch.Tensor, y: torch.Tensor | None, sigma: float, noise: torch.Tensor
) -> torch.Tensor:
    """Per-sample MSE (B,) of D(x0 + σ′·noise, σ′) against x0 at unshifted level ``sigma`` (validation metric)."""
    sigma_shifted = torch.full((x0.shape[0],), denoiser.shift * sigma, device=x0.device, dtype=torch.float32)
    d = denoiser(x0 + denoiser.shift * sigma * noise, sigma_shifted, y)
    return (d.float() - x0.float()).square().flatten(1).mean(1)

"""Step-dependent schedules and draws: stage-1 N(k), noise pairs and τ, the DM σ draw, the ECT stage and (t, r)
(method.md §3–§5). The losses that use them, with the DM and CM weights, are in :mod:`epg.method.objectives`, whose
loss objects hold the paper's values of every parameter here."""

from __future__ import annotations

import math

import torch

from epg.method.noise import SIGMA_MAX, SIGMA_MIN, karras_grid

# ---- Stage 1 (method.md §3.2–§3.3, §3.6) ---------------------------------------------------------------------------


def curriculum_period(total_steps: int, n0: int, n1: int) -> int:
    """K′ = ⌈K / log₂(⌈N₁/N₀⌉ + 1)⌉; 99,629 for the paper's K = 600K, N₀ = 20, N₁ = 1280 (method.md §3.2)."""
    return math.ceil(total_steps / math.log2(math.ceil(n1 / n0) + 1))


def num_scales(step: int, total_steps: int, n0: int, n1: int) -> int:
    """N(k) = min(N₀·2^⌈k/K′⌉, N₁) + 1 grid points at optimizer step k (method.md §3.2)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    period = curriculum_period(total_steps, n0, n1)
    exponent = -(-step // period)  # integer ceil
    return min(n0 * 2 ** min(exponent, 63), n1) + 1


def pair_sigmas(index: int, n: int, shift: float) -> tuple[float, float, float]:
    """(σ_a, σ_b, σ_0) in shifted units for grid index n of an N-point grid (method.md §3.3)."""
    if not 0 <= index <= n - 2:
        raise ValueError(f"pair index {index} outside 0..{n - 2}")
    grid = karras_grid(n)
    return shift * float(grid[index]), shift * float(grid[index + 1]), shift * SIGMA_MIN


def interpolated_tau(sigma: torch.Tensor | float, tau_min: float, tau_max: float) -> torch.Tensor:
    """τ(σ) = τ_min + (σ − σ_min)/(σ_max − σ_min)·(τ_max − τ_min), σ unshifted (method.md §3.6)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return tau_min + (sigma - SIGMA_MIN) / (SIGMA_MAX - SIGMA_MIN) * (tau_max - tau_min)


def cosine_tau_max(step: int, total_steps: int, tau_start: float, tau_end: float) -> float:
    """τ_max(k) = τ_end·cos(π/2·(1 + 1.5k/K)) + τ_start for k ≤ 2K/3, τ_end after (method.md §3.6)."""
    if step > 2 * total_steps / 3:
        return tau_end
    return tau_end * math.cos(math.pi / 2 * (1 + 1.5 * step / total_steps)) + tau_start


# ---- Stage 2a, diffusion (method.md §4) ----------------------------------------------------------------------------


def dm_sigma_index(
    batch: int,
    p_mean: float,
    p_std: float,
    n: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Grid indices of log-normal σ draws snapped to the nearest N-grid point by |Δσ| (method.md §4 step 2)."""
    log_sigma = torch.randn(batch, generator=generator, dtype=torch.float64, device=device) * p_std + p_mean
    grid = karras_grid(n).to(log_sigma.device)
    # The grid is decreasing; nearest neighbour by absolute difference in σ, clamped to 0..N−1.
    return (log_sigma.exp()[:, None] - grid[None, :]).abs().argmin(dim=1)


# ---- Stage 2b, consistency (method.md §5.3) ------------------------------------------------------------------------


def ect_stage(step: int, d0: int, d1: int, delta: int) -> int:
    """a = δ + ⌊(k − (d₀ − d₁))/d₁⌋ for k ≥ d₀, else δ (method.md §5.3)."""
    if step < d0:
        return delta
    return delta + (step - (d0 - d1)) // d1


def ect_sample_tr(
    batch: int,
    stage: int,
    p_mean: float,
    p_std: float,
    q: float,
    kappa: float,
    b: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unshifted (t, r): ln t ~ N(P_mean, P_std²), t ≥ σ_min, r = max(σ_min, t(1 − q^−a(1 + κ·sig(−bt)))) (§5.3)."""
    t = (torch.randn(batch, generator=generator, dtype=torch.float64, device=device) * p_std + p_mean).exp()
    t = t.clamp(min=SIGMA_MIN)
    r = t * (1 - q ** (-stage) * (1 + kappa * torch.sigmoid(-b * t)))
    return t, r.clamp(min=SIGMA_MIN)

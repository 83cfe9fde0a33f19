"""The EDM stochastic sampler (Karras et al. 2022, Algorithm 2) on the shifted grid (METHOD.md §6.1)."""

from __future__ import annotations

import math
from itertools import pairwise

import torch

from epg.sampling.grid import sampling_sigmas
from epg.sampling.guidance import GuidedDenoiser
from epg.sampling.heun import Trajectory
from epg.sampling.rng import Generators, randn_like


def edm_stochastic(
    fn: GuidedDenoiser,
    z: torch.Tensor,
    *,
    steps: int = 32,
    append_zero: bool = False,
    s_churn: float = 40.0,
    s_min: float = 0.05,
    s_max: float = 50.0,
    s_noise: float = 1.003,
    generator: Generators = None,
    record: Trajectory | None = None,
) -> torch.Tensor:
    """Heun with churn: before each step raise σ'_i to σ̂ = (1+γ)σ'_i by adding fresh noise, then step to σ'_{i+1}.

    γ = min(S_churn/steps, √2 − 1) while s_H·S_min ≤ σ'_i ≤ s_H·S_max; the churn window is given in unshifted units
    and shifted like every other sampler level (METHOD.md §1.3; the official values are EDM's, §6.1).
    """
    sigmas = sampling_sigmas(fn.shift, steps, append_zero)
    gamma_max = min(s_churn / steps, math.sqrt(2.0) - 1.0)
    lo, hi = s_min * fn.shift, s_max * fn.shift
    x = z * sigmas[0]
    for s_cur, s_next in pairwise(sigmas):
        gamma = gamma_max if lo <= s_cur <= hi else 0.0
        s_hat = s_cur * (1.0 + gamma)
        if gamma > 0:
            x = x + math.sqrt(s_hat**2 - s_cur**2) * s_noise * randn_like(x, generator)
        x0 = fn(x, s_hat)
        if record is not None:
            record.append((s_hat, x0))
        d = (x - x0) / s_hat
        x_next = x + (s_next - s_hat) * d
        if s_next > 0:
            d_next = (x_next - fn(x_next, s_next)) / s_next
            x_next = x + (s_next - s_hat) * 0.5 * (d + d_next)
        x = x_next
    return x

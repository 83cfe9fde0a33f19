"""The EDM stochastic sampler (Karras et al. 2022, Algorithm 2) on the shifted grid (method.md §6.1)."""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Literal

import torch

from epg.sampling.grid import sampling_sigmas
from epg.sampling.guidance import GuidedDenoiser
from epg.sampling.heun import Trajectory
from epg.sampling.rng import Generators, randn_like

STOCHASTIC_VARIANTS = ("official", "edm")


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
    variant: Literal["official", "edm"] = "official",
    generator: Generators = None,
    record: Trajectory | None = None,
) -> torch.Tensor:
    """Heun with churn: before each step raise σ'_i to σ̂ = (1+γ)σ'_i by adding fresh noise, then step to σ'_{i+1}.

    ``variant`` "official" is the official routine as method.md §6.1 records it: the churn window [S_min, S_max] is
    compared with the *shifted* σ'_i as given (in unshifted units it is S_min/s_H … S_max/s_H), γ = min(S_churn/n,
    √2 − 1) with n the number of grid points, a noise draw on every step (churned or not), and no Heun correction on
    the last step: 2·(steps − 1) − 1 = 61 evaluations at 32 steps. "edm" is Algorithm 2 applied to the shifted
    noise scale throughout (§1.3): the window is shifted too (s_H·S_min ≤ σ'_i ≤ s_H·S_max), γ = min(S_churn/steps,
    √2 − 1), noise only where γ > 0, and every step to σ' > 0 is corrected, as Heun does (62 evaluations).
    """
    if variant not in STOCHASTIC_VARIANTS:
        raise ValueError(f"unknown stochastic-sampler variant {variant!r}: choose one of {STOCHASTIC_VARIANTS}")
    official = variant == "official"
    sigmas = sampling_sigmas(fn.shift, steps, append_zero)
    gamma_max = min(s_churn / (len(sigmas) if official else steps), math.sqrt(2.0) - 1.0)
    lo, hi = (s_min, s_max) if official else (s_min * fn.shift, s_max * fn.shift)
    last = len(sigmas) - 2
    x = z * sigmas[0]
    for i, (s_cur, s_next) in enumerate(pairwise(sigmas)):
        gamma = gamma_max if lo <= s_cur <= hi else 0.0
        s_hat = s_cur + gamma * s_cur
        noise = randn_like(x, generator) if official or gamma > 0 else None  # the official loop draws every step
        if gamma > 0:
            x = x + math.sqrt(s_hat**2 - s_cur**2) * s_noise * noise
        x0 = fn(x, s_hat)
        if record is not None:
            record.append((s_hat, x0))
        d = (x - x0) / s_hat
        x_next = x + (s_next - s_hat) * d
        if s_next > 0 and not (official and i == last):
            d_next = (x_next - fn(x_next, s_next)) / s_next
            x_next = x + (s_next - s_hat) * 0.5 * (d + d_next)
        x = x_next
    return x

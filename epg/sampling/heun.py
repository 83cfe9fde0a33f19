"""Deterministic ODE samplers on the shifted Karras grid: Heun (the paper's) and Euler (method.md §6.1, §6.3)."""

from __future__ import annotations

from itertools import pairwise

import torch

from epg.sampling.grid import sampling_sigmas
from epg.sampling.guidance import GuidedDenoiser

Trajectory = list[tuple[float, torch.Tensor]]


def heun(
    fn: GuidedDenoiser, z: torch.Tensor, *, steps: int = 32, append_zero: bool = False, record: Trajectory | None = None
) -> torch.Tensor:
    """Heun from x = s_H·σ_max·z over ``steps`` levels (method.md §6.1).

    Code form (default): the grid ends at σ'_min, no final denoise, 2·(steps−1) = 62 evaluations at 32 steps.
    ``append_zero``: EDM form with σ = 0 appended and a final Euler step, 2·steps − 1 = 63 evaluations (§6.3).
    ``record`` collects (σ', x̂0) at the start of each step.
    """
    return _solve(fn, z, steps, append_zero, record, second_order=True)


def euler(
    fn: GuidedDenoiser, z: torch.Tensor, *, steps: int = 50, append_zero: bool = False, record: Trajectory | None = None
) -> torch.Tensor:
    """First-order Euler over the same grid (the official config default is 50 steps; method.md §6.1)."""
    return _solve(fn, z, steps, append_zero, record, second_order=False)


def _solve(
    fn: GuidedDenoiser, z: torch.Tensor, steps: int, append_zero: bool, record: Trajectory | None, second_order: bool
) -> torch.Tensor:
    """The deterministic PF-ODE loop shared by Heun and Euler: d = (x − x̂0)/σ' (method.md §6.1)."""
    sigmas = sampling_sigmas(fn.shift, steps, append_zero)
    x = z * sigmas[0]
    for s_cur, s_next in pairwise(sigmas):
        x0 = fn(x, s_cur)
        if record is not None:
            record.append((s_cur, x0))
        d = (x - x0) / s_cur
        x_next = x + (s_next - s_cur) * d
        if second_order and s_next > 0:  # Heun's correction, except on the final step to σ = 0
            d_next = (x_next - fn(x_next, s_next)) / s_next
            x_next = x + (s_next - s_cur) * 0.5 * (d + d_next)
        x = x_next
    return x

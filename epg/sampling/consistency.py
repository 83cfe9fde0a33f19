"""Consistency-model sampling: one step, or the standard multistep form with chosen σ_mid (method.md §6.5)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from epg.method.noise import SIGMA_MAX, SIGMA_MIN
from epg.sampling.guidance import GuidedDenoiser
from epg.sampling.heun import Trajectory
from epg.sampling.rng import Generators, randn_like

# σ_mid for 2 steps, unshifted: ECT's CIFAR-10 choice (0.821); the EPG value is unknown (method.md §6.5).
DEFAULT_SIGMA_MID = 0.821


def consistency(
    fn: GuidedDenoiser,
    z: torch.Tensor,
    *,
    steps: int = 1,
    sigma_mid: float | Sequence[float] | None = None,
    generator: Generators = None,
    record: Trajectory | None = None,
) -> torch.Tensor:
    """x ← clamp(D(s_H·σ_max·z, σ'_max)); then for each σ_mid: x ← clamp(D(x + √(σ'_mid² − σ'_min²)·ε, σ'_mid)).

    ``sigma_mid`` (unshifted, one per extra step, decreasing) defaults to 0.821 for 2 steps; steps = 1 + len(mids).
    """
    if sigma_mid is None:
        mids = [DEFAULT_SIGMA_MID] if steps == 2 else []
    else:
        mids = [float(sigma_mid)] if isinstance(sigma_mid, (int, float)) else [float(s) for s in sigma_mid]
    if steps != 1 + len(mids):
        raise ValueError(f"{steps} consistency steps need {steps - 1} σ_mid values, got {mids}: pass sigma_mid")
    sigma_max, sigma_min = SIGMA_MAX * fn.shift, SIGMA_MIN * fn.shift
    x = fn(z * sigma_max, sigma_max)
    if record is not None:
        record.append((sigma_max, x))
    for mid in mids:
        s = mid * fn.shift
        if not sigma_min < s < sigma_max:
            raise ValueError(f"σ_mid {mid} must lie inside (σ_min, σ_max) = ({SIGMA_MIN}, {SIGMA_MAX}), unshifted")
        x = fn(x + (s**2 - sigma_min**2) ** 0.5 * randn_like(x, generator), s)
        if record is not None:
            record.append((s, x))
    return x

"""Sampling noise levels: the shifted Karras grid and the guidance interval (method.md §1.3, §1.4, §6.1, §6.2)."""

from __future__ import annotations

from epg.method.noise import SIGMA_MAX, SIGMA_MIN, karras_grid

# CFG interval (0.19·s_H, 1.61·s_H] in unshifted units (method.md §6.2).
GUIDANCE_INTERVAL = (0.19, 1.61)


def sampling_sigmas(
    shift: float,
    steps: int,
    append_zero: bool = False,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
) -> list[float]:
    """The ``steps``-point Karras grid times s_H as Python floats, noisiest first (method.md §6.1).

    The code's grid ends at σ'_min with no zero; ``append_zero`` adds σ = 0 for the EDM-style count (§6.3).
    Floats keep the sampling loop free of device syncs: every branch on σ is decided on the host.
    """
    sigmas = [float(s) * shift for s in karras_grid(steps, sigma_min, sigma_max)]
    return sigmas + [0.0] if append_zero else sigmas


def in_interval(sigma: float, interval: tuple[float, float] | None, shift: float) -> bool:
    """Whether σ' lies in the half-open guidance interval (lo·s_H, hi·s_H]; None means every level."""
    if interval is None:
        return True
    lo, hi = interval
    return lo * shift < sigma <= hi * shift

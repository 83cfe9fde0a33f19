"""Noise process, Karras grid, resolution shift and preconditioning (method.md §1.2–§1.5)."""

from __future__ import annotations

import torch

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
SIGMA_DATA = 0.5
RHO = 7.0


def resolution_shift(image_size: int) -> float:
    """s_H = H/64: every noise level the network or sampler sees is multiplied by it (method.md §1.3)."""
    return image_size / 64.0


def karras_sigma(
    i: torch.Tensor | float, n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO
) -> torch.Tensor:
    """σ_i of the N-point Karras grid, unshifted; i may run past N−1 (method.md §1.4, §4 step 4)."""
    i = torch.as_tensor(i, dtype=torch.float64)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + i / (n - 1) * (b - a)) ** rho


def karras_grid(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO) -> torch.Tensor:
    """The N-point grid σ_0 = σ_max > … > σ_{N−1} = σ_min, float64, unshifted (method.md §1.4)."""
    if n < 2:
        raise ValueError(f"a Karras grid needs at least 2 points, got {n}")
    return karras_sigma(torch.arange(n), n, sigma_min, sigma_max, rho)


def c_in(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """c_in(σ') = 1/√(σ'² + σ_d²), σ' in shifted units (method.md §1.5)."""
    return 1.0 / torch.sqrt(sigma**2 + sigma_data**2)


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """c_noise(σ') = 250·ln(σ' + 1e−44), the "cm" convention (method.md §1.5)."""
    return 250.0 * torch.log(sigma + 1e-44)


def edm_coefficients(
    sigma: torch.Tensor, sigma_min_shifted: float, sigma_data: float = SIGMA_DATA
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of the "edm" output, boundary D(x, σ'_min) = x (method.md §1.5)."""
    d = sigma - sigma_min_shifted
    c_skip = sigma_data**2 / (d**2 + sigma_data**2)
    c_out = sigma_data * d / torch.sqrt(sigma**2 + sigma_data**2)
    return c_skip, c_out


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a (B,) tensor to broadcast against a tensor with ``ndim`` dimensions."""
    return x.reshape(*x.shape, *([1] * (ndim - x.ndim)))

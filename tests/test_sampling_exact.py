"""Samplers against the exact denoiser of Gaussian data, whose PF-ODE solution is known in closed form."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from epg.method.denoiser import Denoiser
from epg.method.noise import SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, karras_grid
from epg.sampling import sample

MU, S = 0.1, 0.2  # data N(μ, s²) per dimension: [−1, 1] is μ ± 4.5·s, so the §6.1 clamp touches ~1e−5 of values


class ExactGaussianNet(nn.Module):
    """Raw "x0" output F = E[x0 | x, σ'] = μ + s²/(s²+σ'²)·(x − μ), recovering x and σ' from (c_in·x, c_noise)."""

    def __init__(self, image_size: int = 256) -> None:
        super().__init__()
        self.config = SimpleNamespace(image_size=image_size)
        self.null_label = None

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        sigma = torch.exp(c_noise / 250.0).view(-1, 1, 1, 1)
        x = x_in * torch.sqrt(sigma**2 + SIGMA_DATA**2)
        return MU + S**2 / (S**2 + sigma**2) * (x - MU)


@pytest.fixture(scope="module")
def z() -> torch.Tensor:
    return torch.randn(256, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _exact_endpoint(z: torch.Tensor, shift: float = 4.0) -> torch.Tensor:
    # x − μ ∝ √(s² + σ²) along the ODE; start at σ'_max·z, stop at σ'_min (method.md §6.1: no final denoise).
    smin, smax = SIGMA_MIN * shift, SIGMA_MAX * shift
    return MU + (smax * z.double() - MU) * math.sqrt(S**2 + smin**2) / math.sqrt(S**2 + smax**2)


def test_heun_32_lands_on_the_data_distribution(z: torch.Tensor) -> None:
    x = sample(Denoiser(ExactGaussianNet(), "x0"), z).double()
    # Heun-32 overshoots the exact map by ~3% in scale at 256 px (second-order; 0.4% at 128 steps).
    assert (x - _exact_endpoint(z)).abs().max() < 0.04
    assert abs(x.mean().item() - MU) < 0.01
    assert x.var().item() / S**2 == pytest.approx(1.0, abs=0.10)


def test_heun_converges_at_second_order(z: torch.Tensor) -> None:
    d = Denoiser(ExactGaussianNet(), "x0")
    # Without the clamp, so that the rare |z| > 4.5 values do not hide the discretisation error.
    errors = [
        (sample(d, z, steps=n, clamp=None).double() - _exact_endpoint(z)).abs().max().item() for n in (32, 64, 128)
    ]
    assert errors[0] / errors[1] > 3.0 and errors[1] / errors[2] > 3.0
    assert errors[2] < 0.002


def test_edm_form_ends_on_the_clamped_estimate(z: torch.Tensor) -> None:
    d = Denoiser(ExactGaussianNet(), "x0")
    x = sample(d, z, append_zero=True).double()
    assert (x - _exact_endpoint(z)).abs().max() < 0.04
    x_big = sample(d, 1e4 * torch.ones(2, 3, 4, 4), append_zero=True)  # final Euler step to σ = 0 returns x̂0
    assert x_big.max().item() <= 1.0


def test_stochastic_sampler_converges_to_the_data_distribution(z: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(1)
    x = sample(Denoiser(ExactGaussianNet(), "x0"), z, sampler="stochastic", steps=128, generator=g).double()
    assert abs(x.mean().item() - MU) < 0.01
    assert x.var().item() / S**2 == pytest.approx(1.0, abs=0.06)


def test_official_stochastic_sampler_matches_the_routine_of_method_6_1() -> None:
    """method.md §6.1 written out: S_min/S_max against the shifted σ', a draw every step, no correction at the end."""
    d = Denoiser(ExactGaussianNet(), "x0")  # s_H = 4
    z = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    # At 8 steps σ' = 320, 140, 54.8, 18.5, 5.15, 1.07, 0.141, 0.008: the official window [0.05, 50] churns the
    # last four starts, the shifted window [0.2, 200] of the "edm" variant σ' = 140 … 1.07.
    sigmas = [4.0 * float(s) for s in karras_grid(8)]
    g = torch.Generator().manual_seed(3)
    x0_hat = lambda x, sigma: d(x, torch.full((x.shape[0],), sigma)).clamp(-1, 1)  # noqa: E731
    x = z * sigmas[0]
    for i in range(7):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        noise = torch.randn(x.shape, generator=g)
        gamma = min(40.0 / 8, math.sqrt(2) - 1) if 0.05 <= t_cur <= 50.0 else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = x + math.sqrt(t_hat**2 - t_cur**2) * 1.003 * noise
        d_cur = (x_hat - x0_hat(x_hat, t_hat)) / t_hat
        x = x_hat + (t_next - t_hat) * d_cur
        if i < 6:
            d_next = (x - x0_hat(x, t_next)) / t_next
            x = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_next)
    seeded = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    official = sample(d, z, sampler="stochastic", steps=8, generator=seeded(), return_info=True)  # the default
    torch.testing.assert_close(official.images, x)
    edm = sample(d, z, sampler="stochastic", steps=8, variant="edm", generator=seeded(), return_info=True)
    assert (official.nfe, edm.nfe) == (13, 14)
    assert (edm.images - x).abs().max() > 0.01


def test_euler_converges_at_first_order(z: torch.Tensor) -> None:
    d = Denoiser(ExactGaussianNet(), "x0")
    x50, x200 = (sample(d, z, sampler="euler", steps=n, clamp=None).double() for n in (50, 200))
    e50, e200 = ((x - _exact_endpoint(z)).abs().max().item() for x in (x50, x200))
    assert 2.5 < e50 / e200 < 6 and e200 < 0.03

"""Karras grid, resolution shift and preconditioning against hand-computed values (method.md §1)."""

import math

import pytest
import torch

from epg.method.noise import c_in, c_noise, edm_coefficients, karras_grid, karras_sigma, resolution_shift


def test_grid_end_points_and_monotone():
    g = karras_grid(1280)
    assert g[0].item() == pytest.approx(80.0, rel=1e-12)
    assert g[-1].item() == pytest.approx(0.002, rel=1e-12)
    assert torch.all(g[1:] < g[:-1])


def test_grid_hand_value():
    # Midpoint of a 3-point grid: ((80^(1/7) + 0.002^(1/7)) / 2)^7.
    expected = ((80 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7
    assert karras_grid(3)[1].item() == pytest.approx(expected, rel=1e-12)


def test_grid_extends_past_end():
    # σ_1280 of the 1280 grid, used by the last DM weight (method.md §4): ≈ 0.00196.
    assert karras_sigma(1280, 1280).item() == pytest.approx(0.00196, abs=5e-6)


def test_shift():
    assert resolution_shift(256) == 4.0
    assert resolution_shift(512) == 8.0
    assert resolution_shift(32) == 0.5


def test_c_in_and_c_noise():
    s = torch.tensor([0.0, 0.5, 320.0])
    assert torch.allclose(c_in(s), 1 / torch.sqrt(s**2 + 0.25))
    assert c_in(torch.tensor(0.008)).item() == pytest.approx(1 / math.sqrt(0.008**2 + 0.25))
    assert c_noise(torch.tensor(1.0)).item() == pytest.approx(0.0, abs=1e-6)
    assert c_noise(torch.tensor(math.e)).item() == pytest.approx(250.0, rel=1e-6)
    assert torch.isfinite(c_noise(torch.tensor(0.0)))


def test_edm_boundary_condition():
    smin = 4 * 0.002
    c_skip, c_out = edm_coefficients(torch.tensor(smin), smin)
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    c_skip, c_out = edm_coefficients(torch.tensor(320.0), smin)
    assert c_skip.item() == pytest.approx(0.25 / ((320 - smin) ** 2 + 0.25))
    assert c_out.item() == pytest.approx(0.5 * (320 - smin) / math.sqrt(320**2 + 0.25))

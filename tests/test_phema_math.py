"""Post-hoc EMA math (epg.method.phema, method.md §13) against hand-computed numbers and numerical integration."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from epg.method import phema as P


def test_sigma_rel_of_gamma_by_hand():
    # σ_rel² = (γ+1) / ((γ+2)² (γ+3)): γ = 1 → 2/(9·4) = 1/18; γ = 2 → 3/(16·5) = 3/80; γ = 0 → 1/12.
    assert P.sigma_rel_of_gamma(1.0) == pytest.approx(math.sqrt(1 / 18), rel=1e-15)
    assert P.sigma_rel_of_gamma(2.0) == pytest.approx(math.sqrt(3 / 80), rel=1e-15)
    assert P.sigma_rel_of_gamma(0.0) == pytest.approx(math.sqrt(1 / 12), rel=1e-15)


@pytest.mark.parametrize(
    "sigma_rel, published, cubic",
    # EDM2 §3 quotes γ ≈ 16.97 for σ_rel 0.05 and γ ≈ 6.94 for 0.10. With σ⁻² = 400 and 100 the cubic
    # γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²) has the coefficients written out here by hand.
    [(0.05, 16.97, (1, 7, -384, -388)), (0.10, 6.94, (1, 7, -84, -88))],
)
def test_gamma_of_sigma_rel_solves_the_cubic(sigma_rel, published, cubic):
    gamma = P.gamma_of_sigma_rel(sigma_rel)
    assert gamma == pytest.approx(published, abs=5e-3)
    a, b, c, d = cubic
    assert abs(a * gamma**3 + b * gamma**2 + c * gamma + d) < 1e-8 * gamma**3
    assert P.sigma_rel_of_gamma(gamma) == pytest.approx(sigma_rel, rel=1e-12)


def test_round_trip_and_range():
    assert P.gamma_of_sigma_rel(math.sqrt(1 / 18)) == pytest.approx(1.0, rel=1e-12)
    assert P.gamma_of_sigma_rel(math.sqrt(3 / 80)) == pytest.approx(2.0, rel=1e-12)
    for gamma in (-0.3, 0.5, 3.0, 16.97, 100.0, 1e4):
        assert P.gamma_of_sigma_rel(P.sigma_rel_of_gamma(gamma)) == pytest.approx(gamma, rel=1e-9)
    # The maximum σ_rel sits at γ = (√5 − 3)/2 ≈ −0.382 (hand: d/dγ log σ_rel² = 0 ⇔ γ² + 3γ + 1 = 0).
    assert P.SIGMA_REL_MAX == pytest.approx(P.sigma_rel_of_gamma(-0.381966), rel=1e-9)
    for bad in (0.0, -0.1, 0.31):
        with pytest.raises(ValueError, match="σ_rel must lie"):
            P.gamma_of_sigma_rel(bad)


def test_beta_and_discrete_weights_by_hand():
    assert P.power_beta(1, 5.0) == 0.0  # the first average copies θ_1
    assert P.power_beta(2, 1.0) == 0.25  # (1 − 1/2)²
    # t = 2, γ = 1: w = ((1 − 0)/4, (4 − 1)/4) = (1/4, 3/4); they always sum to 1.
    assert torch.equal(P.discrete_weights(2, 1.0), torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert float(P.discrete_weights(1000, 16.97).sum()) == pytest.approx(1.0, rel=1e-12)


def test_update_unrolls_to_the_discrete_weights():
    """θ_s = e_s (one-hot): after t updates the average's entries are the weights w_1..w_t."""
    t, gamma = 7, 3.5
    online, target = nn.Linear(t, 1, bias=False).double(), nn.Linear(t, 1, bias=False).double()
    for s in range(1, t + 1):
        online.weight.data = torch.nn.functional.one_hot(torch.tensor([s - 1]), t).double()
        P.power_ema_update_(target, online, s, gamma)
    torch.testing.assert_close(target.weight.data[0], P.discrete_weights(t, gamma), rtol=1e-13, atol=1e-15)


def test_profile_dot_by_hand():
    # γ = 0 both, t = 1: ∫₀¹ 1 dτ = 1. γ = 1 both, t = 1: ∫₀¹ (2τ)² dτ = 4/3. γ = 0, t = 1 and 2: ∫₀¹ 1 · ½ = ½.
    assert float(P.profile_dot(1.0, 0.0, 1.0, 0.0)) == pytest.approx(1.0, rel=1e-14)
    assert float(P.profile_dot(1.0, 1.0, 1.0, 1.0)) == pytest.approx(4 / 3, rel=1e-14)
    assert float(P.profile_dot(1.0, 0.0, 2.0, 0.0)) == pytest.approx(0.5, rel=1e-14)


@pytest.mark.parametrize(
    "t_a, s_a, t_b, s_b", [(1000, 0.05, 1000, 0.10), (700, 0.10, 1000, 0.05), (1e6, 0.05, 3e5, 0.2)]
)
def test_profile_dot_against_integration(t_a, s_a, t_b, s_b):
    """Closed form vs the trapezoid rule on 2·10⁶ points of [0, min t] (tolerance 1e-6 relative), and vs the
    discrete weights' dot product Σ_s w_s^a w_s^b (1e-3 relative for these lengths: the profiles are then sampled
    on unit intervals)."""
    g_a, g_b = P.gamma_of_sigma_rel(s_a), P.gamma_of_sigma_rel(s_b)
    m = min(t_a, t_b)
    tau = torch.linspace(0, m, 2_000_001, dtype=torch.float64)
    p_a = (g_a + 1) * (tau / t_a) ** g_a / t_a
    p_b = (g_b + 1) * (tau / t_b) ** g_b / t_b
    closed = float(P.profile_dot(t_a, g_a, t_b, g_b))
    assert float(torch.trapz(p_a * p_b, tau)) == pytest.approx(closed, rel=1e-6)
    if t_a <= 1000 and t_b <= 1000:
        w_a, w_b = P.discrete_weights(int(t_a), g_a), P.discrete_weights(int(t_b), g_b)
        n = int(m)
        assert float(w_a[:n] @ w_b[:n]) == pytest.approx(closed, rel=1e-3)


def test_reconstruction_matches_a_tracked_profile():
    """A random-walk trajectory θ_1..θ_2000 (64 dims); EMAs of σ_rel 0.05 and 0.10 snapshotted every 100 updates;
    σ_rel 0.07 at t = 2000 reconstructed from those 40 snapshots vs the same EMA tracked directly. Tolerances:
    the profile's relative L2 error < 0.5 % (closed form; 0.25 % measured) and the weights' error < 1 % of the
    gap between the tracked 0.07 and 0.05 averages (0.12 % measured)."""
    torch.manual_seed(0)
    steps, dims, every, target = 2000, 64, 100, 0.07
    theta = torch.cumsum(torch.randn(steps, dims, dtype=torch.float64) * 0.1 + 0.01, 0)
    sigma_rels = (0.05, 0.10, target)
    gammas = [P.gamma_of_sigma_rel(s) for s in sigma_rels]
    averages = [torch.zeros(dims, dtype=torch.float64) for _ in sigma_rels]
    in_t, in_s, snapshots = [], [], []
    for t in range(1, steps + 1):
        for avg, gamma in zip(averages, gammas, strict=True):
            avg.lerp_(theta[t - 1], 1 - P.power_beta(t, gamma))
        if t % every == 0:
            for avg, s in zip(averages[:2], sigma_rels[:2], strict=True):
                in_t.append(t), in_s.append(s), snapshots.append(avg.clone())
    x = P.solve_coefficients(in_t, in_s, steps, target)
    assert P.profile_error(x, in_t, in_s, steps, target) < 5e-3
    rebuilt = torch.stack(snapshots).T @ x
    gap = (averages[2] - averages[0]).norm()
    assert float((rebuilt - averages[2]).norm() / gap) < 1e-2
    # A target that is one of the snapshots comes back as that snapshot alone.
    x = P.solve_coefficients(in_t, in_s, 1000, 0.10)
    assert float(x[in_t.index(1000) + 1]) == pytest.approx(1.0, abs=1e-6)
    assert float(x.abs().sum()) == pytest.approx(1.0, abs=1e-5)


def test_discrete_and_closed_form_solutions_agree_on_long_runs():
    """Snapshots of σ_rel 0.05/0.10 every 500 of 5000 updates, target 0.07 at 5000: the discrete (exact for the β_t
    recursion) and closed-form coefficients differ by < 1e-5 (measured 3e-7), and each fits its own profile to
    < 2 % (both measured 0.91 %)."""
    in_t = [t for t in range(500, 5001, 500) for _ in range(2)]
    in_s = [0.05, 0.10] * 10
    closed = P.solve_coefficients(in_t, in_s, 5000, 0.07, discrete=False)
    exact = P.solve_coefficients(in_t, in_s, 5000, 0.07, discrete=True)
    assert float((closed - exact).abs().max()) < 1e-5
    assert P.profile_error(closed, in_t, in_s, 5000, 0.07) < 2e-2
    assert P.profile_error(exact, in_t, in_s, 5000, 0.07, discrete=True) < 2e-2
    _, _, c = P.gram([10], [0.1], 10, 0.1, discrete=True)
    assert float(c) == pytest.approx(float((P.discrete_weights(10, P.gamma_of_sigma_rel(0.1)) ** 2).sum()), rel=1e-14)

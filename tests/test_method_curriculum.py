"""Stage-1 N(k) table, DM σ draw, ECT (t, r) stages (method.md §3.2–§3.3, §4, §5.3)."""

import math

import pytest
import torch

from epg.method.curriculum import (
    cosine_tau_max,
    curriculum_period,
    dm_sigma_index,
    ect_sample_tr,
    ect_stage,
    interpolated_tau,
    num_scales,
    pair_sigmas,
)
from epg.method.noise import karras_grid
from epg.method.objectives import ConsistencyLoss, DiffusionLoss, RCMLoss

# The paper's values, held by the loss objects (method.md §3.2, §4, §5.3); K = 600K is the stage-1 run's length.
RCM, DM, CM = RCMLoss(), DiffusionLoss(), ConsistencyLoss()
PAPER_K, N0, N1 = 600_000, RCM.curriculum_n0, RCM.curriculum_n1
PAPER_TR = dict(p_mean=CM.p_mean, p_std=CM.p_std, q=CM.ect_q, kappa=CM.ect_kappa, b=CM.ect_b)
PAPER_SIGMA = dict(p_mean=DM.p_mean, p_std=DM.p_std, n=DM.sigma_grid)


def test_curriculum_period_default():
    assert curriculum_period(PAPER_K, N0, N1) == 99_629


@pytest.mark.parametrize(
    "step,n",
    [
        (0, 21),
        (1, 41),
        (99_629, 41),
        (99_630, 81),
        (199_258, 81),
        (199_259, 161),
        (298_888, 321),
        (398_517, 641),
        (498_145, 641),
        (498_146, 1281),
        (600_000, 1281),
        (10**9, 1281),
    ],
)
def test_num_scales_table(step, n):
    assert num_scales(step, PAPER_K, N0, N1) == n


def test_pair_sigmas_shifted_and_adjacent():
    a, b, s0 = pair_sigmas(0, 21, shift=4.0)
    assert a == pytest.approx(320.0) and s0 == pytest.approx(0.008)
    grid = karras_grid(21)
    assert b == pytest.approx(4 * grid[1].item())
    a, b, _ = pair_sigmas(19, 21, shift=4.0)  # the last pair reaches σ_min (method.md §10.9)
    assert b == pytest.approx(0.008)
    with pytest.raises(ValueError):
        pair_sigmas(20, 21, shift=4.0)


def test_tau_schedules():
    assert interpolated_tau(0.002, 0.1, 0.3).item() == pytest.approx(0.1)
    assert interpolated_tau(80.0, 0.1, 0.3).item() == pytest.approx(0.3)
    # Continuous at 2K/3 when τ_start = 2·τ_end: cos(π/2·2) = −1 → τ_end.
    assert cosine_tau_max(0, 300, 0.4, 0.2) == pytest.approx(0.2 * math.cos(math.pi / 2) + 0.4)
    assert cosine_tau_max(200, 300, 0.4, 0.2) == pytest.approx(0.2)
    assert cosine_tau_max(250, 300, 0.4, 0.2) == 0.2


def test_dm_sigma_index_is_nearest_in_sigma():
    g = torch.Generator().manual_seed(0)
    idx = dm_sigma_index(20_000, **PAPER_SIGMA, generator=g)
    assert idx.min() >= 0 and idx.max() <= 1279
    grid = karras_grid(1280)
    sig = grid[idx]
    # Median of a log-normal with P_mean −1.2 is e^−1.2 ≈ 0.301; snapping barely moves it.
    assert sig.median().item() == pytest.approx(math.exp(-1.2), rel=0.05)
    # Nearest by |Δσ|: re-draw a single known value.
    g2 = torch.Generator().manual_seed(1)
    ln = torch.randn(1, generator=g2, dtype=torch.float64) * 1.6 - 1.2
    i = dm_sigma_index(1, **PAPER_SIGMA, generator=torch.Generator().manual_seed(1))
    assert i.item() == int((grid - ln.exp()).abs().argmin())


def test_ect_stage_over_steps():
    stage = [ect_stage(k, CM.ect_d0, CM.ect_d1, CM.ect_delta) for k in (0, 99_999, 100_000, 199_999, 200_000, 650_000)]
    assert stage == [1, 1, 2, 2, 3, 7]


def test_ect_tr_stage_properties():
    g = torch.Generator().manual_seed(0)
    t, r = ect_sample_tr(50_000, stage=1, **PAPER_TR, generator=g)
    assert torch.all(t >= 0.002) and torch.all(r >= 0.002) and torch.all(r <= t)
    # At a = 1, r = σ_min unless t > ln 7 (method.md §5.3).
    assert torch.all(r[t < math.log(7) - 1e-6] == 0.002)
    assert torch.all(r[t > 2.2] > 0.002)  # t·(1 − ½(1 + 8·sig(−t))) exceeds σ_min well above ln 7
    t, r = ect_sample_tr(50_000, stage=2, **PAPER_TR, generator=g)
    assert torch.all(r[t < math.log(5 / 3) - 1e-6] == 0.002)
    for a in (3, 5):
        t, r = ect_sample_tr(50_000, stage=a, **PAPER_TR, generator=g)
        big = r > 0.002
        assert torch.all(r[big] / t[big] >= 1 - 5 * 2.0**-a - 1e-12)
    # No upper clamp on t: about 0.14% of draws exceed σ_max.
    t, _ = ect_sample_tr(400_000, stage=1, **PAPER_TR, generator=g)
    assert 0.0008 < (t > 80).double().mean().item() < 0.002

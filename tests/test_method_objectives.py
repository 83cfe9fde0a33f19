"""Stage-2 loss objects against hand computation on tiny tensors (method.md §4, §5.3–§5.4)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from epg.method.curriculum import ect_sample_tr
from epg.method.denoiser import Denoiser
from epg.method.noise import karras_grid
from epg.method.objectives import (
    MOVED_KEYS,
    ConsistencyLoss,
    DiffusionLoss,
    RCMLoss,
    build_loss,
    denoising_mse,
    diffusion_weight,
    dm_loss_weight,
    sampler_for,
    shared_dropout_pair,
)
from epg.nn.network import build_network

SIZE = 64  # s_H = 1: shifted and unshifted noise levels coincide for the simple checks
CM = ConsistencyLoss()  # the paper's values (method.md §5.3)
PAPER_TR = dict(p_mean=CM.p_mean, p_std=CM.p_std, q=CM.ect_q, kappa=CM.ect_kappa, b=CM.ect_b)


def diffusion_loss(denoiser, x0, y, generator=None, **options):
    """One evaluation of ``DiffusionLoss(**options)``."""
    return DiffusionLoss(**options).terms(denoiser, x0, y, generator=generator)


def consistency_loss(denoiser, target, aux_net, x0, y, *, stage, generator=None, **options):
    """One evaluation of ``ConsistencyLoss(**options)`` at ECT stage ``stage``."""
    return ConsistencyLoss(**options).terms(denoiser, target, aux_net, x0, y, stage, generator=generator)


class ScaledInput(nn.Module):
    """F(x_in, c_noise, y) = a·x_in: a raw network whose output is known in closed form."""

    def __init__(self, a: float = 0.5) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.null_label = None

    def forward(self, x_in, c_noise, y=None):
        return self.a * x_in


class FlatFeatures(nn.Module):
    """Stand-in stage-1 network: (z, h) = (flattened input, flattened input)."""

    def forward(self, x_in, c_noise):
        return x_in.flatten(1), x_in.flatten(1)


def karras(i: float, n: int = 1280) -> float:
    a, b = 80 ** (1 / 7), 0.002 ** (1 / 7)
    return (a + i / (n - 1) * (b - a)) ** 7


def test_diffusion_loss_matches_hand_computation():
    torch.manual_seed(0)
    x0 = torch.randn(3, 3, 8, 8) * 0.5
    den = Denoiser(ScaledInput(0.5), "x0", image_size=256)  # s_H = 4
    terms = diffusion_loss(den, x0, None, generator=torch.Generator().manual_seed(7))
    # Replay the draws: ln σ ~ N(−1.2, 1.6²) snapped by |Δσ|, then ε, from the same generator.
    g = torch.Generator().manual_seed(7)
    log_sigma = torch.randn(3, generator=g, dtype=torch.float64) * 1.6 - 1.2
    grid = [karras(i) for i in range(1280)]
    idx = [min(range(1280), key=lambda i: abs(grid[i] - math.exp(v))) for v in log_sigma.tolist()]
    eps = torch.randn(x0.shape, generator=g)
    for k in range(3):
        s = 4 * grid[idx[k]]
        d = 0.5 * (x0[k] + s * eps[k]) / math.sqrt(s**2 + 0.25)
        w = 1 / (karras(idx[k]) - karras(idx[k] + 1))
        assert terms.sigma[k].item() == pytest.approx(grid[idx[k]], rel=1e-6)
        assert terms.weighted[k].item() == pytest.approx(w * ((d - x0[k]) ** 2).mean().item(), rel=1e-4)
    assert terms.loss.item() == pytest.approx(terms.weighted.mean().item(), rel=1e-6)


def test_dm_weights_hand_values():
    grid = karras_grid(1280)
    i1 = int((grid - 1.0).abs().argmin())
    w = dm_loss_weight(torch.tensor([0, i1, 1279]), DiffusionLoss().sigma_grid)
    assert w[0].item() == pytest.approx(1 / (grid[0] - grid[1]).item())
    assert w[0].item() == pytest.approx(2.9, abs=0.05)  # σ = 80
    assert w[1].item() == pytest.approx(126, rel=0.01)  # σ ≈ 1
    assert w[2].item() == pytest.approx(1 / (0.002 - 0.00196), rel=0.05)  # ≈ 2.6e4
    assert 2.4e4 < w[2].item() < 2.8e4


def test_diffusion_weight_options():
    index = torch.tensor([0, 640, 1279])
    sigma = torch.tensor([1.0, 2.0, 0.5])
    spacing = diffusion_weight(index, sigma, "inverse_spacing", 1280)
    for k, i in enumerate(index.tolist()):
        assert spacing[k].item() == pytest.approx(1 / (karras(i) - karras(i + 1)), rel=1e-5)
    edm = diffusion_weight(index, sigma, "edm", 1280)
    assert edm.tolist() == pytest.approx([(s**2 + 0.25) / (s * 0.5) ** 2 for s in sigma.tolist()], rel=1e-6)
    assert diffusion_weight(index, sigma, "uniform", 1280).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="weighting 'snr'"):
        diffusion_weight(index, sigma, "snr", 1280)
    with pytest.raises(ValueError, match="weighting must be one of"):
        DiffusionLoss(weighting="snr")


def test_consistency_loss_matches_hand_computation():
    torch.manual_seed(0)
    x0 = torch.randn(4, 3, 4, 4) * 0.5
    online = Denoiser(ScaledInput(0.3), "edm", image_size=SIZE)
    target = Denoiser(ScaledInput(0.3), "edm", image_size=SIZE)
    stage, c, tau = 3, 0.06, 0.1
    terms = consistency_loss(
        online, target, FlatFeatures(), x0, None, stage=stage, aux_tau=tau, generator=torch.Generator().manual_seed(3)
    )
    g = torch.Generator().manual_seed(3)
    t, r = ect_sample_tr(4, stage, **PAPER_TR, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    sig_min = 0.002

    def d(x, s):
        c_skip = 0.25 / ((s - sig_min) ** 2 + 0.25)
        c_out = 0.5 * (s - sig_min) / math.sqrt(s**2 + 0.25)
        return c_skip * x + c_out * 0.3 * x / math.sqrt(s**2 + 0.25)

    feats, keys, expected = [], [], []
    for k in range(4):
        tk, rk = t[k].item(), r[k].item()
        d_t, d_r = d(x0[k] + tk * eps[k], tk), d(x0[k] + rk * eps[k], rk)
        s = ((d_t - d_r) ** 2).sum().item()
        w = 1 / (tk - rk) if tk > rk else 0.0
        expected.append(w * s / math.sqrt(s + c**2))
        c_in_min = 1 / math.sqrt(sig_min**2 + 0.25)
        feats.append((c_in_min * d_t).flatten())
        keys.append((c_in_min * x0[k]).flatten())
    assert terms.consistency.tolist() == pytest.approx(expected, rel=1e-4)
    q = torch.nn.functional.normalize(torch.stack(feats), dim=1)
    kk = torch.nn.functional.normalize(torch.stack(keys), dim=1)
    logits = q @ kk.T / tau
    aux = torch.logsumexp(logits, 1) - logits.diagonal()
    assert terms.aux.tolist() == pytest.approx(aux.tolist(), rel=1e-4)
    assert terms.loss.item() == pytest.approx((torch.tensor(expected) + aux).mean().item(), rel=1e-4)


def test_consistency_gradient_reaches_online_only():
    x0 = torch.randn(4, 3, 4, 4) * 0.5
    online = Denoiser(ScaledInput(0.3), "edm", image_size=SIZE)
    target = Denoiser(ScaledInput(0.3), "edm", image_size=SIZE)
    terms = consistency_loss(online, target, FlatFeatures(), x0, None, stage=2, generator=torch.Generator())
    terms.loss.backward()
    assert online.network.a.grad is not None and online.network.a.grad.abs() > 0
    assert target.network.a.grad is None


def test_zero_gap_gets_zero_weight_and_aux_can_be_off():
    x0 = torch.zeros(2, 3, 4, 4)
    den = Denoiser(ScaledInput(), "edm", image_size=SIZE)
    # Stage 0 makes r = max(σ_min, t·(1 − 1 − κ·sig)) = σ_min; P_std 0 with a tiny P_mean pins t at σ_min too.
    terms = consistency_loss(den, den, None, x0, None, stage=0, p_mean=-20.0, p_std=0.0, generator=torch.Generator())
    assert terms.weight.tolist() == [0.0, 0.0]
    assert terms.aux.tolist() == [0.0, 0.0]
    assert terms.loss.item() == 0.0


def test_aux_term_is_off_in_the_pure_denoising_stage_zero():
    """§5.4 step 6: ℓ_aux is active whenever a ≠ 0; a = 0 (ect_delta 0) is a pure denoising warm-up (r = σ_min)."""
    torch.manual_seed(0)
    x0 = torch.randn(4, 3, 4, 4) * 0.5
    den = Denoiser(ScaledInput(0.3), "edm", image_size=SIZE)
    warm = consistency_loss(den, den, FlatFeatures(), x0, None, stage=0, generator=torch.Generator().manual_seed(1))
    assert warm.r.tolist() == pytest.approx([0.002] * 4) and warm.aux.tolist() == [0.0] * 4
    assert warm.loss.item() == pytest.approx(warm.consistency.mean().item(), rel=1e-6)
    on = consistency_loss(den, den, FlatFeatures(), x0, None, stage=1, generator=torch.Generator().manual_seed(1))
    assert bool((on.aux > 0).all())


def test_scaled_cm_weighting_multiplies_the_paper_weight_by_one_over_sigma_d_c_in():
    x0 = torch.randn(6, 3, 16, 16) * 0.5
    den = Denoiser(ScaledInput(0.3), "edm", image_size=16)  # s_H = 1/4: the factor uses the shifted t′

    def run(weighting):
        return consistency_loss(
            den,
            den,
            None,
            x0,
            None,
            stage=1,
            p_mean=1.0,
            weighting=weighting,
            generator=torch.Generator().manual_seed(2),
        )

    paper, scaled = run("inverse_gap"), run("inverse_gap_scaled")
    assert torch.equal(paper.t, scaled.t) and torch.equal(paper.r, scaled.r)
    for k in range(6):
        t_shifted, gap = 0.25 * paper.t[k].item(), 0.25 * (paper.t[k] - paper.r[k]).item()
        assert paper.weight[k].item() == pytest.approx(1 / gap, rel=1e-5)
        factor = math.sqrt(t_shifted**2 + 0.25) / 0.5
        assert scaled.weight[k].item() == pytest.approx(factor / gap, rel=1e-5)
        assert scaled.consistency[k].item() == pytest.approx(factor * paper.consistency[k].item(), rel=1e-5)
    with pytest.raises(ValueError, match="weighting must be one of"):
        consistency_loss(den, den, None, x0, None, stage=1, weighting="snr")


def test_ect_stages_over_steps():
    assert [CM.stage(k) for k in (0, 99_999, 100_000, 199_999, 200_000, 650_000)] == [1, 1, 2, 2, 3, 7]
    g = torch.Generator().manual_seed(0)
    for stage in (1, 2, 3, 5):
        t, r = ect_sample_tr(20_000, stage, **PAPER_TR, generator=g)
        assert bool((r <= t).all()) and bool((r >= 0.002).all())
        free = r > 0.002
        if stage >= 3:  # r/t ≥ 1 − 5·2^−a (method.md §5.3)
            assert float((r[free] / t[free]).min()) >= 1 - 5 * 2.0**-stage - 1e-9
    t, r = ect_sample_tr(20_000, 1, **PAPER_TR, generator=g)
    assert bool((r[t <= math.log(7) - 1e-6] == 0.002).all())  # a = 1: denoising-like for t ≤ ln 7


def test_dropout_mask_sharing_makes_equal_weights_agree():
    torch.manual_seed(0)
    net = build_network("EPG-Nano/4", drop=0.5)
    with torch.no_grad():  # non-zero adaLN/output so the dropout masks reach the output
        for p in net.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    target = copy.deepcopy(net).requires_grad_(False)
    net.train(), target.train()
    online_d, target_d = Denoiser(net, "edm"), Denoiser(target, "edm")
    x = torch.randn(2, 3, 16, 16)
    sigma = torch.full((2,), 1.0)
    y = torch.tensor([1, 2])
    a, b = shared_dropout_pair(online_d, target_d, x, sigma, x, sigma, y)
    assert torch.equal(a, b)
    assert a.requires_grad and not b.requires_grad
    # Without the fork the two passes draw different masks.
    assert not torch.allclose(online_d(x, sigma, y), target_d(x, sigma, y))


def test_denoising_mse_is_deterministic_given_noise():
    x0 = torch.randn(2, 3, 4, 4)
    noise = torch.randn_like(x0)
    den = Denoiser(ScaledInput(0.0), "x0", image_size=SIZE)  # D ≡ 0
    mse = denoising_mse(den, x0, None, 1.0, noise)
    assert mse.tolist() == pytest.approx(x0.square().flatten(1).mean(1).tolist())


def test_the_loss_class_is_the_objective():
    """What a module builds and samples around a loss is read off its class (method.md §1.5, §4–§6)."""
    dm, cm = DiffusionLoss(), ConsistencyLoss()
    assert (dm.parameterization, dm.sampler, dm.needs_target, dm.needs_aux) == ("x0", "heun", False, False)
    assert (cm.parameterization, cm.sampler, cm.needs_target, cm.needs_aux) == ("edm", "consistency", True, True)
    assert (dm.betas, dm.weight_decay, dm.lr_schedule, dm.grad_clip) == ((0.9, 0.999), 0.01, "cosine", 0.5)
    assert (cm.betas, cm.weight_decay, cm.lr_schedule, cm.grad_clip) == ((0.9, 0.99), 0.03, "steps", None)
    assert (sampler_for("x0"), sampler_for("edm")) == ("heun", "consistency")
    spec = ConsistencyLoss(ect_d0=7).spec()
    assert spec["class_path"] == "epg.method.objectives.ConsistencyLoss" and spec["init_args"]["ect_d0"] == 7
    assert build_loss(spec, ConsistencyLoss, DiffusionLoss) == ConsistencyLoss(ect_d0=7)
    with pytest.raises(ValueError, match="DiffusionLoss"):
        build_loss(RCMLoss(), DiffusionLoss, DiffusionLoss)


def test_moved_keys_name_the_new_dotted_key():
    assert MOVED_KEYS["model.init_args.p_mean"] == "model.init_args.loss.init_args.p_mean"
    assert MOVED_KEYS["model.init_args.loss_weighting"] == "model.init_args.loss.init_args.weighting"
    assert MOVED_KEYS["model.init_args.ect_weighting"] == "model.init_args.loss.init_args.weighting"
    assert MOVED_KEYS["model.init_args.sample_guidance"] == "model.init_args.sampling.cfg"
    assert MOVED_KEYS["model.init_args.objective"] == "model.init_args.loss.class_path"

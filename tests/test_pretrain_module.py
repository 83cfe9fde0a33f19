"""PretrainModule pieces: curriculum and pair draw over steps, both loss terms, EMA, modes, hand-over (method.md §3)."""

import math

import pytest
import torch
import torch.nn.functional as F

from epg.checkpoint import load_stage1_representation
from epg.lightning.pretrain import PretrainModule
from epg.method.curriculum import pair_sigmas
from epg.method.noise import SIGMA_MAX, SIGMA_MIN, c_in, c_noise, karras_grid
from epg.method.objectives import RCMLoss


def nano(**kwargs) -> PretrainModule:
    return PretrainModule(preset="EPG-Nano/4", **kwargs)


def test_curriculum_follows_the_paper_table():
    module = nano()  # K = 600K, N0 = 20, N1 = 1280 (method.md §3.2)
    table = {0: 21, 1: 41, 99_629: 41, 99_630: 81, 199_259: 161, 298_888: 321, 398_517: 641, 498_146: 1281}
    assert {k: module.loss.num_scales(k, module.hparams.total_steps) for k in table} == table
    assert module.loss.num_scales(600_000, module.hparams.total_steps) == 1281


def test_pair_draw_over_steps():
    module = nano(total_steps=60, loss=RCMLoss(curriculum_n0=2, curriculum_n1=16))
    seed = module.hparams.seed
    shift = 16 / 64
    previous = 0
    for step in range(61):
        n = module.loss.num_scales(step, module.hparams.total_steps)
        assert n >= previous
        previous = n
        index = module.loss.draw_pair_index(n, module.hparams.seed, step)
        assert 0 <= index <= n - 2
        sigma_a, sigma_b, _ = pair_sigmas(index, n, shift)
        grid = karras_grid(n)
        assert (sigma_a, sigma_b) == pytest.approx((shift * float(grid[index]), shift * float(grid[index + 1])))
        assert index == module.loss.draw_pair_index(n, seed, step)  # a pure function of (seed, step): restorable
    assert previous == 17
    draws = torch.tensor([module.loss.draw_pair_index(6, seed, step) for step in range(2000)])
    counts = torch.bincount(draws, minlength=5)
    assert counts.shape[0] == 5 and (counts > 300).all(), counts  # uniform over 0..N−2, all indices drawn
    assert len({module.loss.draw_pair_index(1281, seed, s) for s in range(20)}) > 15  # new draws every step


def test_pair_sigmas_are_shifted_adjacent_grid_points():
    grid = karras_grid(41)
    sigma_a, sigma_b, sigma_0 = pair_sigmas(39, 41, 16 / 64)
    assert (sigma_a, sigma_b) == pytest.approx((0.25 * float(grid[39]), 0.25 * SIGMA_MIN))
    assert sigma_0 == pytest.approx(0.25 * SIGMA_MIN)


def test_noise_is_seeded_by_batch():
    module = nano()
    x = torch.zeros(2, 3, 16, 16)

    def noise(batch: int) -> torch.Tensor:
        module.batches_seen = batch
        return module.loss.noise_like(x, module.noise_generator(x.device))

    assert torch.equal(noise(5), noise(5))  # keyed by the batch counter
    assert not torch.equal(noise(5), noise(6))


def test_tau_schedules():
    def tau(module: PretrainModule, sigma_a: float, updates: int) -> float:
        return module.loss.consistency_tau(sigma_a, updates, module.hparams.total_steps)

    assert tau(nano(), 3.0, 0) == 0.1
    interp = nano(loss=RCMLoss(tau_schedule="interpolated", tau_min=0.1, tau_max=0.5))
    assert tau(interp, SIGMA_MIN, 0) == pytest.approx(0.1)
    assert tau(interp, SIGMA_MAX, 0) == pytest.approx(0.5)
    cosine = nano(loss=RCMLoss(tau_schedule="cosine", tau_min=0.1, tau_start=0.4, tau_end=0.2), total_steps=300)
    assert tau(cosine, SIGMA_MAX, 0) == pytest.approx(0.4)
    assert tau(cosine, SIGMA_MAX, 200) == pytest.approx(0.2)
    assert tau(cosine, SIGMA_MAX, 300) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="tau_schedule"):
        nano(loss=RCMLoss(tau_schedule="linear"))


def test_lr_schedule_and_optimizer():
    module = nano(warmup_steps=10, total_steps=110)
    assert [module.lr_multiplier(k) for k in (0, 5, 10, 60, 110)] == pytest.approx([0, 0.5, 1, 0.5, 0])
    optimizer = module.configure_optimizers()["optimizer"]
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["lr"] == 6e-4
    (group,) = optimizer.param_groups  # weight decay on all parameters (method.md §3.7)
    assert group["weight_decay"] == 0.03
    assert len(group["params"]) == len(list(module.online.parameters()))


def _hand_nce(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / tau
    return F.cross_entropy(logits, torch.arange(q.shape[0]), reduction="none")


def test_losses_match_a_direct_computation():
    torch.manual_seed(0)
    module = nano()
    module.train()
    for p in module.target.parameters():  # make the target differ from the online network
        p.data.add_(0.05 * torch.randn_like(p))
    b = 6
    x0, v1, v2, eps = (torch.randn(b, 3, 16, 16) for _ in range(4))
    sa, sb, s0 = 2.0, 1.5, 0.0005
    out = module.loss.terms(module.online, module.target, x0, v1, v2, eps, sa, sb, s0, tau_r=0.1)

    def run(net, x, sigma):  # (z, h) with a separate pass per input, as in the official step
        sigma = torch.full((b,), sigma)
        return net(c_in(sigma).view(-1, 1, 1, 1) * x, c_noise(sigma))

    z1, _ = run(module.online, v1 + s0 * eps, s0)
    z2, _ = run(module.online, v2 + s0 * eps, s0)
    with torch.no_grad():
        k1, _ = run(module.target, v1 + s0 * eps, s0)
        k2, _ = run(module.target, v2 + s0 * eps, s0)
        _, h_b = run(module.online, x0 + sb * eps, sb)
    _, h_a = run(module.online, x0 + sa * eps, sa)
    contrastive = _hand_nce(z1, k2, 0.2) + _hand_nce(z2, k1, 0.2)
    consistency = _hand_nce(h_a, h_b, 0.1)
    assert out.contrastive.item() == pytest.approx(contrastive.mean().item(), rel=1e-5)
    assert out.consistency.item() == pytest.approx(consistency.mean().item(), rel=1e-5)
    assert out.loss.item() == pytest.approx((contrastive + consistency).mean().item(), rel=1e-5)


def test_loss_gradients_reach_only_the_online_network():
    module = nano()
    module.train()
    x = torch.randn(4, 3, 16, 16)
    eps = torch.randn_like(x)
    module.loss.terms(module.online, module.target, x, x, x.flip(-1), eps, 1.0, 0.8, 0.0005, 0.1).loss.backward()
    assert all(p.grad is not None for p in module.online.parameters())
    assert all(p.grad is None and not p.requires_grad for p in module.target.parameters())


def test_both_terms_on_a_hand_example():
    """Channel-constant images, features = channel means, identity projectors: every logit is known by hand."""
    module = nano()
    module.loss.represent = lambda net, x, sigma: x.mean(dim=(2, 3))
    module.online.projection_head = torch.nn.Identity()
    module.online.projection_head.track_statistics = lambda h: None  # no BN statistics to update
    module.target.projection_head = torch.nn.Identity()

    def images(*rgb):
        return torch.tensor(rgb, dtype=torch.float32).view(len(rgb), 3, 1, 1).expand(-1, -1, 4, 4)

    v1, v2 = images((1, 0, 0), (0, 1, 0)), images((1, 1, 0), (0, 1, 0))
    x0, eps = images((1, 0, 0), (0, 0, 1)), images((0, 1, 0), (0, 0, 0))
    out = module.loss.terms(
        module.online, module.target, x0, v1, v2, eps, sigma_a=1.0, sigma_b=0.0, sigma_0=0.0, tau_r=0.1
    )
    s, tc, tr = 1 / math.sqrt(2), 0.2, 0.1
    # NCE(v1 → v2): queries (1,0,0), (0,1,0); keys (1,1,0)/√2, (0,1,0).
    forward = [math.log(math.exp(s / tc) + 1) - s / tc, math.log(math.exp(s / tc) + math.exp(1 / tc)) - 1 / tc]
    # NCE(v2 → v1): queries (1,1,0)/√2, (0,1,0); keys (1,0,0), (0,1,0).
    backward = [math.log(2), math.log(1 + math.exp(1 / tc)) - 1 / tc]
    # Consistency: x_a = (1,1,0), (0,0,1) against the stop-gradient x_b = (1,0,0), (0,0,1).
    consistency = [math.log(math.exp(s / tr) + 1) - s / tr, math.log(1 + math.exp(1 / tr)) - 1 / tr]
    contrastive = (sum(forward) + sum(backward)) / 2
    close = lambda value: pytest.approx(value, rel=1e-5, abs=1e-6)  # noqa: E731  (fp32 logsumexp)
    assert out.contrastive.item() == close(contrastive)
    assert out.consistency.item() == close(sum(consistency) / 2)
    assert out.loss.item() == close(contrastive + sum(consistency) / 2)


def test_ema_update_math_and_modes():
    torch.manual_seed(0)
    module = nano()
    module.train()
    assert module.online.training and not module.target.training  # §3.5: the target runs in eval mode
    before = {k: v.clone() for k, v in module.target.state_dict().items()}
    for p in module.online.parameters():
        p.data.add_(torch.randn_like(p))
    for buf in module.online.buffers():
        if buf.is_floating_point():
            buf.add_(1.0)
    module.on_applied_update()
    online = dict(module.online.named_parameters())
    for name, p in module.target.named_parameters():
        torch.testing.assert_close(p, 0.99 * before[name] + 0.01 * online[name])
    for name, buf in module.target.named_buffers():  # parameters only: BN statistics untouched (§10.2)
        assert torch.equal(buf, before[name])
    assert nano(target_bn_train_mode=True).train().target.training


def test_hparams_and_stage1_handover(tmp_path):
    module = nano(network={"proj_out": 8})
    assert module.hparams.preset == "EPG-Nano/4" and module.hparams.network == {"proj_out": 8}
    assert module.shift == 0.25
    keys = module.state_dict().keys()
    assert any(k.startswith("online.encoder.") for k in keys) and any(k.startswith("target.") for k in keys)
    path = tmp_path / "stage1.ckpt"
    module.export_stage1(path)
    loaded = load_stage1_representation(path)
    assert loaded.projection_head[-1].out_features == 8
    for (name, a), b in zip(module.online.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

"""InfoNCE, pseudo-Huber, EMA and LR schedules against hand computations (method.md §3.5–§3.7, §4, §5)."""

import math

import pytest
import torch

from epg.method.ema import ema_update_
from epg.method.losses import gather_local_first, info_nce, pseudo_huber
from epg.method.lr import warmup_cosine, warmup_steps_schedule


def test_info_nce_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    k = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]])  # B_g = 3 keys, local chunk first
    tau = 0.5
    loss = info_nce(q, k, tau)
    s = 1 / math.sqrt(2)
    # query 0: sims (1, s, 0) / τ; positive key 0.  query 1: sims (0, s, −1) / τ; positive key 1.
    l0 = math.log(math.exp(2) + math.exp(2 * s) + math.exp(0)) - 2
    l1 = math.log(math.exp(0) + math.exp(2 * s) + math.exp(-2)) - 2 * s
    assert loss.tolist() == pytest.approx([l0, l1], rel=1e-6)


def test_info_nce_keys_get_no_gradient_and_fp32():
    q = torch.randn(4, 8, requires_grad=True)
    k = torch.randn(4, 8, requires_grad=True)
    loss = info_nce(q.bfloat16(), k, 0.2)
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert q.grad is not None and k.grad is None


def test_gather_is_identity_without_process_group():
    k = torch.randn(3, 4, requires_grad=True)
    out = gather_local_first(k)
    assert torch.equal(out, k) and not out.requires_grad


def test_pseudo_huber_gradient_equals_twice_sqrt_metric():
    s = torch.tensor([0.0, 0.01, 3.0], requires_grad=True)
    pseudo_huber(s, 0.06).sum().backward()
    g1 = s.grad.clone()
    s.grad = None
    (2 * (torch.sqrt(s + 0.06**2) - 0.06)).sum().backward()
    assert torch.allclose(g1, s.grad)
    assert pseudo_huber(torch.tensor(3.0), 0.06).item() == pytest.approx(3 / math.sqrt(3 + 0.0036))


def test_ema_update_params_only():
    online = torch.nn.BatchNorm1d(2)
    target = torch.nn.BatchNorm1d(2)
    online.weight.data.fill_(3.0)
    online.running_mean.fill_(5.0)
    ema_update_(target, online, 0.99)
    assert torch.allclose(target.weight, torch.full((2,), 0.99 * 1 + 0.01 * 3))
    assert torch.equal(target.running_mean, torch.zeros(2))  # buffers are not averaged (method.md §3.5)
    ema_update_(target, online, 0.0)
    assert torch.equal(target.weight, online.weight)


def test_lr_schedules():
    assert warmup_cosine(0, 10, 110) == 0.0
    assert warmup_cosine(5, 10, 110) == 0.5
    assert warmup_cosine(10, 10, 110) == 1.0
    assert warmup_cosine(60, 10, 110) == pytest.approx(0.5)
    assert warmup_cosine(110, 10, 110) == 0.0
    # The official bands close on the milestone: x1 while k <= 400K, x0.3 while k <= 500K (method.md §5.5).
    steps = (5_000, 10_000, 400_000, 400_001, 500_000, 500_001)
    assert [warmup_steps_schedule(k, 10_000) for k in steps] == [0.5, 1.0, 1.0, 0.3, 0.3, 0.08]

"""Exponential moving averages of parameters with foreach ops (method.md §3.5, §4, §5.2)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, decay: float) -> None:
    """θ⁻ ← m·θ⁻ + (1 − m)·θ over parameters only (buffers untouched, method.md §3.5); m = 0 copies θ."""
    t_params = [p for p in target.parameters()]
    o_params = [p.detach() for p in online.parameters()]
    if len(t_params) != len(o_params):
        raise ValueError(f"EMA target has {len(t_params)} parameters but the online model {len(o_params)}")
    if decay == 0.0:
        torch._foreach_copy_(t_params, o_params)
    else:
        torch._foreach_lerp_(t_params, o_params, 1.0 - decay)

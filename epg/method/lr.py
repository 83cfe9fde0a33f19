"""Learning-rate multipliers as functions of the applied-update count (method.md §3.7, §4, §5.5)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from 0 over ``warmup_steps``, then cosine to 0 at ``total_steps`` (method.md §3.7, §4)."""
    if step < warmup_steps:
        return step / warmup_steps
    if step >= total_steps:
        return 0.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps_schedule(
    step: int, warmup_steps: int, milestones: Sequence[int] = (400_000, 500_000), factors: Sequence[float] = (0.3, 0.08)
) -> float:
    """Linear warmup, then ×1 up to and including the first milestone, ×factors[i] after milestone i (method.md §5.5).

    The bands close on the milestone as in the official schedule (×1 while step ≤ 400K, ×0.3 while step ≤ 500K), so
    the factor changes with the update that follows the milestone step.
    """
    if step < warmup_steps:
        return step / warmup_steps
    factor = 1.0
    for milestone, f in zip(milestones, factors, strict=True):
        if step > milestone:
            factor = f
    return factor

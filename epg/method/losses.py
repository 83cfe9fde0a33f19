"""InfoNCE with cross-rank negatives and the pseudo-Huber metric (method.md §3.6, §5.4)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_local_first(keys: torch.Tensor) -> torch.Tensor:
    """All-gather ``keys`` (B, C) from every rank without gradient, the local chunk first (method.md §3.6).

    Outside a process group this is the identity. Every rank must hold the same B.
    """
    keys = keys.detach()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return keys
    chunks = [torch.empty_like(keys) for _ in range(dist.get_world_size())]
    dist.all_gather(chunks, keys.contiguous())
    rank = dist.get_rank()
    return torch.cat([chunks[rank], *chunks[:rank], *chunks[rank + 1 :]], dim=0)


def info_nce(queries: torch.Tensor, keys: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """Per-query NCE ℓ_i = logsumexp_j(q̂_i·k̂_j/τ) − q̂_i·k̂_i/τ, key i the positive of query i (method.md §3.6).

    ``queries`` is the local (B, C) batch, ``keys`` (B_g, C) with the local chunk first (see
    :func:`gather_local_first`); keys are treated as constants. Computed in fp32. Returns (B,).
    """
    if keys.shape[0] < queries.shape[0]:
        raise ValueError(f"need at least as many keys ({keys.shape[0]}) as queries ({queries.shape[0]})")
    q = F.normalize(queries.float(), dim=-1)
    k = F.normalize(keys.detach().float(), dim=-1)
    logits = q @ k.T / tau
    return torch.logsumexp(logits, dim=1) - logits.diagonal()


def pseudo_huber(sq_dist: torch.Tensor, c: float) -> torch.Tensor:
    """ℓ = s / √(sg(s) + c²) for a per-sample squared distance s; grad = 2·∇(√(s + c²) − c) (method.md §5.4)."""
    return sq_dist / torch.sqrt(sq_dist.detach() + c**2)

"""The stage-1 projector head (method.md §2.1)."""

from __future__ import annotations

import torch
from torch import nn

from epg.nn.layers import xavier_init_linears


class Projector(nn.Sequential):
    """Linear→BN→ReLU→Linear→BN→ReLU→Linear, no biases, no final BN (method.md §2.1).

    Indices 0, 3, 6 are the Linears and 1, 4 the BNs, as in the official `projection_head`. Convert to SyncBN
    with ``nn.SyncBatchNorm.convert_sync_batchnorm`` (Lightning's ``sync_batchnorm=True`` does it).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim, bias=False),
        )
        xavier_init_linears(self)

    @torch.no_grad()
    def track_statistics(self, h: torch.Tensor) -> None:
        """Update the BN running statistics as a train-mode pass on ``h`` would (nothing in eval mode), skipping the
        output layer and the gradient: for inputs whose projection is unused but pass the projector in the official
        step (method.md §3.8 step 4)."""
        if not self.training:
            return
        for layer in list(self)[:-1]:  # the output Linear does not feed a BN
            h = layer(h)

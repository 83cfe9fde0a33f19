"""Callbacks usable from YAML (LightningCLI `trainer.callbacks`)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ThroughputMonitor


def _batch_size(batch: Any) -> int:
    return int(batch[0].shape[0])


class Throughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor for EPG batches: samples/s, and TFLOP/s + MFU from ``flops_per_batch``.

    The modules provide ``flops_per_batch`` from the analytic counts of :mod:`epg.nn.flops`; MFU needs a device
    whose peak Lightning knows (e.g. H100/H200).
    """

    def __init__(self, window_size: int = 50, **kwargs: Any) -> None:
        super().__init__(batch_size_fn=_batch_size, window_size=window_size, **kwargs)

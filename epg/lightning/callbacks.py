"""Callbacks usable from YAML (LightningCLI `trainer.callbacks`)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from lightning.pytorch.callbacks import ThroughputMonitor

from epg.lightning.predict import SampleBatch
from epg.nn.flops import dense_peak_tflops


def _batch_size(batch: Any) -> int:
    """Images in a batch: (x, ...) tensors in fit and validate, a SampleBatch of image indices in `epg predict`."""
    return len(batch) if isinstance(batch, SampleBatch) else int(batch[0].shape[0])


class Throughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor for EPG batches: samples/s, and TFLOP/s + MFU from ``flops_per_batch``.

    The modules provide ``flops_per_batch`` from the analytic counts of :mod:`epg.nn.flops`. MFU divides by the
    dense bf16/fp16 peak of :data:`epg.nn.flops.DENSE_PEAK_TFLOPS` for H200/H100/A100 names under mixed precision
    (Lightning's table has no plain "NVIDIA H200" and lists sparse peaks), else by Lightning's own number.
    """

    def __init__(self, window_size: int = 50, **kwargs: Any) -> None:
        super().__init__(batch_size_fn=_batch_size, window_size=window_size, **kwargs)

    def setup(self, trainer, pl_module, stage: str) -> None:
        device, peak = trainer.strategy.root_device, None
        if device.type == "cuda":
            half = getattr(trainer.precision_plugin, "precision", "") in ("bf16-mixed", "16-mixed", "bf16-true")
            peak = dense_peak_tflops(torch.cuda.get_device_name(device), half_precision=half)
        if peak is None:
            super().setup(trainer, pl_module, stage)
            return
        with warnings.catch_warnings():  # Lightning's "FLOPs not found for 'NVIDIA H200'": we know the peak
            warnings.simplefilter("ignore")
            super().setup(trainer, pl_module, stage)
        self.available_flops = int(peak * 1e12)
        for throughput in self._throughputs.values():
            throughput.available_flops = self.available_flops

"""Pieces the lifecycle runs load from YAML (class_path): a per-step probe and an fp16 plugin for CPU."""

from __future__ import annotations

import json
import math

import lightning as L
import torch
from lightning.pytorch.plugins import MixedPrecision


class CPUFloat16(MixedPrecision):
    """ "16-mixed" with a GradScaler on CPU (Lightning maps ``precision="16-mixed"`` on CPU to bf16)."""

    def __init__(self) -> None:
        super().__init__("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


def _flat(params) -> torch.Tensor:
    """One fp32 vector of the (local shards of the) parameters."""
    return torch.cat([(p.to_local() if hasattr(p, "to_local") else p).detach().float().flatten() for p in params])


def _pairs(module) -> list[tuple[str, torch.nn.Module, torch.nn.Module, float]]:
    """(name, averaged copy, online network, decay) for each EMA / target copy of the module."""
    if hasattr(module, "ema_nets"):  # FinetuneModule
        pairs = [
            (f"ema{i}", ema, module.net, rate)
            for i, (ema, rate) in enumerate(zip(module.ema_nets, module.hparams.ema_rates, strict=True))
        ]
        if module.target_net is not None:
            pairs.append(("target", module.target_net, module.net, 0.0))
        return pairs
    return [("target", module.target, module.online, module.hparams.target_momentum)]  # PretrainModule


class Probe(L.Callback):
    """Appends one JSON line per training step to ``path``: counters, LR, grad norms, schedules, EMA residuals.

    ``ema_residual``: max |copy − (m·copy_before + (1 − m)·online)| over all parameters (0 when the rule held; on a
    step the grad scaler skipped, max |copy − copy_before|); ``ema_distance``: ‖copy − online‖ after the step.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._before: dict[str, torch.Tensor] = {}
        self._updates = self._clipped = 0
        self._lr = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = {name: _flat(copy.parameters()) for name, copy, _, _ in _pairs(pl_module)}
        self._updates, self._clipped = pl_module.updates, pl_module.clipped_updates
        self._lr = trainer.optimizers[0].param_groups[0]["lr"]  # the LR of this step's update

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        applied = pl_module.updates - self._updates
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        record = {
            "step": trainer.global_step,
            "updates_before": self._updates,
            "applied": applied,
            "clipped": pl_module.clipped_updates - self._clipped,
            "lr": self._lr,
            "loss": float(metrics["train/loss"]),
            "grad_norm": float(metrics.get("train/grad_norm", math.nan)),
            "grad_norm_after": float(torch.nn.utils.get_total_norm(grads)) if grads else math.nan,
            "fused": bool(trainer.optimizers[0].defaults.get("fused")),
            "scale": scaler.get_scale() if scaler is not None else None,
        }
        for key in ("ect_stage", "num_scales"):
            if f"train/{key}" in metrics:
                record[key] = int(metrics[f"train/{key}"])
        for name, copy, online, decay in _pairs(pl_module):
            after, before, net = _flat(copy.parameters()), self._before[name], _flat(online.parameters())
            expected = torch.lerp(before, net, 1.0 - decay) if applied else before
            record[f"{name}_residual"] = float((after - expected).abs().max())
            record[f"{name}_distance"] = float((after - net).norm())
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

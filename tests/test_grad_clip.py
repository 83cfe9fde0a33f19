"""Gradient clipping after warm-up with the optimizer the modules build, on every precision (method.md §4, §3.7).

The GPU path is forced on CPU: ``Tensor.is_cuda`` reads True (device checks take their CUDA branch), fused AdamW
runs on CPU, and "16-mixed" with a GradScaler runs through a CPU ``MixedPrecision`` plugin (Lightning maps a plain
``precision="16-mixed"`` on CPU to bf16).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from epg.lightning.finetune import FinetuneModule
from tests._trainers import cpu_trainer

CLIP = 1e-3  # far below any gradient norm here: every step after warm-up is clipped


def _loader(n_batches: int = 4, batch: int = 4) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n_batches * batch, 3, 16, 16, generator=gen).clamp(-1, 1)
    y = torch.randint(0, 10, (n_batches * batch,), generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


class GradProbe(L.Callback):
    """Per step: the true gradient norm before the module's hooks, the logged grad norm, the norm after the clip."""

    def __init__(self) -> None:
        self.before: list[float] = []
        self.logged: list[float] = []
        self.after: list[float] = []

    @staticmethod
    def _norm(module) -> float:
        return float(torch.nn.utils.get_total_norm([p.grad for p in module.parameters() if p.grad is not None]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # runs before the module's own hook
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        handles = getattr(optimizer, "_step_supports_amp_scaling", False)
        divide = scaler.get_scale() if scaler is not None and handles else 1.0  # still scaled for a fused optimizer
        self.before.append(self._norm(pl_module) / divide)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.logged.append(float(trainer.callback_metrics["train/grad_norm"]))
        self.after.append(self._norm(pl_module))  # unscaled (and clipped) by now; zeroed only before the next step


def _fit(precision: str, impl: str | None = None, steps: int = 4) -> tuple[FinetuneModule, GradProbe]:
    choice = {} if impl is None else {"optimizer_impl": impl}  # None: the module's default
    module = FinetuneModule(
        preset="EPG-Nano/4", network={"image_size": 16}, warmup_steps=1, grad_clip=CLIP, sample_every_n_val=0, **choice
    )
    probe = GradProbe()
    if precision == "16-mixed":  # fp16 autocast + GradScaler on CPU
        # Scale 2^4: the paper's 2^14 overflows this random network's fp16 backward for 3 steps (skipped, as it
        # should); 16 keeps every step applied while the scaled norm still differs 16x from the true one.
        module.hparams.paper_grad_scaler = False
        plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**4))
        trainer = cpu_trainer(plugins=[plugin], max_steps=steps, log_every_n_steps=1, callbacks=[probe])
    else:
        trainer = cpu_trainer(precision=precision, max_steps=steps, log_every_n_steps=1, callbacks=[probe])
    trainer.fit(module, train_dataloaders=_loader())
    return module, probe


def test_issue_reproduction_fused_under_bf16_with_cuda_device_checks(monkeypatch):
    """The reproduction of the bug: fused AdamW (picked for CUDA) + bf16-mixed + a clipped update used to raise."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    module, probe = _fit("bf16-mixed")
    assert module.trainer.optimizers[0].defaults["fused"] is True
    assert module.updates == 4  # update 1 is warm-up; updates 2-4 are clipped
    assert probe.after[1:] == pytest.approx([CLIP] * 3, rel=1e-3)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_clip_after_warmup_on_unscaled_gradients(precision, impl):
    module, probe = _fit(precision, impl)
    optimizer = module.trainer.optimizers[0]
    assert optimizer.defaults["fused" if impl == "fused" else "foreach"] is True
    if precision == "16-mixed":
        assert module.trainer.precision_plugin.scaler.get_scale() == 16.0
        assert module.skipped_updates == 0
    # The logged norm is the true one (what the clip sees), not the loss-scaled one (×2^14 under fp16).
    assert probe.logged == pytest.approx(probe.before, rel=1e-4)
    assert all(n > 10 * CLIP for n in probe.logged)
    # Step 1 is inside warm-up: not clipped. From the first update after warm-up on, the clip holds.
    assert probe.after[0] == pytest.approx(probe.before[0], rel=1e-4)
    assert probe.after[1:] == pytest.approx([CLIP] * 3, rel=1e-3)
    assert module.clipped_updates == 3


def test_unknown_optimizer_impl_is_refused():
    module = FinetuneModule(preset="EPG-Nano/4", network={"image_size": 16}, optimizer_impl="apex")
    with pytest.raises(ValueError, match="optimizer_impl must be one of"):
        module.configure_optimizers()


@pytest.mark.parametrize(("saved", "now"), [("foreach", "fused"), ("fused", "foreach")])
def test_resumed_optimizer_state_keeps_this_runs_implementation(saved, now):
    """torch's load_state_dict copies fused/foreach from the saved groups; training starts with the chosen one."""
    from types import SimpleNamespace

    old = FinetuneModule(preset="EPG-Nano/4", network={"image_size": 16}, sample_every_n_val=0, optimizer_impl=saved)
    opt_old = old.configure_optimizers()["optimizer"]
    for p in old.net.parameters():
        p.grad = torch.ones_like(p)
    opt_old.step()
    new = FinetuneModule(preset="EPG-Nano/4", network={"image_size": 16}, sample_every_n_val=0, optimizer_impl=now)
    optimizer = new.configure_optimizers()["optimizer"]
    optimizer.load_state_dict(opt_old.state_dict())
    assert optimizer.param_groups[0][now] is not True  # what Lightning's restore leaves behind
    new._trainer = SimpleNamespace(optimizers=[optimizer])
    new.on_train_start()
    assert all(g[now] is True and g[saved] is False for g in optimizer.param_groups)
    for p in new.net.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()  # runs with the chosen implementation
    assert all(int(s["step"]) == 2 for s in optimizer.state.values())

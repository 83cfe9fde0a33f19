"""Shared LightningModule glue: optimizer groups, the compile flag, FSDP hooks (method.md §4, §11)."""

import pytest
import torch

from epg.lightning.base import param_groups
from epg.lightning.finetune import FinetuneModule
from epg.lightning.pretrain import PretrainModule
from tests._trainers import cpu_trainer


def test_no_weight_decay_on_pos_embed_and_cls():
    module = FinetuneModule(preset="EPG-Nano/4", sample_every_n_val=0)
    groups = param_groups(module.net, 0.01, no_decay=("pos_embed", "cls_token"))
    plain = {id(p) for p in groups[1]["params"]}
    assert groups[1]["weight_decay"] == 0.0 and len(plain) == 2
    assert id(module.net.encoder.pos_embed) in plain and id(module.net.encoder.cls_token) in plain
    assert sum(len(g["params"]) for g in groups) == len(list(module.net.parameters()))


def test_compile_flag_compiles_in_place_and_keeps_keys():
    module = FinetuneModule(preset="EPG-Nano/4", sample_every_n_val=0, compile=True)
    keys = list(module.state_dict())
    module.configure_model()  # no device mesh here: no sharding, only compilation
    assert module.net._compiled_call_impl is not None
    assert all(ema._compiled_call_impl is None for ema in module.ema_nets)  # only what training runs
    assert list(module.state_dict()) == keys
    pre = PretrainModule(preset="EPG-Nano/4", compile=True)
    pre.configure_model()
    assert pre.online._compiled_call_impl is not None and pre.target._compiled_call_impl is not None


def test_without_compile_nothing_changes():
    module = PretrainModule(preset="EPG-Nano/4")
    module.configure_model()
    assert module.online._compiled_call_impl is None
    assert isinstance(module.online, torch.nn.Module) and module.sharded_networks() == [module.online, module.target]


def test_throughput_callback_logs_samples_and_flops(tmp_path):
    import lightning as L

    from epg.lightning.callbacks import Throughput
    from epg.nn.flops import train_flops_per_image

    data = [(torch.randn(4, 3, 16, 16).clamp(-1, 1), torch.randint(0, 10, (4,))) for _ in range(6)]
    module = FinetuneModule(preset="EPG-Nano/4", sample_every_n_val=0, warmup_steps=1)
    logged = {}

    class Grab(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.update(trainer.callback_metrics)

    trainer = cpu_trainer(
        max_steps=6,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        log_every_n_steps=1,
        callbacks=[Throughput(window_size=2), Grab()],
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    assert module.flops_per_batch == 4 * train_flops_per_image("finetune", "EPG-Nano/4")
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "train/device/samples_per_sec" in metrics and "train/device/flops_per_sec" in metrics


def test_gradient_accumulation_updates_ema_once_per_optimizer_step():

    data = [(torch.randn(4, 3, 16, 16).clamp(-1, 1), torch.randint(0, 10, (4,))) for _ in range(6)]
    module = FinetuneModule(preset="EPG-Nano/4", sample_every_n_val=0, warmup_steps=1, ema_rates=(0.5,))
    ema_updates = []
    original = module.on_applied_update
    module.on_applied_update = lambda: (ema_updates.append(module.updates), original())[1]
    trainer = cpu_trainer(max_epochs=1, accumulate_grad_batches=3)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    assert module.updates == 2 and ema_updates == [1, 2] and trainer.global_step == 2


@pytest.mark.parametrize(
    ("name", "precision", "peak"),
    [
        ("NVIDIA H200", "bf16-mixed", 790e12),  # Lightning: "FLOPs not found" -> no MFU
        ("NVIDIA H200", "16-mixed", 790e12),
        ("NVIDIA H100 80GB HBM3", "bf16-mixed", 989.4e12),
        ("NVIDIA H100 PCIe", "16-mixed", 756e12),
        ("NVIDIA A100-SXM4-80GB", "bf16-mixed", 312e12),
        ("NVIDIA H200", "32-true", None),  # no dense fp32 peak of ours: Lightning's lookup (none for this name)
    ],
)
def test_throughput_mfu_peak_for_device_names(monkeypatch, name, precision, peak):
    """The Throughput callback's MFU denominator on CUDA devices named as torch reports them (forced on CPU)."""
    from types import SimpleNamespace

    from lightning.pytorch.plugins import MixedPrecision, Precision

    from epg.lightning.callbacks import Throughput

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    plugin = MixedPrecision(precision, "cuda") if "mixed" in precision else Precision()
    plugin.precision = precision
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device("cuda", 0)),
        precision_plugin=plugin,
        enable_validation=False,
        world_size=8,
        state=SimpleNamespace(stage="train"),
    )
    callback = Throughput()
    callback.setup(trainer, None, "fit")
    assert callback.available_flops == peak
    assert [t.available_flops for t in callback._throughputs.values()] == [peak]

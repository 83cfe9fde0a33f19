"""CUDA-only branches taken on CPU (the README's "GPU code paths" table lists where each is tested)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from epg.lightning.base import PAPER_SCALER
from epg.lightning.finetune import FinetuneModule
from epg.method.objectives.consistency import _rng_devices


def test_shared_dropout_forks_the_rng_of_the_tensor_cuda_device(monkeypatch):
    """The CM's shared dropout (method.md §5.2) forks the CUDA generator of the device the batch is on."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert _rng_devices(SimpleNamespace(device=torch.device("cuda", 1))) == [1]
    assert _rng_devices(SimpleNamespace(device=torch.device("cuda"))) == [3]  # "cuda" = the current device
    assert _rng_devices(torch.zeros(1)) == []


def test_paper_grad_scaler_is_swapped_in_for_a_cuda_16_mixed_plugin(monkeypatch):
    """setup() replaces Lightning's default scaler with the paper's (method.md §3.7) on the plugin's device."""
    made = []
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, **kw: made.append((device, kw)) or "paper")
    plugin = SimpleNamespace(scaler="lightning's", device="cuda")  # MixedPrecision("16-mixed", "cuda") as seen here
    module = FinetuneModule(preset="EPG-Nano/4", network={"image_size": 16}, sample_every_n_val=0)
    module._trainer = SimpleNamespace(precision_plugin=plugin)
    module.setup("fit")
    assert made == [("cuda", PAPER_SCALER)] and plugin.scaler == "paper"
    bf16 = SimpleNamespace(scaler=None, device="cuda")  # bf16-mixed: no scaler, nothing to swap
    module._trainer = SimpleNamespace(precision_plugin=bf16)
    module.setup("fit")
    assert len(made) == 1 and bf16.scaler is None


def test_inception_convolutions_are_ieee_on_cuda_and_restored():
    """FID features on CUDA use full-fp32 convolutions (no TF32), and the global setting comes back afterwards."""
    from epg.eval.inception import ieee_convolutions

    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    conv.fp32_precision = "tf32"
    try:
        with ieee_convolutions(torch.device("cuda")):
            assert conv.fp32_precision == "ieee"
        assert conv.fp32_precision == "tf32"
        with ieee_convolutions(torch.device("cpu")):
            assert conv.fp32_precision == "tf32"
    finally:
        conv.fp32_precision = before


def _torch_loader(loader) -> torch.utils.data.DataLoader:
    """The torch DataLoader a WebDataset loader wraps (``.pipeline`` of a WebLoader, ``.loader`` of a TrainLoader)."""
    while not isinstance(loader, torch.utils.data.DataLoader):
        loader = loader.loader if hasattr(loader, "loader") else next(iter(loader.pipeline))
    return loader


def test_loaders_pin_memory_when_cuda_is_available(tmp_path, monkeypatch):
    from epg.data.datamodule import EPGDataModule
    from epg.data.demo import prepare_demo

    info = prepare_demo(tmp_path)
    for cuda in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        dm = EPGDataModule(
            train_shards=info["train_shards"], val_shards=info["val_shards"], image_size=16, global_batch_size=8,
            num_classes=10, num_workers=0,
        )  # fmt: skip
        dm.setup("fit")
        for loader in (dm.train_dataloader(), dm.val_dataloader()):
            assert _torch_loader(loader).pin_memory is cuda

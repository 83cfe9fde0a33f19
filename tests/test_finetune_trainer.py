"""FinetuneModule through a Lightning Trainer on CPU: checkpoint layout, load_denoiser, exact resume, sample grids."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from epg.checkpoint import load_denoiser
from epg.lightning.finetune import FinetuneModule
from epg.method.objectives import ConsistencyLoss
from tests.test_finetune_module import NANO, write_stage1


def loader(n: int = 16, batch: int = 4, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g) * 0.5
    y = torch.randint(0, 11, (n,), generator=g)  # 10 = the null label
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def trainer(root, max_steps: int, **kwargs) -> L.Trainer:
    kwargs.setdefault("logger", False)
    kwargs.setdefault("limit_val_batches", 0)
    return L.Trainer(
        default_root_dir=root,
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        **kwargs,
    )


def module(stage1: str, objective: str, **kwargs) -> FinetuneModule:
    return FinetuneModule(
        preset=NANO,
        network={"drop": 0.5} if objective == "consistency" else None,
        init_from=stage1,
        warmup_steps=1,
        total_steps=50,
        ema_rates=(0.5, 0.9),
        loss=ConsistencyLoss(ect_d0=2, ect_d1=2) if objective == "consistency" else None,
        **kwargs,
    )


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("stage1") / "stage1.ckpt"
    write_stage1(path)
    return str(path)


def _assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("objective", ["diffusion", "consistency"])
def test_fit_checkpoint_and_exact_resume(tmp_path, stage1, objective):
    m = module(stage1, objective)
    t = trainer(tmp_path, max_steps=3)
    t.fit(m, loader())
    assert m.updates == 3 and t.global_step == 3
    assert not torch.equal(m.ema_nets[0].decoder.out.weight, m.net.decoder.out.weight)
    path = tmp_path / "run.ckpt"
    t.save_checkpoint(path)

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    keys = ckpt["state_dict"].keys()
    assert not any(k.startswith("target_net.") for k in keys)  # a copy of the online network
    assert any(k.startswith("aux_net.") for k in keys) == (objective == "consistency")  # resumes need no init_from
    assert any(k.startswith("ema_nets.1.") for k in keys)
    hp = ckpt["hyper_parameters"]
    loss = {"diffusion": "DiffusionLoss", "consistency": "ConsistencyLoss"}[objective]
    assert (hp["preset"], hp["loss"]["class_path"], hp["normalization"], list(hp["ema_rates"])) == (
        NANO, f"epg.method.objectives.{loss}", "imagenet", [0.5, 0.9])  # fmt: skip

    # The contract reader of epg.checkpoint: EMA by index, or the online weights.
    for ema, net in ((0, m.ema_nets[0]), (1, m.ema_nets[1]), (None, m.net)):
        loaded = load_denoiser(path, ema=ema)
        assert loaded.denoiser.parameterization == ("edm" if objective == "consistency" else "x0")
        _assert_same(loaded.denoiser.network, net)

    # Resume: the restored module matches the saved one exactly (EMA, updates, step), the CM target is the online copy.
    r = module(stage1, objective)
    t2 = trainer(tmp_path, max_steps=3)
    t2.fit(r, loader(), ckpt_path=path)
    assert r.updates == 3 and t2.global_step == 3
    _assert_same(r.net, m.net)
    _assert_same(r.ema_nets, m.ema_nets)
    if objective == "consistency":
        _assert_same(r.target_net, r.net)
        _assert_same(r.aux_net, m.aux_net)
    # load_from_checkpoint rebuilds the same way (the aux net comes from the checkpoint).
    again = FinetuneModule.load_from_checkpoint(path, weights_only=True)
    _assert_same(again.ema_nets, m.ema_nets)
    if objective == "consistency":
        _assert_same(again.aux_net, m.aux_net)
    # And training continues from there.
    t3 = trainer(tmp_path, max_steps=5)
    t3.fit(r, loader(), ckpt_path=path)
    assert r.updates == 5
    assert not torch.equal(r.ema_nets[0].decoder.out.weight, m.ema_nets[0].decoder.out.weight)


def test_a_fresh_fit_loads_init_from_and_a_resume_or_load_needs_no_stage1_file(tmp_path, stage1):
    """The Trainer's configure_model reads init_from into the encoder (and the CM's aux_net) before the first step;
    a checkpoint then resumes, and load_from_checkpoint loads, with the stage-1 file gone."""
    import shutil

    copy = tmp_path / "stage1.ckpt"
    shutil.copy(stage1, copy)
    m = module(str(copy), "consistency")
    assert m.weights_from is None  # the constructor reads no weights
    reference = module(str(copy), "consistency")
    reference.load_stage1()
    trainer(tmp_path, max_steps=0).fit(m, loader())
    assert m.weights_from == "init_from"
    _assert_same(m.net.encoder, reference.net.encoder)
    _assert_same(m.aux_net, reference.aux_net)
    for clone in (*m.ema_nets, m.target_net):  # restarted from the loaded online weights
        _assert_same(clone, m.net)
    trainer(tmp_path, max_steps=1).fit(m, loader())
    path = tmp_path / "run.ckpt"
    m.trainer.save_checkpoint(path)
    copy.unlink()
    loaded = FinetuneModule.load_from_checkpoint(path, weights_only=True)
    assert loaded.weights_from == "checkpoint"
    _assert_same(loaded.aux_net, m.aux_net)
    _assert_same(loaded.ema_nets, m.ema_nets)
    resumed = module(str(copy), "consistency")
    trainer(tmp_path, max_steps=2).fit(resumed, loader(), ckpt_path=path)
    assert resumed.updates == 2 and resumed.weights_from == "checkpoint"
    _assert_same(resumed.aux_net, m.aux_net)
    with pytest.raises(FileNotFoundError, match="init_from"):  # a fresh run without its stage-1 file
        trainer(tmp_path, max_steps=1).fit(module(str(copy), "consistency"), loader())


def test_resume_continues_the_uninterrupted_run(tmp_path, stage1):
    """Noise draws are seeded by (seed, step, rank), so 2 + 2 resumed steps equal 4 straight steps."""
    data = loader(n=4)  # one batch: the data order cannot differ after the resume
    torch.manual_seed(0)
    straight = module(stage1, "diffusion")
    trainer(tmp_path, max_steps=4).fit(straight, data)
    torch.manual_seed(0)
    first = module(stage1, "diffusion")
    t = trainer(tmp_path, max_steps=2)
    t.fit(first, data)
    t.save_checkpoint(tmp_path / "half.ckpt")
    resumed = module(stage1, "diffusion")
    trainer(tmp_path, max_steps=4).fit(resumed, data, ckpt_path=tmp_path / "half.ckpt")
    for a, b in zip(straight.ema_nets.parameters(), resumed.ema_nets.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_validation_logs_losses_and_a_sample_grid(tmp_path, stage1):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    m = module(stage1, "diffusion", grid_size=4, sampling={"steps": 3}, val_sigmas=(0.5, 2.0))
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    t = trainer(tmp_path, max_steps=2, logger=logger, limit_val_batches=2, val_check_interval=2)
    t.fit(m, loader(), loader(n=8, seed=1))
    metrics = t.callback_metrics
    assert {"val/loss", "val/ema_loss", "val/mse_sigma_0.5", "val/mse_sigma_2"} <= set(metrics)
    assert "train/loss" in metrics and "train/lr" not in metrics  # the LR curve is LearningRateMonitor's
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert "samples/heun" in events.Tags()["images"]
    # A fixed seed gives the same validation numbers twice.
    again = t.validate(m, loader(n=8, seed=1), verbose=False)[0]["val/loss"]
    assert again == pytest.approx(t.validate(m, loader(n=8, seed=1), verbose=False)[0]["val/loss"])

"""Fault handling: atomic checkpoint writes, NaN/inf losses, one-line config errors, EPGCLI defaults."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from epg import cli
from epg.commands.config_checks import check_config, config_error
from epg.commands.train import run_lightning_cli
from epg.lightning.faults import (
    AtomicCheckpointIO,
    ConfigError,
    NonFiniteLossError,
    NonFiniteWatch,
    SigtermCheckpoint,
)
from epg.lightning.finetune import FinetuneModule
from epg.lightning.pretrain import PretrainModule
from epg.method.objectives import ConsistencyLoss, DiffusionLoss, RCMLoss, nonfinite_span
from tests._trainers import cpu_trainer
from tests.test_finetune_module import write_stage1
from tests.test_resume import ENV, REPO, demo_data, write_config  # noqa: F401  (demo_data is a fixture)

NANO = "EPG-Nano/4"


def trainer(root: Path, steps: int, **kwargs) -> L.Trainer:
    """CPU trainer saving every step (step=N.ckpt and last.ckpt) through AtomicCheckpointIO."""
    return cpu_trainer(
        max_steps=steps,
        enable_checkpointing=True,
        limit_val_batches=0,
        log_every_n_steps=50,  # the NaN check then runs only before checkpoint saves
        default_root_dir=root,
        callbacks=[ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_last=True)],
        plugins=[AtomicCheckpointIO()],
        **kwargs,
    )


def images(n: int = 16, views: bool = False, bad: tuple[int, float] | None = None) -> DataLoader:
    """Batches of 4 16-px images; ``bad = (i, value)`` puts ``value`` into sample i (batch i // 4)."""
    x = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    if bad is not None:
        x[bad[0], 0, 0, 0] = bad[1]
    y = torch.arange(n) % 10
    return DataLoader(TensorDataset(*((x, x.flip(-1), x.roll(1, -1), y) if views else (x, y))), batch_size=4)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- atomic checkpoints ----------------------------------------------------------------------------------------------
def test_atomic_io_replaces_whole_files(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "sub" / "last.ckpt"
    io.save_checkpoint({"w": torch.ones(3)}, path)
    io.save_checkpoint({"w": torch.zeros(3)}, path)
    assert torch.equal(load(path)["w"], torch.zeros(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary sibling left


def test_killed_save_keeps_previous_last_checkpoint(tmp_path, monkeypatch):
    """A save that dies mid-write (torch.save raising after some bytes) leaves last.ckpt as the previous step's."""
    torch.manual_seed(0)
    module = FinetuneModule(preset=NANO, warmup_steps=1, total_steps=10, ema_rates=(0.9,), sample_every_n_val=0)
    real_save, calls = torch.save, []

    def dying_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) < 5:  # step 1 and 2: step=N.ckpt and last.ckpt
            return real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")  # epg.io.save_torch hands torch.save its temporary path
        raise OSError("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="killed mid-write"):
        trainer(tmp_path, 4).fit(module, images())
    ckpt = load(tmp_path / "ckpt" / "last.ckpt")
    assert ckpt["global_step"] == 2 and ckpt["epg_updates"] == 2
    assert not list((tmp_path / "ckpt").glob("*.tmp*"))  # nor a hidden .NAME.tmp-PID


# ---- non-finite loss -------------------------------------------------------------------------------------------------
def test_nonfinite_span_picks_the_bad_samples():
    sigma = torch.tensor([0.5, 2.0, 8.0, 40.0])
    lo, hi = nonfinite_span(torch.tensor([1.0, float("nan"), 1.0, float("inf")]), sigma)
    assert (lo.item(), hi.item()) == (2.0, 40.0)
    lo, hi = nonfinite_span(torch.ones(4), sigma)  # none bad (e.g. the mean overflowed): the whole batch
    assert (lo.item(), hi.item()) == (0.5, 40.0)


def test_nonfinite_watch_keeps_the_first_bad_step():
    watch, module = NonFiniteWatch(), types.SimpleNamespace(_trainer=None, device=torch.device("cpu"))
    watch.record(torch.tensor(1.0), 0, 0.1, 0.2)
    watch.check(module, 0)
    watch.record(torch.tensor(float("nan")), 1, 0.3, 0.4)
    watch.record(torch.tensor(float("inf")), 2, 5.0, 6.0)
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite loss at step 1 \(σ' in \[0\.3, 0\.4\]; detected at step 3"
    ):
        watch.check(module, 3)


def test_nan_in_dm_stops_naming_step_and_sigma(tmp_path, monkeypatch):
    """An inf pixel in one sample of step 2: the error names step 2 and that sample's σ'; no later checkpoint."""
    sigmas = []
    real_terms = DiffusionLoss.terms

    def recording_terms(self, denoiser, *args, **kwargs):
        terms = real_terms(self, denoiser, *args, **kwargs)
        sigmas.append(denoiser.shift * terms.sigma)
        return terms

    monkeypatch.setattr(DiffusionLoss, "terms", recording_terms)
    torch.manual_seed(0)
    module = FinetuneModule(preset=NANO, warmup_steps=1, total_steps=10, ema_rates=(0.9,), sample_every_n_val=0)
    with pytest.raises(NonFiniteLossError) as info:
        trainer(tmp_path, 4).fit(module, images(bad=(9, float("inf"))))  # sample 1 of batch 2
    expected = float(sigmas[2][1])
    assert f"non-finite loss at step 2 (σ' = {expected:.4g}; detected at step 3)" in str(info.value)
    ckpt = load(tmp_path / "ckpt" / "last.ckpt")
    assert ckpt["global_step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert not (tmp_path / "ckpt" / "epoch=0-step=3.ckpt").exists()


def test_nan_in_stage1_stops_naming_step_and_pair(tmp_path):
    torch.manual_seed(0)
    module = PretrainModule(preset=NANO, warmup_steps=1, total_steps=10)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 1 \(σ' in \[[0-9.e-]+, [0-9.e-]+\]"):
        trainer(tmp_path, 4).fit(module, images(views=True, bad=(5, float("nan"))))


def test_nan_in_cm_names_t(tmp_path):
    write_stage1(tmp_path / "stage1.ckpt")
    torch.manual_seed(0)
    module = FinetuneModule(
        preset=NANO, loss=ConsistencyLoss(), init_from=str(tmp_path / "stage1.ckpt"), warmup_steps=1, total_steps=10
    )
    # The auxiliary InfoNCE contrasts the samples of a batch, so one NaN image spoils them all: the span is the batch's.
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 0 \(t' in \[[0-9.e-]+, [0-9.e-]+\];"):
        trainer(tmp_path, 2).fit(module, images(bad=(2, float("nan"))))


def test_grad_scaler_runs_skip_the_nan_check():
    """Under 16-mixed the GradScaler skips inf/NaN steps (method.md §3.7): the guard stays out of the way."""
    module = FinetuneModule(preset=NANO, warmup_steps=1, total_steps=10, sample_every_n_val=0)
    plugin = types.SimpleNamespace(scaler=torch.amp.GradScaler("cpu"))
    module._trainer = types.SimpleNamespace(precision_plugin=plugin, global_step=3, world_size=1)
    module.watch_loss(torch.tensor(float("nan")), 1.0, 1.0)
    module.check_finite_loss()  # no error: the scaler skips the step
    assert module._loss_watch.describe() == "step 3 (σ' = 1)"  # kept for the consecutive-skip limit


# ---- config errors -----------------------------------------------------------------------------------------------
def test_check_config_names_the_option(tmp_path):
    with pytest.raises(ConfigError, match=r"^model\.init_args\.preset: unknown preset 'EPG-Q/16'"):
        check_config({"preset": "EPG-Q/16"}, {})
    with pytest.raises(ConfigError, match=r"^model\.init_args\.network\.patch_size: image_size 16 is not divisible"):
        check_config({"preset": NANO, "network": {"patch_size": 3}}, {})
    with pytest.raises(ConfigError, match=r"^data\.image_size: 32 px, but the model"):
        check_config({"preset": NANO}, {"image_size": 32, "train_shards": str(tmp_path)}, "fit")
    with pytest.raises(ConfigError, match=r"^data\.train_shards: no \*\.tar shards in"):
        check_config({"preset": NANO}, {"image_size": 16, "train_shards": str(tmp_path)}, "fit")
    with pytest.raises(ConfigError, match=r"^model\.init_args\.init_from: stage-1 checkpoint .* does not exist"):
        check_config({"preset": NANO, "init_from": str(tmp_path / "none.ckpt")}, {}, "fit")


def test_constructor_errors_name_the_argument():
    try:
        PretrainModule(preset=NANO, loss=RCMLoss(tau_schedule="sometimes"))
    except ValueError as err:
        loss = {"class_path": "epg.method.objectives.RCMLoss", "init_args": {"tau_schedule": "s"}}
        found = config_error(
            err, {"model": {"class_path": "x", "init_args": {"preset": NANO, "loss": loss}}}, ("model",)
        )
    assert found.option == "model.init_args.loss.init_args.tau_schedule"
    try:
        PretrainModule(preset=NANO, target_momentum=1.5)
    except ValueError as err:
        model = {"class_path": "x", "init_args": {"preset": NANO, "target_momentum": 1}}
        found = config_error(err, {"model": model, "data": {"seed": 0}}, ("model", "data"))
    assert found.option == "model.init_args.target_momentum"
    assert str(config_error(ValueError("names no option"), {"model": {}}, ("model",))) == "names no option"


def test_epg_cli_prints_one_line_errors(monkeypatch, capsys):
    def fail(args, run=True):
        raise NonFiniteLossError("non-finite loss at step 7 (σ' = 3.2; detected at step 8)")

    monkeypatch.setattr("epg.commands.train.run_lightning_cli", fail)
    assert cli.main(["fit", "-c", "x.yaml"]) == 1
    assert capsys.readouterr().err == "epg fit: non-finite loss at step 7 (σ' = 3.2; detected at step 8)\n"


def test_bad_configs_end_with_one_line_errors(tmp_path, demo_data):  # noqa: F811
    """`python -m epg.cli fit -c ...` with each bad value: exit status 2, one line naming the option, no traceback."""
    config = write_config(tmp_path / "fit.yaml", tmp_path / "run", demo_data)
    stage1 = tmp_path / "wide.ckpt"
    write_stage1(stage1, network={"enc_dim": 64})  # a 64-wide encoder where the config says 32
    cases = {
        "unknown preset": (
            ["--model.init_args.preset", "EPG-Q/16"],
            "epg fit: model.init_args.preset: unknown preset 'EPG-Q/16': choose one of",
        ),
        "image size": (
            ["--model.init_args.network", '{"image_size": 18}'],
            "epg fit: model.init_args.network.image_size: image_size 18 is not divisible by patch_size 4",
        ),
        "missing shards": (
            ["--data.train_shards", str(tmp_path / "missing" / "train-{000000..000003}.tar")],
            f"epg fit: data.train_shards: shard {tmp_path / 'missing' / 'train-000000.tar'} (from",
        ),
        "stage-1 shape": (
            ["--model.init_args.init_from", str(stage1), "--model.init_args.network.enc_dim", "32"],
            f"epg fit: model.init_args.init_from: the stage-1 encoder in {stage1} does not fit preset EPG-Nano/4",
        ),
    }
    runs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "epg.cli", "fit", "-c", str(config), *args],
            cwd=REPO,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (args, _) in cases.items()
    }
    for name, run in runs.items():
        _, err = run.communicate(timeout=120)
        last = err.strip().splitlines()[-1]
        assert run.returncode == 2 and "Traceback" not in err, (name, err[-2000:])
        assert last.startswith(cases[name][1]), (name, last)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_datamodule_setup_errors_name_the_option(tmp_path, demo_data, capsys):  # noqa: F811
    """Errors of EPGDataModule.setup (raised inside trainer.fit) also end as one line naming the data option."""
    config = write_config(tmp_path / "fit.yaml", tmp_path / "run", demo_data)
    classes = ["--data.num_classes", "5", "--model.init_args.network.num_classes", "5"]  # model and data agree
    assert cli.main(["fit", "-c", str(config), *classes]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "epg fit: data.num_classes: the shards hold 10 classes but num_classes is 5; set num_classes: 10"


# ---- EPGCLI defaults ---------------------------------------------------------------------------------------------
def test_epgcli_installs_fault_defaults(tmp_path, demo_data):  # noqa: F811
    config = write_config(tmp_path / "fit.yaml", tmp_path / "run", demo_data)
    parsed = run_lightning_cli(["-c", str(config)], run=False)
    assert sum(isinstance(cb, SigtermCheckpoint) for cb in parsed.trainer.callbacks) == 1
    assert isinstance(parsed.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    own = "[{class_path: lightning.fabric.plugins.TorchCheckpointIO}]"  # a config's own CheckpointIO is kept
    parsed = run_lightning_cli(["-c", str(config), "--trainer.plugins", own], run=False)
    assert type(parsed.trainer.strategy.checkpoint_io) is TorchCheckpointIO


def test_fit_resumes_from_last_and_loads_weights_only_by_default(capsys):
    with pytest.raises(SystemExit):
        run_lightning_cli(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    ckpt_help = text.split("--ckpt_path CKPT_PATH")[-1].split("--weights_only")[0]
    assert "default: last)" in ckpt_help
    assert "default: True)" in text.split("--weights_only {true,false,null}")[-1][:1000]


def test_last_checkpoint_is_overwritten_after_a_resume_with_other_checkpoint_settings(tmp_path):
    """A rerun with a changed checkpoint interval (epg demo rescales it) must still update last.ckpt, not last-v1."""

    def run(steps: int, every: int, resume: str | None) -> None:
        callback = ModelCheckpoint(
            dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_last=True, enable_version_counter=False
        )
        module = FinetuneModule(preset=NANO, warmup_steps=1, total_steps=10, sample_every_n_val=0)
        cpu_trainer(max_steps=steps, enable_checkpointing=True, callbacks=[callback]).fit(
            module, images(8), ckpt_path=resume
        )

    run(2, 1, None)
    run(4, 2, str(tmp_path / "ckpt" / "last.ckpt"))
    assert not list((tmp_path / "ckpt").glob("last-v*.ckpt"))
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_every_config_overwrites_last_checkpoint():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        text = path.read_text()
        if "ModelCheckpoint" in text:
            assert "enable_version_counter: false" in text, path

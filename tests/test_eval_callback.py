"""InLoopFID inside a LightningCLI-built Trainer fit of a tiny FinetuneModule on CPU (EPG-Nano/4, 16 px, 8 samples),
and its torchmetrics FID against `epg fid calc`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.image.fid import FrechetInceptionDistance

from epg.commands.fid import main as fid_main
from epg.eval.callback import InLoopFID
from epg.eval.inception import InceptionFeatures, pool_features
from epg.eval.inception_weights import ensure_inception_weights
from epg.eval.metrics import fid_to_reference
from epg.eval.reference import load_reference
from epg.eval.reference_fid import ReferenceFID
from epg.eval.sweep import sample_images
from epg.lightning.finetune import FinetuneModule
from epg.sampling import SampleSettings
from tests._trainers import cpu_trainer
from tests.test_eval_metrics import one_thread, photo_crops, write_folder
from tests.test_sample_cli import write_train_split

N = 8
# torchmetrics takes tr√(Σ·Σ_ref) from the eigenvalues of a 2048x2048 product, `epg fid calc` from an exact N×N form:
# at N = 8 the ~2040 null directions' round-off moves the FID by up to ~5e-4 (measured), far below its own noise.
FID_ABS = 2e-3
pytestmark = pytest.mark.usefixtures(one_thread.__name__)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 16, 16, generator=g) * 0.5
    return DataLoader(TensorDataset(x, torch.randint(0, 11, (8,), generator=g)), batch_size=4)


def config(root, reference: str, every: int = 2) -> dict:
    """A LightningCLI config: FinetuneModule (Nano, from scratch), TensorBoard, InLoopFID by class_path."""
    callback = {
        "class_path": "epg.eval.callback.InLoopFID",
        "init_args": {
            "every_n_steps": every,
            "num_samples": N,
            "reference": reference,
            "sampling": {"steps": 3},
            "batch_size": N,
        },
    }
    return {
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 2,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(root),
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(root)},
            },
            "callbacks": [callback],
        },
        "model": {"preset": "EPG-Nano/4", "warmup_steps": 1, "total_steps": 10, "ema_rates": [0.5]},
    }


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("real") / "real", photo_crops(N, size=16))


def test_callback_from_yaml_logs_fid_of_ema_samples(tmp_path, real, monkeypatch):
    monkeypatch.setattr("sys.argv", ["epg"])  # LightningCLI would read pytest's arguments
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path, str(real))))
    cli = LightningCLI(FinetuneModule, run=False, args=["--config", str(path)], save_config_kwargs={"overwrite": True})
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, InLoopFID)]
    assert (callback.every_n_steps, callback.num_samples, callback.sampling.steps, callback.ema_index) == (2, N, 3, 0)
    cli.trainer.fit(cli.model, loader())

    fid = float(cli.trainer.callback_metrics["val/fid"])
    assert math.isfinite(fid) and fid > 0
    # The reference was computed once from the folder and cached next to the run.
    (cache,) = tmp_path.glob("fid_reference_*.npz")
    reference = load_reference(cache)
    assert reference.count == N and reference.source == str(real)
    # The logged value is the FID of the EMA copy's samples (the last update came before the evaluation).
    module = cli.model
    images = sample_images(module.denoiser(module.ema_nets[0]), range(N), N, SampleSettings(steps=3), batch_size=N)
    expected = fid_to_reference(pool_features(images, InceptionFeatures(device="cpu")), reference)
    assert fid == pytest.approx(expected, abs=FID_ABS)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = tmp_path.rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events.parent)).Reload()
    (scalar,) = accumulator.Scalars("val/fid")
    assert scalar.step == 2 and scalar.value == pytest.approx(fid, rel=1e-5)
    assert "val/fid_samples" in accumulator.Tags()["images"]


def test_torchmetrics_fid_equals_epg_fid_calc(tmp_path, real):
    """ReferenceFID (torchmetrics, reference statistics as the real side) scores images as `epg fid calc` does."""
    samples = write_folder(tmp_path / "samples", photo_crops(N, size=16, seed=1))
    ref, out = tmp_path / "ref.npz", tmp_path / "calc.json"
    assert fid_main(["ref", str(real), "--out", str(ref), "--device", "cpu"]) == 0
    assert fid_main(["calc", str(samples), "--ref", str(ref), "--metrics", "fid", "--out", str(out)]) == 0
    expected = json.loads(out.read_text())["metrics"]["fid"]

    metric = ReferenceFID()
    assert isinstance(metric, FrechetInceptionDistance) and metric.inception.use_antialias is False
    reference = load_reference(ref)
    metric.set_reference(reference.mu, reference.sigma, reference.count)
    fake = torch.from_numpy(photo_crops(N, size=16, seed=1)).permute(0, 3, 1, 2)
    metric.update(fake[:5], real=False)
    metric.update(fake[5:], real=False)
    assert float(metric.compute()) == pytest.approx(expected, abs=FID_ABS)

    # The reference is held as the sums torchmetrics makes of the reference images themselves.
    weights = str(ensure_inception_weights())
    plain = FrechetInceptionDistance(feature_extractor_weights_path=weights, antialias=False)
    plain.update(torch.from_numpy(photo_crops(N, size=16)).permute(0, 3, 1, 2), real=True)
    states = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
    for name in states:
        assert torch.allclose(getattr(metric, name), getattr(plain, name), rtol=1e-9, atol=1e-9)
    held = [getattr(metric, name).clone() for name in states]
    metric.reset()  # clears the samples only
    assert all(torch.equal(getattr(metric, name), value) for name, value in zip(states, held, strict=True))
    assert metric.fake_features_num_samples == 0
    # torchmetrics' default antialiased resize is not the TF graph's: other features.
    antialiased = FrechetInceptionDistance(feature_extractor_weights_path=weights).inception
    assert (antialiased(fake[:2]) - metric.inception(fake[:2])).abs().max() > 0.1


class RecordedFID(InLoopFID):
    """InLoopFID that writes each rank's FID to ``cache_dir/fid_rank<r>.txt``."""

    def evaluate(self, trainer, pl_module) -> float:
        fid = super().evaluate(trainer, pl_module)
        (Path(self.cache_dir) / f"fid_rank{trainer.global_rank}.txt").write_text(repr(fid))
        return fid


@pytest.mark.slow
def test_two_ranks_give_the_single_rank_fid(tmp_path, real):
    """ddp_spawn on 2 CPU processes: each samples and scores its share (4 and 3 images), rank 0 alone holds the
    reference; torchmetrics' sync gives both ranks the FID of all 7 images."""

    module = FinetuneModule(preset="EPG-Nano/4", warmup_steps=1, total_steps=10, ema_rates=(0.5,))
    callback = RecordedFID(
        every_n_steps=1, num_samples=7, reference=str(real), sampling={"steps": 3}, cache_dir=str(tmp_path)
    )
    trainer = cpu_trainer(
        devices=2,
        strategy="ddp_spawn",
        max_steps=1,
        limit_val_batches=0,
        callbacks=[callback],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, loader())
    fid = float(trainer.callback_metrics["val/fid"])
    (cache,) = tmp_path.glob("fid_reference_*.npz")
    images = sample_images(module.denoiser(module.ema_nets[0]), range(7), 7, SampleSettings(steps=3), batch_size=7)
    expected = fid_to_reference(pool_features(images, InceptionFeatures(device="cpu")), load_reference(cache))
    assert fid == pytest.approx(expected, abs=FID_ABS)
    ranks = [float((tmp_path / f"fid_rank{r}.txt").read_text()) for r in range(2)]
    assert ranks == [fid, fid]


def test_callback_checks_its_arguments_and_the_module():
    with pytest.raises(ValueError, match="num_samples"):
        InLoopFID(every_n_steps=1, num_samples=1, reference="ref.npz")
    with pytest.raises(ValueError, match="unknown sampler"):
        InLoopFID(every_n_steps=1, num_samples=8, reference="ref.npz", sampling={"sampler": "ddim"})
    module = FinetuneModule(preset="EPG-Nano/4", ema_rates=(0.5,))
    with pytest.raises(ValueError, match="ema_index 3 but the module keeps 1 EMA copies"):
        InLoopFID(every_n_steps=1, num_samples=8, reference="ref.npz", ema_index=3)._network(module)
    online = InLoopFID(every_n_steps=1, num_samples=8, reference="ref.npz", ema_index=None)
    assert online._network(module) is module.net


def test_random_labels_take_the_class_counts_of_the_training_shards(tmp_path):
    train = write_train_split(tmp_path / "train", [2, 0, 5])
    trainer = SimpleNamespace(datamodule=SimpleNamespace(train_shards=str(train)))
    assert InLoopFID._training_class_counts(trainer) == [2, 0, 5]
    assert InLoopFID._training_class_counts(SimpleNamespace(datamodule=None)) is None  # uniform labels


def test_grid_spreads_over_the_share():
    from epg.sampling.image_grid import pick_grid

    callback = InLoopFID(every_n_steps=1, num_samples=8, reference="ref.npz", grid_size=4)
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 2, 2, 3)
    grid = pick_grid(images, callback.grid_size)
    assert grid.shape[0] == 3 and grid.max() <= 1
    values = sorted({round(v * 255) for v in np.unique(grid.numpy())} - {0})
    assert values == [3, 6, 9]  # picks 0, 3, 6, 9 (0 is also the padding colour)


def test_guidance_interval_defaults_to_the_paper_and_none_guides_every_level():
    from epg.sampling.grid import GUIDANCE_INTERVAL

    paper = InLoopFID(every_n_steps=1, num_samples=8, reference="ref.npz", sampling={"cfg": 2.0})
    assert paper.sampling.guidance.scale == 2.0 and paper.sampling.guidance.interval == GUIDANCE_INTERVAL
    every = InLoopFID(every_n_steps=1, num_samples=8, reference="ref.npz", sampling={"cfg": 3.0, "interval": None})
    assert every.sampling.guidance.interval is None
    assert (
        InLoopFID(every_n_steps=1, num_samples=8, reference="ref.npz", sampling={"cfg": 1.0}).sampling.guidance is None
    )

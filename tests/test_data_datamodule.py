"""EPGDataModule on the demo shards: batch formats, label drop, batch split, ranks, corrupt samples."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from epg.data import EPGDataModule
from epg.data.demo import prepare_demo
from epg.data.shards import write_shard
from epg.method.normalization import denormalize
from tests._trainers import cpu_trainer


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return prepare_demo(tmp_path_factory.mktemp("demo"))


def _dm(demo, **kw):
    args = dict(
        train_shards=demo["train_shards"],
        val_shards=demo["val_shards"],
        image_size=32,
        num_classes=10,
        global_batch_size=32,
        num_workers=0,
        samples_per_epoch=128,
    )
    return EPGDataModule(**{**args, **kw})


def test_pretrain_batches(demo):
    dm = _dm(demo, stage="pretrain")
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == len(dm.train_dataloader()) == 4
    x0, v1, v2, y = batches[0]
    for x in (x0, v1, v2):
        assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32
        u = denormalize(x)
        assert u.min() >= -1e-5 and u.max() <= 1 + 1e-5
    assert y.shape == (32,) and y.dtype == torch.int64 and 0 <= y.min() and y.max() < 10
    assert not torch.equal(v1, v2)


def test_finetune_batches_and_label_drop(demo):
    dm = _dm(demo, stage="finetune", label_drop=0.25, global_batch_size=256, samples_per_epoch=2048)
    labels = []
    for x, y in dm.train_dataloader():
        assert x.shape == (256, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        labels.append(y)
    labels = torch.cat(labels)
    assert labels.numel() == 2048 and labels.max() == 10 and labels.min() >= 0
    assert abs((labels == 10).float().mean().item() - 0.25) < 0.05


def test_val_batches_are_the_stored_images(demo, tmp_path):
    for mode in ("imagenet", "simple"):
        dm = _dm(demo, label_drop=0.5, val_batch_size=100, normalization=mode)
        batches = list(dm.val_dataloader())
        assert [len(y) for _, y in batches] == [100] * 5
        labels = torch.cat([y for _, y in batches])
        assert labels.bincount().tolist() == [50] * 10  # no label drop in validation
        assert torch.equal(labels, torch.cat([y for _, y in dm.val_dataloader()]))  # deterministic order
        u = denormalize(batches[0][0][0], mode)
        assert u.min() >= -1e-5 and u.max() <= 1 + 1e-5
        assert torch.allclose(u * 255, (u * 255).round(), atol=1e-3)  # exact 8-bit pixels, no flip or resize


def test_per_device_batch(demo, monkeypatch):
    assert EPGDataModule(global_batch_size=1024, world_size=8, rank=3).per_device_batch_size == 128
    with pytest.raises(ValueError, match="not divisible by the world size 3"):
        _ = EPGDataModule(global_batch_size=1024, world_size=3).per_device_batch_size
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    dm = EPGDataModule(global_batch_size=64)
    assert (dm.rank, dm.world_size, dm.per_device_batch_size) == (2, 4, 16)
    assert _dm(demo, samples_per_epoch=None).num_train_samples == 4500


def test_two_ranks_get_the_same_number_of_batches(demo):
    counts, firsts = [], []
    for rank, workers in ((0, 0), (1, 2)):
        dm = _dm(
            demo,
            stage="finetune",
            rank=rank,
            world_size=2,
            global_batch_size=64,
            samples_per_epoch=640,
            num_workers=workers,
        )
        dm.setup("fit")
        assert dm.per_device_batch_size == 32
        batches = list(dm.train_dataloader())
        counts.append(len(batches))
        assert all(len(y) == 32 for _, y in batches)
        firsts.append(batches[0][1])
    assert counts == [10, 10]
    assert not torch.equal(firsts[0], firsts[1])  # ranks draw different data

    val_labels = [torch.cat([y for _, y in _dm(demo, rank=r, world_size=2).val_dataloader()]) for r in (0, 1)]
    assert [len(v) for v in val_labels] == [250, 250]
    assert torch.cat(val_labels).bincount().tolist() == [50] * 10


def _png(seed):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_corrupt_sample_is_skipped_and_counted(tmp_path):
    samples = [(f"s{i}", "png", _png(i), i % 3) for i in range(5)]
    samples[2] = ("s2", "png", b"\x89PNG\r\n\x1a\n not an image", 2)
    write_shard(tmp_path / "val-000000.tar", samples)
    dm = EPGDataModule(val_shards=str(tmp_path), image_size=32, global_batch_size=10, num_workers=0, num_classes=3)
    with pytest.warns(UserWarning, match="skipped a corrupt sample"):
        ((x, y),) = list(dm.val_dataloader())
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 1, 0, 1]
    assert dm.num_skipped == 1


def test_errors_say_what_to_fix(demo, tmp_path):
    with pytest.raises(FileNotFoundError, match="epg prepare"):
        EPGDataModule(train_shards=str(tmp_path / "nope-{000000..000001}.tar")).setup("fit")
    with pytest.raises(ValueError, match="set num_classes: 10"):
        _dm(demo, num_classes=5).setup("fit")
    with pytest.raises(ValueError, match="train_shards is not set"):
        EPGDataModule().train_dataloader()
    with pytest.raises(ValueError, match="stage"):
        EPGDataModule(stage="pre")


def test_fit_with_a_trainer(demo):
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen = self.val_seen = 0

        def training_step(self, batch, _):
            x0, v1, v2, y = batch
            self.seen += len(y)
            return (self.weight * (x0 + v1 + v2).mean()) ** 2

        def validation_step(self, batch, _):
            self.val_seen += len(batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm, probe = _dm(demo, stage="pretrain"), Probe()
    trainer = cpu_trainer(max_epochs=1)
    trainer.fit(probe, dm)
    assert trainer.num_training_batches == dm.batches_per_epoch == 4
    assert (probe.seen, probe.val_seen) == (128, 500)

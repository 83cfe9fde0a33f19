"""EPGDataModule on the demo shards: batch formats, label drop, batch split, ranks, corrupt samples."""

import hashlib
import io
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from epg.data import EPGDataModule
from epg.data.datamodule import DamagedShardsError
from epg.data.demo import prepare_demo
from epg.data.shards import expand_shards, shard_name, write_metadata, write_shard
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


@pytest.fixture
def demo_copy(demo, tmp_path):
    """A copy of the demo shards that a test may damage."""
    root = Path(demo["root"])
    shutil.copytree(root, tmp_path / "demo")
    return {key: demo[key].replace(str(root), str(tmp_path / "demo")) for key in ("root", "train_shards", "val_shards")}


@pytest.mark.parametrize(("workers", "rank"), [(0, 0), (2, 1)])
def test_stream_resumes_exactly_mid_epoch(demo, workers, rank):
    """A loader started T batches into the run yields what an uninterrupted loader yields from batch T on."""
    options = dict(stage="pretrain" if workers else "finetune", label_drop=0.3, num_workers=workers, shuffle_buffer=50)
    options.update(global_batch_size=32, samples_per_epoch=224, rank=rank, world_size=2)  # 7 batches per epoch
    loader = _dm(demo, **options).train_dataloader()
    full = [batch for _ in range(2) for batch in loader]  # epochs 0 and 1
    assert len(full) == 14 and all(len(batch[-1]) == 16 for batch in full)
    for start in (3, 7, 12):
        resumed = _dm(demo, **options).train_dataloader()
        resumed.start = start
        tail = list(resumed)
        assert len(tail) == 7 - start % 7
        for got, ref in zip(tail, full[start:], strict=False):
            assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True)), start


def test_corrupt_training_sample_keeps_the_batch_size(tmp_path):
    samples = [(f"s{i}", "png", _png(i), i % 3) for i in range(6)]
    samples[2] = ("s2", "png", b"\x89PNG\r\n\x1a\n not an image", 2)
    write_shard(tmp_path / "train-000000.tar", samples)
    dm = EPGDataModule(
        train_shards=str(tmp_path), image_size=32, global_batch_size=6, num_workers=0, num_classes=3, shuffle_buffer=1
    )
    with pytest.warns(UserWarning, match="skipped a corrupt sample"):
        ((x, y),) = list(dm.train_dataloader())
    assert x.shape == (6, 3, 32, 32) and dm.num_skipped == 1
    assert y.tolist() == [0, 1, 0, 0, 1, 2]  # no shuffle: s0 s1 s2 s3 s4 s5, the corrupt s2 refilled with s0


def test_setup_stops_on_damaged_shards(demo_copy):
    from tests.test_data_prepare import truncate

    shard = Path(demo_copy["root"]) / "train" / "train-000001.tar"
    truncate(shard)
    with pytest.raises(DamagedShardsError) as error:
        _dm(demo_copy).setup("fit")
    message = str(error.value)
    assert "1 of the train_shards in" in message
    assert "train-000001.tar (truncated to 2,309,120 of 4,618,240 bytes)" in message
    assert f"repair them with `epg prepare demo {demo_copy['root']}`" in message and "\n" not in message
    with pytest.warns(UserWarning, match="train-000001.tar"):
        _dm(demo_copy, allow_damaged_shards=True).setup("fit")


def test_setup_check_is_one_stat_per_shard(tmp_path, monkeypatch):
    """1,000 recorded (empty) shard files: the check stats each once and opens none."""
    names = [shard_name("train", i) for i in range(1000)]
    for name in names:
        (tmp_path / name).touch()
    record = {"samples": 0, "bytes": 0, "sha256": hashlib.sha256().hexdigest()}
    write_metadata(tmp_path, "train", ["0"], {}, names, [0], 32, "png", dict.fromkeys(names, record))
    stats, real_stat = [], os.stat
    monkeypatch.setattr(os, "stat", lambda path, *a, **k: stats.append(str(path)) or real_stat(path, *a, **k))
    dm = EPGDataModule(train_shards=str(tmp_path), image_size=32, num_classes=1, samples_per_epoch=64)
    start = time.perf_counter()
    dm._check_shards(expand_shards(str(tmp_path)), "train_shards")
    seconds = time.perf_counter() - start
    assert sorted(p for p in stats if p.endswith(".tar")) == [str(tmp_path / n) for n in names]
    assert seconds < 2.0, seconds


def test_damage_is_named_while_reading(demo_copy):
    """A byte-flipped shard (same size, so setup passes) and, as a remote `pipe:` URL, a truncated one."""
    from tests.test_data_prepare import flip, truncate

    train = Path(demo_copy["root"]) / "train"
    flip(train / "train-000003.tar", 30_000)
    truncate(train / "train-000001.tar")
    options = dict(global_batch_size=16, samples_per_epoch=64, shuffle_buffer=16)
    dm = _dm(demo_copy, train_shards=str(train / "train-000003.tar"), **options)
    dm.setup("fit")
    with pytest.warns(UserWarning, match=r"damaged shard .*train-000003.tar: tar stream has a damaged member header"):
        assert len(list(dm.train_dataloader())) == 4
    assert dm._health.lost >= 895 and dm._health.lost % 895 == 0
    dm = _dm(demo_copy, train_shards=str(train / "train-000003.tar"), num_workers=2, **options)
    assert len(list(dm.train_dataloader())) == 4
    assert dm._health.lost >= 2 * 895 and dm._health.lost % 895 == 0  # counted in both worker processes

    remote = f"pipe:cat {train / 'train-000001.tar'}"
    options["samples_per_epoch"] = 480  # 30 batches
    dm = _dm(demo_copy, train_shards=remote, shard_records=str(train / "dataset.json"), **options)
    dm.setup("fit")  # no stat of remote shards
    loader = dm.train_dataloader()
    loader.start = 29  # the fast-forward reads 464 samples: past the 451 that the shard still holds
    with pytest.warns(UserWarning, match="damaged shard pipe:cat .*train-000001.tar: tar stream ends without"):
        list(loader)
    assert dm._health.lost >= 449


def test_unrecorded_shards_load_with_a_note(demo_copy):
    """Shards of an earlier version (dataset.json without records) load, with one note that suggests --verify."""
    for split in ("train", "val"):
        path = Path(demo_copy["root"]) / split / "dataset.json"
        info = json.loads(path.read_text())
        path.write_text(json.dumps({k: v for k, v in info.items() if k != "shard_records"}))
    with pytest.warns(UserWarning, match=r"no per-shard records.*`epg prepare --verify") as notes:
        _dm(demo_copy).setup("fit")
    assert len([n for n in notes if "per-shard" in str(n.message)]) == 2  # train and val folders
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _dm(demo_copy).setup("fit")  # noted once per folder and process
    x, y = next(iter(_dm(demo_copy).train_dataloader()))
    assert x.shape == (32, 3, 32, 32)

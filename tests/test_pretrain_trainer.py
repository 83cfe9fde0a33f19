"""PretrainModule under a real Lightning Trainer on CPU: exact resume, skipped fp16 steps, validation k-NN."""

import copy

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from PIL import Image

from epg.data.adm_crop import encode_image
from epg.data.datamodule import EPGDataModule
from epg.data.shards import shard_name, write_metadata, write_shard
from epg.lightning.base import PAPER_SCALER
from epg.lightning.faults import NonFiniteLossError
from epg.lightning.pretrain import PretrainModule
from epg.method.curriculum import pair_sigmas
from epg.method.noise import c_in, c_noise
from epg.method.objectives import RCMLoss
from tests._pretrain_utils import TinyStage1Data
from tests._trainers import cpu_trainer

# K = 8 with N0 = 2, N1 = 16: K' = 3, so N(k) = 3, 5, 5, 5, 9, 9, 9, 17 over the first 8 updates.
SMALL = dict(
    preset="EPG-Nano/4", total_steps=8, warmup_steps=2, loss=RCMLoss(curriculum_n0=2, curriculum_n1=16), lr=1e-3
)


class Recorder(L.Callback):
    """Per-step (global step, applied updates, N(k), loss)."""

    def __init__(self) -> None:
        self.rows: list[tuple] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        n = module.loss.num_scales(module.updates - 1, module.hparams.total_steps)  # the N(k) this step used
        self.rows.append((trainer.global_step, module.updates, n, round(float(outputs["loss"]), 5)))


def _trainer(max_steps: int, **kwargs) -> L.Trainer:
    return cpu_trainer(**({"max_steps": max_steps, "limit_val_batches": 0, "callbacks": [Recorder()]} | kwargs))


def _loader() -> torch.utils.data.DataLoader:
    # One batch per epoch: the comparison does not depend on how Lightning replays a data order on resume.
    return torch.utils.data.DataLoader(TinyStage1Data(n=4), batch_size=4, shuffle=False)


def test_resume_restores_step_target_and_curriculum(tmp_path):
    torch.manual_seed(0)
    straight = PretrainModule(**SMALL)
    trainer = _trainer(8)
    trainer.fit(straight, _loader())
    rows = trainer.callbacks[0].rows

    torch.manual_seed(0)
    first = PretrainModule(**SMALL)
    trainer = _trainer(4)
    trainer.fit(first, _loader())
    path = tmp_path / "half.ckpt"
    trainer.save_checkpoint(path)

    torch.manual_seed(1)  # a different initialisation: everything must come from the checkpoint
    resumed = PretrainModule(**SMALL)
    trainer = _trainer(8)
    trainer.fit(resumed, _loader(), ckpt_path=path)
    assert trainer.global_step == 8 and resumed.updates == straight.updates == 8
    assert resumed.batches_seen == straight.batches_seen == 8
    assert [r[2] for r in rows] == [3, 5, 5, 5, 9, 9, 9, 17]
    assert trainer.callbacks[0].rows == rows[4:]
    for name, value in straight.state_dict().items():  # online, target (and BN statistics)
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(straight.target.encoder.pos_embed, straight.online.encoder.pos_embed)


def test_one_step_updates_projector_bn_like_the_four_official_passes():
    """The projector BN statistics after one step equal four train-mode passes u1, u2, x_a, x_b (method.md §3.8)."""
    torch.manual_seed(0)
    module = PretrainModule(**SMALL)
    reference = copy.deepcopy(module.online).train()
    x0, v1, v2, _ = next(iter(_loader()))
    n = module.loss.num_scales(0, module.hparams.total_steps)
    sigma_a, sigma_b, sigma_0 = pair_sigmas(module.loss.draw_pair_index(n, module.hparams.seed, 0), n, module.shift)
    eps = module.loss.noise_like(x0, module.noise_generator(x0.device))  # the noise of the first batch
    passes = [(v1, sigma_0), (v2, sigma_0), (x0, sigma_a), (x0, sigma_b)]  # the official order of online passes
    with torch.no_grad():
        for x, sigma in passes:
            s = torch.full((x.shape[0],), sigma)
            reference(c_in(s).view(-1, 1, 1, 1) * (x + sigma * eps), c_noise(s))
    _trainer(1).fit(module, _loader())
    buffers = dict(module.online.projection_head.named_buffers())
    for name, expected in reference.projection_head.named_buffers():
        torch.testing.assert_close(buffers[name], expected, msg=name)
    assert int(buffers["1.num_batches_tracked"]) == 4


class SkipAt(PretrainModule):
    """Makes every gradient of one chosen step non-finite, so the grad scaler skips it."""

    skip_step = 2

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if self.trainer.global_step == self.skip_step else loss


class Snapshots(L.Callback):
    def __init__(self) -> None:
        self.rows: list[tuple] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.rows.append((module.updates, lr, module.target.encoder.pos_embed.detach().clone()))


def test_skipped_fp16_step_advances_nothing():
    torch.manual_seed(0)
    module = SkipAt(**SMALL)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    snapshots = Snapshots()
    trainer = _trainer(4, plugins=[plugin], callbacks=[snapshots])
    trainer.fit(module, _loader())
    scaler = trainer.precision_plugin.scaler
    assert scaler.get_growth_factor() == PAPER_SCALER["growth_factor"]  # the paper's scaler replaced Lightning's
    assert trainer.global_step == 4 and module.updates == 3 and module.skipped_updates == 1
    (u0, lr0, t0), (u1, lr1, t1), (u2, lr2, t2), (u3, lr3, t3) = snapshots.rows
    assert (u0, u1, u2, u3) == (1, 2, 2, 3)
    assert lr2 == lr1 and torch.equal(t2, t1)  # no LR step, no EMA update on the skipped step
    assert not torch.equal(t3, t2) and lr3 != lr2
    assert module.loss.num_scales(module.updates, module.hparams.total_steps) == 5  # N(3), not N(4) = 9


class NanFrom(PretrainModule):
    """A loss that turns NaN from step ``bad_from`` on and stays NaN (the grad scaler would skip it forever)."""

    bad_from = 1

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step >= self.bad_from else loss


def test_a_loss_that_stays_nan_under_fp16_stops_after_the_skip_limit():
    torch.manual_seed(0)
    module = NanFrom(**SMALL, max_consecutive_skips=3)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(NonFiniteLossError, match=r"skipped 4 steps in a row \(steps 1-4, loss scale now [0-9.e+]+; "):
        _trainer(8, plugins=[plugin]).fit(module, _loader())
    assert module.updates == 1 and module.skipped_updates == 4


def _write_split(folder, split: str, shards: list[list[tuple[np.ndarray, int]]]) -> str:
    folder.mkdir(parents=True)
    names = [shard_name(split, i) for i in range(len(shards))]
    records = {}
    for i, (name, images) in enumerate(zip(names, shards, strict=True)):
        records[name] = write_shard(
            folder / name,
            [(f"s{i}_{j}", "png", encode_image(Image.fromarray(a), "png"), y) for j, (a, y) in enumerate(images)],
        )
    counts = np.bincount([y for images in shards for _, y in images], minlength=2).tolist()
    write_metadata(folder, split, ["0", "1"], {}, names, counts, 16, "png", records)
    return str(folder)


def test_validate_logs_knn_accuracy_of_val_queries_against_training_images(tmp_path):
    """val/knn_acc: every val image is a query, the bank holds training images (here copies of the val images)."""
    rng = np.random.default_rng(0)
    image = lambda: rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)  # noqa: E731
    a, b = image(), image()
    # Three shards of four; each holds a copy of both val images among noise images of the same classes.
    train = _write_split(tmp_path / "train", "train", [[(a, 0), (b, 1), (image(), 0), (image(), 1)] for _ in range(3)])
    val = _write_split(tmp_path / "val", "val", [[(a, 0), (b, 1)]])
    data = EPGDataModule(
        train_shards=train, val_shards=val, stage="pretrain", image_size=16, global_batch_size=4, num_workers=0,
        num_classes=2, hflip=False,
    )  # fmt: skip
    module = PretrainModule(preset="EPG-Nano/4", knn_k=1)
    (metrics,) = _trainer(1, limit_val_batches=None).validate(module, datamodule=data, verbose=False)
    # Each query finds its own copy in the bank; halves of the val split (the former bank) would score 0.
    assert metrics["val/knn_acc"] == 1.0
    with pytest.warns(UserWarning, match="no val/knn_acc"):  # a bare val loader: no training images, no metric
        (metrics,) = _trainer(1, limit_val_batches=None).validate(module, data.val_dataloader(), verbose=False)
    assert "val/knn_acc" not in metrics

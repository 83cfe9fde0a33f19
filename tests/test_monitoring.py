"""What a run shows in TensorBoard: one source per metric, hp_metric, the in-loop FID curve, stage 1's views.

Tiny `epg fit` runs (EPG-Nano/4 at 16 px) on 24 digits of 32 px written as shards; the in-loop FID scores 4 samples
against the 24 val digits, ADM-cropped to the 16 px the model trains at.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from epg.cli import main as epg
from epg.data.adm_crop import adm_center_crop, encode_image
from epg.data.demo import load_digits
from epg.data.shards import shard_name, write_metadata, write_shard
from tests._config_utils import load
from tests.test_eval_metrics import one_thread

ROOT = Path(__file__).resolve().parents[1]
DIGITS = 24
pytestmark = pytest.mark.usefixtures(one_thread.__name__)


def write_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> Path:
    """One shard of 32 px digits plus its dataset.json, as `epg prepare` writes them."""
    folder.mkdir(parents=True)
    name = shard_name(split, 0)
    samples = [
        (f"{i:04d}", "png", encode_image(adm_center_crop(Image.fromarray(im).convert("RGB"), 32), "png"), int(y))
        for i, (im, y) in enumerate(zip(images, labels, strict=True))
    ]
    record = write_shard(folder / name, samples)
    counts = np.bincount(labels, minlength=10).tolist()
    write_metadata(folder, split, [str(c) for c in range(10)], {}, [name], counts, 32, "png", {name: record})
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    images, labels = load_digits()
    picks = np.linspace(0, len(labels) - 1, 2 * DIGITS).astype(int)  # every class
    root = tmp_path_factory.mktemp("digits")
    write_split(root / "train", "train", images[picks[::2]], labels[picks[::2]])
    write_split(root / "val", "val", images[picks[1::2]], labels[picks[1::2]])
    return root


def fit(tmp_path: Path, data: Path, model: dict, callbacks: list[dict], stage: str) -> Path:
    run = tmp_path / "run"
    config = {
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 2,
            "log_every_n_steps": 1,
            "val_check_interval": 2,
            "limit_val_batches": 1,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_checkpointing": False,
            "default_root_dir": str(run),
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(run), "name": "tb"},
            },
            "callbacks": callbacks,
        },
        "model": model,
        "data": {
            "train_shards": str(data / "train"),
            "val_shards": str(data / "val"),
            "stage": stage,
            "image_size": 16,
            "global_batch_size": 8,
            "val_batch_size": DIGITS,
            "num_workers": 0,
            "num_classes": 10,
            "hflip": False,
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert epg(["fit", "-c", str(path), "--ckpt_path", "null"]) == 0
    return run


def tensorboard(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = run.rglob("events.out.tfevents.*")
    return EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0}).Reload()


MONITORS = [
    {"class_path": "epg.lightning.callbacks.Throughput", "init_args": {"window_size": 2}},
    {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"},
]


def test_stage2_logs_each_metric_once_and_fid_as_hp_metric(tmp_path, data):
    model = {
        "class_path": "epg.lightning.finetune.FinetuneModule",
        "init_args": {"preset": "EPG-Nano/4", "warmup_steps": 1, "total_steps": 10, "ema_rates": [0.5]},
    }
    fid = {  # no reference: the val split, at the training resolution
        "class_path": "epg.eval.callback.InLoopFID",
        "init_args": {"every_n_steps": 2, "num_samples": 4, "sampling": {"steps": 2}, "batch_size": 4},
    }
    run = fit(tmp_path, data, model, [*MONITORS, fid], "finetune")
    events = tensorboard(run)
    scalars = events.Tags()["scalars"]
    assert {"train/lr/pg1", "train/lr/pg2"} <= set(scalars) and "train/lr" not in scalars  # LearningRateMonitor's
    assert "train/device/samples_per_sec" in scalars and "train/images_per_sec" not in scalars  # Throughput's
    (value,) = events.Scalars("val/fid")
    assert [(s.step, s.value) for s in events.Scalars("hp_metric")][-1] == (2, pytest.approx(value.value))
    (cache,) = run.glob("fid_reference_*.npz")
    from epg.eval.reference import load_reference

    reference = load_reference(cache)
    assert reference.count == DIGITS and reference.resolution == (16, 16)  # the 32 px digits, cropped to 16


def test_stage1_logs_the_two_views_once_and_knn_as_hp_metric(tmp_path, data):
    model = {
        "class_path": "epg.lightning.pretrain.PretrainModule",
        "init_args": {"preset": "EPG-Nano/4", "warmup_steps": 1, "total_steps": 4, "knn_bank_size": None},
    }
    run = fit(tmp_path, data, model, MONITORS, "pretrain")
    events = tensorboard(run)
    (views,) = events.Images("train/views")
    assert views.step == 0 and (views.height, views.width) == (3 * 17 + 1, 8 * 17 + 1)  # x0, view 1, view 2 rows
    (knn,) = events.Scalars("val/knn_acc")
    assert events.Scalars("hp_metric")[-1].value == pytest.approx(knn.value)
    assert "train/lr" in events.Tags()["scalars"]  # from LearningRateMonitor (one parameter group)


def test_configs_enable_the_in_loop_fid_and_both_monitors():
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        cfg = load(path)
        callbacks = {c["class_path"].rsplit(".", 1)[-1]: c.get("init_args") or {} for c in cfg["trainer"]["callbacks"]}
        assert {"Throughput", "LearningRateMonitor"} <= set(callbacks), path
        assert list(callbacks)[-1] == "ModelCheckpoint", path  # epg demo overrides the last callback's options
        if cfg["model"]["class_path"].endswith("PretrainModule"):
            continue
        fid = callbacks["InLoopFID"]
        if "demo" in path.parts:  # a few seconds per evaluation on a CPU, against the val split
            assert fid["num_samples"] <= 64 and "reference" not in fid, path
        else:  # the paper's ablation setting: FID-10K against ADM's reference batch
            assert fid["num_samples"] == 10_000 and fid["reference"].startswith("refs/in"), path

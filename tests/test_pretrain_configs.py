"""Stage-1 configs: paper recipe, valid options, relative paths, and an `epg fit` run of the demo config."""

from __future__ import annotations

import inspect
from pathlib import Path

import lightning as L
import pytest

from epg.checkpoint import load_stage1_representation
from epg.data.datamodule import EPGDataModule
from epg.lightning.pretrain import PretrainModule
from epg.nn.presets import get_config
from tests._config_utils import load, strings

ROOT = Path(__file__).resolve().parents[1]
PAPER = {  # config -> (preset, resolution)
    "rcm_b16_in256.yaml": ("RCM-B/16", 256),
    "rcm_l16_in256.yaml": ("RCM-L/16", 256),
    "rcm_b32_in512.yaml": ("RCM-B/32", 512),
    "rcm_l32_in512.yaml": ("EPG-L/32", 512),
}


@pytest.mark.parametrize("name", [*(f"pretrain/{n}" for n in PAPER), "demo/pretrain.yaml"])
def test_config_options_exist_and_paths_are_relative(name):
    cfg = load(ROOT / "configs" / name)
    model = cfg["model"]
    assert model["class_path"] == "epg.lightning.pretrain.PretrainModule"
    assert set(model["init_args"]) <= set(inspect.signature(PretrainModule).parameters)
    assert set(cfg["data"]) <= set(inspect.signature(EPGDataModule).parameters)
    assert set(cfg["trainer"]) <= set(inspect.signature(L.Trainer).parameters)
    assert not [s for s in strings(cfg) if s.startswith("/")]
    args = model["init_args"]
    assert cfg["data"]["stage"] == "pretrain"
    # Given once: image size and classes by the model, the run's length by total_steps (trainer.max_steps follows),
    # paths by the run folder (export_path relative to it), the normalization by the data.
    assert not {"image_size", "num_classes"} & set(cfg["data"]) and "normalization" not in args
    assert not {"max_steps", "logger"} & set(cfg["trainer"]) and "dirpath" not in str(cfg["trainer"]["callbacks"])
    assert args.get("export_path") in (None, "stage1.ckpt")


@pytest.mark.parametrize("name", PAPER)
def test_paper_rows_keep_the_paper_recipe(name):
    cfg = load(ROOT / "configs" / "pretrain" / name)
    args, data, trainer = cfg["model"]["init_args"], cfg["data"], cfg["trainer"]
    assert (args["preset"], get_config(args["preset"]).image_size) == PAPER[name]
    assert (args["lr"], args["weight_decay"], args["betas"]) == (6e-4, 0.03, [0.9, 0.95])
    assert (args["warmup_steps"], args["total_steps"], args["target_momentum"]) == (10_000, 600_000, 0.99)
    loss = args["loss"]["init_args"]
    assert args["loss"]["class_path"] == "epg.method.objectives.RCMLoss"
    assert (loss["tau_contrastive"], loss["tau_consistency"], loss["tau_schedule"]) == (0.2, 0.1, "constant")
    assert (loss["curriculum_n0"], loss["curriculum_n1"], args["target_bn_train_mode"]) == (20, 1280, False)
    assert (data["global_batch_size"], data["normalization"]) == (1024, "imagenet")
    assert (trainer["devices"], trainer["strategy"], trainer["sync_batchnorm"]) == (8, "ddp", True)
    assert trainer["precision"] == "bf16-mixed"
    assert args["network"] is None  # projector out 256 (method.md §10.1)


@pytest.mark.slow
def test_demo_config_runs_through_epg_fit_and_validate(tmp_path, monkeypatch):
    """`epg fit -c configs/demo/pretrain.yaml` for 2 steps on the demo shards; both hand-over files load."""
    from epg.cli import main
    from epg.data.demo import prepare_demo

    monkeypatch.chdir(tmp_path)  # the config's relative paths (runs/demo/...) resolve here
    prepare_demo("runs/demo/data")
    config = str(ROOT / "configs" / "demo" / "pretrain.yaml")
    overrides = ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1"]
    overrides += ["--data.global_batch_size=8", "--data.val_batch_size=40", "--data.num_workers=0"]
    overrides += ["--model.init_args.export_path=stage1.ckpt"]  # in the run folder
    overrides += ["--model.init_args.knn_bank_size=900"]  # one of the five train shards: a cheap k-NN bank
    assert main(["fit", "-c", config, *overrides]) == 0
    last = load_stage1_representation("runs/demo/pretrain/checkpoints/last.ckpt")
    slim = load_stage1_representation("runs/demo/pretrain/stage1.ckpt")
    assert last.config.image_size == 16 and last.state_dict().keys() == slim.state_dict().keys()
    assert list(Path("runs/demo/pretrain/lightning_logs").rglob("events.out.tfevents.*"))
    validate = ["validate", "-c", config]  # the run's last checkpoint
    validate += ["--trainer.limit_val_batches=1", "--data.val_batch_size=40", "--data.num_workers=0"]
    assert main(validate) == 0

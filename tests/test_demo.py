"""Smoke tests of `epg demo` (epg/commands/demo.py, epg/demo/) with tiny step counts: outputs, summary and the GPU
configs on a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from epg.commands.demo import main
from epg.demo.settings import default_config_dir
from epg.demo.stages import checkpoint_every, run_length, schedule_args

CONFIGS = default_config_dir()


def test_bad_sigma_rel_is_one_line(capsys) -> None:
    assert main(["--sigma-rel", "0.5", "--out", "unused"]) == 1
    assert "epg demo: --sigma-rel: σ_rel must lie in (0, 0.3003)" in capsys.readouterr().err


def test_checkpoint_every_divides_the_run() -> None:
    assert checkpoint_every(2000, 500) == 500
    assert checkpoint_every(1300, 500) == 325
    assert checkpoint_every(2, 500) == 2


def test_schedule_args_rescale_the_cm_schedule() -> None:
    import yaml

    cfg = yaml.safe_load((CONFIGS / "finetune_cm.yaml").read_text())
    args = schedule_args(cfg, 2 * run_length(cfg))
    pairs = dict(zip(args[::2], args[1::2], strict=True))
    loss = cfg["model"]["init_args"]["loss"]["init_args"]
    assert pairs["--model.init_args.loss.init_args.ect_d0"] == str(2 * loss["ect_d0"])
    assert pairs["--model.init_args.loss.init_args.ect_d1"] == str(2 * loss["ect_d1"])
    assert json.loads(pairs["--model.init_args.lr_milestones"]) == [
        2 * m for m in cfg["model"]["init_args"]["lr_milestones"]
    ]


# What the GPU variant may change relative to the CPU demo: run length and what scales with it, paths, the device.
GPU_CHANGES = {
    "accelerator", "max_steps", "total_steps", "warmup_steps", "val_check_interval", "every_n_train_steps",
    "lr_milestones", "ect_d0", "ect_d1", "ema_rates", "num_workers", "every_n_steps", "snapshot_every",
}  # fmt: skip
GPU_CHANGED_KEYS = {"model.init_args.sampling.steps"}  # the grid's sampler steps (InLoopFID's stay)


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else key)
    elif isinstance(node, list) and node and isinstance(node[0], dict):
        for k, value in enumerate(node):
            yield from _leaves(value, f"{prefix}[{k}]")
    else:
        yield prefix, node


@pytest.mark.parametrize("name", ["pretrain.yaml", "finetune_dm.yaml", "finetune_cm.yaml"])
def test_gpu_variant_is_the_cpu_recipe_trained_longer(name: str) -> None:
    """The GPU configs keep the CPU demo's model, resolution, batch, precision and knobs (measured on CPUs)."""
    import yaml

    cpu = dict(_leaves(yaml.safe_load((CONFIGS / name).read_text())))
    gpu = dict(_leaves(yaml.safe_load((CONFIGS / "gpu" / name).read_text())))
    assert set(cpu) == set(gpu)
    differ = {key for key in cpu if cpu[key] != gpu[key]}
    paths = {"default_root_dir", "init_from", "train_shards", "val_shards"}
    assert {key.rsplit(".", 1)[-1] for key in differ - GPU_CHANGED_KEYS} <= GPU_CHANGES | paths
    assert gpu["model.init_args.total_steps"] > cpu["model.init_args.total_steps"]
    assert gpu["trainer.accelerator"] == "gpu"
    assert all(str(gpu[k]).startswith("runs/demo_gpu/") for k in differ if str(cpu[k]).startswith("runs/demo/"))


def _check_outputs(out: Path, objective: str, stage2: str) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objective"] == objective
    assert (out / f"samples_{objective}.png").is_file()
    assert (out / "pretrain" / "checkpoints" / "last.ckpt").is_file()
    assert (out / stage2 / "checkpoints" / "last.ckpt").is_file()
    assert 0.0 <= summary["class_accuracy"] <= 1.0
    assert summary["fid"] == summary["fid"] and summary["fid"] >= 0.0  # a number, not NaN
    assert set(summary["timings_s"]) >= {"prepare shards", "Inception weights", "stage 1: k-NN check", "evaluation"}
    knn = summary["stage1_knn"]  # val digits against the train digits, stage-1 vs random-init encoder
    assert 0.0 <= knn["random_init"] <= 1.0 and 0.0 <= knn["stage1"] <= 1.0 and knn["k"] == 20
    assert knn["gain"] == pytest.approx(knn["stage1"] - knn["random_init"])
    return summary


@pytest.mark.slow
def test_demo_cpu_tiny(tmp_path: Path) -> None:
    """The CPU demo end to end with 2 steps per stage, 8 FID samples and 8 reference digits (~40 s)."""
    out = tmp_path / "demo"
    tiny = ["--pretrain-steps", "2", "--finetune-steps", "2", "--fid-samples", "10", "--fid-ref", "8", "--threads", "2"]
    assert main(["--out", str(out), *tiny, "--sigma-rel", "0.05,0.1"]) == 0
    summary = _check_outputs(out, "diffusion", "finetune_dm")
    assert summary["fid_samples"] == 10 and summary["fid_reference"] == 8
    # Post-hoc EMA (method.md §13): the 2-step stage 2 snapshots every step; each σ_rel is reconstructed and scored.
    phema = summary["phema"]
    assert [row["sigma_rel"] for row in phema["rows"]] == [0.05, 0.1]
    assert all(row["fid"] >= 0.0 and 0.0 <= row["class_accuracy"] <= 1.0 for row in phema["rows"])
    assert Path(phema["plot"]).is_file() and sorted(p.name for p in (out / "finetune_dm" / "phema").glob("*.pt")) == [
        "phema-000000001.pt",
        "phema-000000002.pt",
    ]
    # A second run skips both completed stages (and, with --sigma-rel none, the post-hoc EMA scores).
    assert main(["--out", str(out), *tiny, "--sigma-rel", "none"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert "phema" not in again
    assert again["timings_s"]["stage 1: pre-training"] < summary["timings_s"]["stage 1: pre-training"]
    assert again["stage1_knn"] == summary["stage1_knn"]  # kept in pretrain/knn.json for the same checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("objective,stage2", [("diffusion", "finetune_dm"), ("consistency", "finetune_cm")])
def test_demo_gpu_configs_run_one_step_on_cpu(tmp_path: Path, objective: str, stage2: str) -> None:
    """configs/demo/gpu/*.yaml parse and train 1 step on a CPU (accelerator and batch overridden)."""
    out = tmp_path / "gpu"
    args = ["--device", "gpu", "--accelerator", "cpu", "--objective", objective, "--out", str(out), "--threads", "2"]
    args += ["--pretrain-steps", "1", "--finetune-steps", "1", "--batch-size", "8", "--num-workers", "0"]
    args += ["--fid-samples", "4", "--fid-ref", "4", "--sigma-rel", "none"]
    assert main(args) == 0
    _check_outputs(out, objective, stage2)

"""Every shipped config through its whole schedule: `epg fit -c CONFIG -c SHRINK.yaml` on CPU, then a resume.

SHRINK.yaml changes size and time only (network widths/depths, image size, batch, step counts and the schedule
boundaries scaled with them, device), never the recipe: optimizer, LR, loss, noise, EMA rates, precision where the
CPU can run it, strategy and callbacks stay the config's. Each run crosses every boundary of its schedule:

- stage 2 DM: LR warm-up end (clipping turns on, METHOD.md §4), cosine end; resumed inside warm-up.
- stage 2 CM: warm-up end, ECT stage changes (§5.3), both LR milestones (§5.5), target = online after every update
  (§5.2); resumed before the first stage change.
- stage 1: warm-up end, every curriculum doubling up to its last N (§3.2), cosine end; resumed mid-curriculum.

and every run validates and (stage 2) logs a sample grid. The precision kept: "16-mixed" runs as fp16 + GradScaler
on CPU (the paper's scaler swapped in); "bf16-mixed" and "32-true" as they are. GPU-only branches taken on CPU here:
fused AdamW (the default on every device), the fp16 scaler with a fused optimizer, DDP (gloo, 1 process),
FSDP2 (ModelParallelStrategy, 1 process). Not on CPU: SyncBatchNorm (DDP refuses it for CPU modules; the stage-1
configs run with sync_batchnorm off here and on in benchmarks/gpu_check.sh's lifecycle runs).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from tests._config_utils import load

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.yaml"))
# Width and depth of every network in these runs (the image size is set per run: 16 px, patch 4).
TINY = {"enc_dim": 32, "enc_depth": 2, "enc_heads": 2, "dec_dim": 32, "dec_depth": 2, "dec_heads": 2}
TINY_PROJECTOR = {"proj_hidden": 64, "proj_out": 16}
# What SHRINK.yaml may set: everything else stays the config's.
SIZE_AND_TIME = {
    "trainer": {
        "accelerator",
        "devices",
        "precision",
        "plugins",
        "max_steps",
        "val_check_interval",
        "limit_val_batches",
        "log_every_n_steps",
        "callbacks",
        "sync_batchnorm",
    },  # fmt: skip
    "model": {"network", "warmup_steps", "total_steps", "lr_milestones", "ect_d0", "ect_d1", "grid_size"},
    "data": {"image_size", "global_batch_size", "val_batch_size", "num_workers"},
}


def _kind(cfg: dict) -> str:
    if cfg["model"]["class_path"].endswith("PretrainModule"):
        return "pretrain"
    return "cm" if cfg["model"]["init_args"]["objective"] == "consistency" else "dm"


# Per kind: (first run's last step, final step) and the compressed schedule.
PLANS = {
    "pretrain": {"stop": 6, "end": 12, "model": {"warmup_steps": 2, "total_steps": 12}},
    "dm": {"stop": 3, "end": 20, "model": {"warmup_steps": 4, "total_steps": 10}},  # fp16: the scaler skips some
    "cm": {"stop": 3, "end": 16, "model": {"warmup_steps": 2, "lr_milestones": [6, 8], "ect_d0": 2, "ect_d1": 2}},
}


def shrink(cfg: dict, max_steps: int, probe: str) -> dict:
    """The size-and-time overrides of ``cfg`` for a run that stops at ``max_steps``."""
    kind, args, trainer = _kind(cfg), cfg["model"]["init_args"], cfg["trainer"]
    plan = PLANS[kind]
    network = {**(args.get("network") or {}), **TINY, "image_size": 16, "patch_size": 4}
    if kind == "pretrain":
        network |= TINY_PROJECTOR
    callbacks = []
    for callback in trainer.get("callbacks", []):
        callback = json.loads(json.dumps(callback))
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = plan["stop"]
        callbacks.append(callback)
    callbacks.append({"class_path": "tests._lifecycle.Probe", "init_args": {"path": probe}})
    out = {
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": max_steps,
            "val_check_interval": plan["stop"],
            "limit_val_batches": 2,
            "log_every_n_steps": 1,
            "callbacks": callbacks,
        },
        "model": {"init_args": {"network": network, **plan["model"]}},
        "data": {"image_size": 16, "global_batch_size": 8, "val_batch_size": 8, "num_workers": 0},
    }
    if trainer["precision"] == "16-mixed":  # the paper's fp16 + GradScaler, through a CPU plugin
        out["trainer"] |= {"precision": None, "plugins": [{"class_path": "tests._lifecycle.CPUFloat16"}]}
    if trainer.get("sync_batchnorm"):  # torch's DDP refuses SyncBatchNorm on CPU: gpu_check runs it on CUDA
        out["trainer"]["sync_batchnorm"] = False
    if "grid_size" in args:
        out["model"]["init_args"]["grid_size"] = 4
    return out


def _stage1(cfg: dict) -> None:
    """The stage-1 file the config's init_from names: a tiny random encoder of the fine-tuning network's shape."""
    from tests.test_finetune_module import write_stage1

    args = cfg["model"]["init_args"]
    path = Path(args["init_from"])
    path.parent.mkdir(parents=True, exist_ok=True)
    network = {**(args.get("network") or {}), **TINY, **TINY_PROJECTOR, "image_size": 16, "patch_size": 4}
    write_stage1(path, preset=args["preset"], network=network)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from epg.data.demo import prepare_demo

    root = tmp_path_factory.mktemp("digits")
    prepare_demo(root)
    return root


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_config_lifecycle(name, tmp_path, monkeypatch, digits):
    from epg.cli import main

    monkeypatch.chdir(tmp_path)  # the config's relative paths (runs/..., data/..., weights/...) resolve here
    config = ROOT / "configs" / name
    cfg = load(config)
    kind, plan = _kind(cfg), PLANS[_kind(cfg)]
    for split in ("train", "val"):  # the digits stand in for the config's shards
        target = Path(cfg["data"][f"{split}_shards"])
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(digits / split, target_is_directory=True)
    if cfg["model"]["init_args"].get("init_from"):
        _stage1(cfg)
    probe = tmp_path / "probe.jsonl"
    for i, steps in enumerate((plan["stop"], plan["end"])):
        overrides = shrink(cfg, steps, str(probe))
        for section, keys in SIZE_AND_TIME.items():
            given = overrides[section]["init_args"] if section == "model" else overrides[section]
            assert set(given) <= keys, f"SHRINK.yaml may change only size and time, not {set(given) - keys}"
        shrink_file = tmp_path / f"shrink{i}.yaml"
        shrink_file.write_text(yaml.safe_dump(overrides))
        assert main(["fit", "-c", str(config), "-c", str(shrink_file)]) == 0  # the second run resumes (ckpt last)

    rows = _records(probe)
    assert [r["step"] for r in rows] == list(range(1, plan["end"] + 1)), "the rerun must continue where it stopped"
    args = cfg["model"]["init_args"]
    lr, model = args["lr"], plan["model"]
    assert all(r["fused"] for r in rows)
    applied = [r for r in rows if r["applied"]]
    assert all(math.isfinite(r["loss"]) for r in applied)
    assert all(r["clipped"] == 0 for r in rows if not r["applied"] and kind != "dm")
    # EMA / target rule on every step (§3.5, §4, §5.2): copy ← m·copy + (1 − m)·online, nothing on a skipped step.
    for r in rows:
        for key in [k for k in r if k.endswith("_residual")]:
            assert r[key] < 1e-6, (key, r)
    warm = model["warmup_steps"]
    by_updates = {r["updates_before"]: r for r in applied}
    assert by_updates[0]["lr"] == 0.0  # linear warm-up from 0
    assert by_updates[warm]["lr"] == pytest.approx(lr)  # warm-up end: the peak LR
    assert by_updates[warm // 2]["lr"] == pytest.approx(lr * (warm // 2) / warm)
    if kind == "pretrain":
        # Curriculum N(k) = min(20·2^⌈k/K′⌉, 1280) + 1 with K′ = ⌈12 / log2(65)⌉ = 2: doubles every 2 updates.
        expected = {0: 21, 1: 41, 2: 41, 3: 81, 5: 161, 7: 321, 9: 641, 10: 641, 11: 1281}
        assert {k: by_updates[k]["num_scales"] for k in expected} == expected
        assert by_updates[11]["lr"] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 9 / 10)))
        assert all(r["clipped"] == 0 for r in rows)  # stage 1 does not clip (§3.7)
    elif kind == "dm":
        total = model["total_steps"]
        for r in applied:  # clipping from the first update after warm-up (§4), the clip holds
            assert r["clipped"] == (1 if r["updates_before"] >= warm else 0), r
            if r["clipped"] and r["grad_norm"] > args.get("grad_clip", 0.5):
                assert r["grad_norm_after"] == pytest.approx(args.get("grad_clip", 0.5), rel=1e-4)
            elif not r["clipped"]:
                assert r["grad_norm_after"] == pytest.approx(r["grad_norm"], rel=1e-4)
        assert by_updates[total - 1]["lr"] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 5 / 6)))
        assert all(r["lr"] == 0.0 for r in applied if r["updates_before"] >= total)  # cosine end
        assert max(by_updates) >= total, "the run must reach the end of the cosine"
    else:
        # ECT stage a = δ + ⌊k/d⌋ for k ≥ d (d0 = d1 = 2) (§5.3); LR ×0.3 from update 6, ×0.08 from update 8 (§5.5).
        delta = args["ect_delta"]
        assert {k: by_updates[k]["ect_stage"] for k in (0, 1, 2, 3, 4, 6)} == {
            0: delta, 1: delta, 2: delta + 1, 3: delta + 1, 4: delta + 2, 6: delta + 3}  # fmt: skip
        factors = args.get("lr_factors", [0.3, 0.08])
        assert by_updates[5]["lr"] == pytest.approx(lr)
        assert by_updates[6]["lr"] == pytest.approx(lr * factors[0])
        assert by_updates[8]["lr"] == pytest.approx(lr * factors[1])
        assert all(r["target_distance"] == 0.0 for r in applied)  # the stop-gradient target is the online copy
        assert all(r["clipped"] == 0 for r in rows)
    # Validation ran, checkpoints were written, and stage 2 logged its sample grid to TensorBoard.
    run = Path(cfg["trainer"]["default_root_dir"])
    assert (run / "checkpoints" / "last.ckpt").exists()
    events = sorted(run.rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {"images": [], "scalars": []}
    for event in events:
        acc = EventAccumulator(str(event), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        for key in tags:
            tags[key] += acc.Tags()[key]
    assert ("val/knn_acc" if kind == "pretrain" else "val/loss") in tags["scalars"]
    if kind != "pretrain":
        assert any(tag.startswith("samples/") for tag in tags["images"])

"""Lifecycle runs of the shipped configs: size-and-time overrides, a per-step probe, and the boundary checks.

Used by tests/test_lifecycle.py (every config, tiny networks, CPU) and by benchmarks/gpu_check.py (three configs at
their real width, precision, strategy and compile setting, on CUDA). A run is `epg fit -c CONFIG -c SHRINK.yaml`
twice: the first stops early and the second resumes from its last.ckpt (``epg fit`` defaults to ``--ckpt_path last``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.plugins import MixedPrecision

from epg.method.phema import power_beta

ROOT = Path(__file__).resolve().parents[1]
# Width and depth of the CPU runs' networks (16 px, patch 4).
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
    "model": {
        "network",
        "warmup_steps",
        "total_steps",
        "lr_milestones",
        "loss",  # its init_args: LOSS_SIZE_AND_TIME only
        "grid_size",
        "knn_bank_size",
        "phema",  # its snapshot_every only
    },
    "data": {"image_size", "global_batch_size", "val_batch_size", "num_workers"},
}
PHEMA_EVERY = 2  # snapshot interval of the lifecycle runs with post-hoc EMA
LOSS_SIZE_AND_TIME = {"ect_d0", "ect_d1"}  # what SHRINK.yaml may set in model.init_args.loss.init_args
# Per kind: the first run's last step, the final step, and the compressed schedule.
PLANS = {
    "pretrain": {"stop": 6, "end": 12, "model": {"warmup_steps": 2, "total_steps": 12}},
    "dm": {"stop": 3, "end": 20, "model": {"warmup_steps": 4, "total_steps": 10}},  # fp16: the scaler skips some
    "cm": {
        "stop": 3,
        "end": 16,
        "model": {"warmup_steps": 2, "lr_milestones": [6, 8], "loss": {"init_args": {"ect_d0": 2, "ect_d1": 2}}},
    },
}


def config_kind(cfg: dict) -> str:
    """ "pretrain", "dm" or "cm"."""
    if cfg["model"]["class_path"].endswith("PretrainModule"):
        return "pretrain"
    return "cm" if cfg["model"]["init_args"]["loss"]["class_path"].endswith("ConsistencyLoss") else "dm"


class CPUFloat16(MixedPrecision):
    """ "16-mixed" with a GradScaler on CPU (Lightning maps ``precision="16-mixed"`` on CPU to bf16)."""

    def __init__(self) -> None:
        super().__init__("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


def shrink(cfg: dict, max_steps: int, probe: str, device: str = "cpu", batch: int = 8) -> dict:
    """Size-and-time overrides of ``cfg`` for a run that stops at ``max_steps``.

    On "cpu": tiny networks at 16 px, the config's precision through a CPU plugin where needed, no SyncBatchNorm
    (DDP refuses it for CPU modules). On "cuda": the config's own networks, resolution, precision and strategy on
    one GPU; only batch and time shrink.
    """
    kind, args, trainer = config_kind(cfg), cfg["model"]["init_args"], cfg["trainer"]
    plan = PLANS[kind]
    callbacks = []
    for callback in trainer.get("callbacks", []):
        callback = json.loads(json.dumps(callback))
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = plan["stop"]
        callbacks.append(callback)
    callbacks.append({"class_path": "tests._lifecycle.Probe", "init_args": {"path": probe}})
    out = {
        "trainer": {
            "accelerator": "cpu" if device == "cpu" else "gpu",
            "devices": 1,
            "max_steps": max_steps,
            "val_check_interval": plan["stop"],
            "limit_val_batches": 2,
            "log_every_n_steps": 1,
            "callbacks": callbacks,
        },
        "model": {"init_args": dict(plan["model"])},
        "data": {"global_batch_size": batch, "val_batch_size": batch, "num_workers": 0 if device == "cpu" else 2},
    }
    if device == "cpu":
        network = {**(args.get("network") or {}), **TINY, "image_size": 16, "patch_size": 4}
        if kind == "pretrain":
            network |= TINY_PROJECTOR
            out["model"]["init_args"]["knn_bank_size"] = 64  # k-NN bank: a few shards' worth, not 50K images
        out["model"]["init_args"]["network"] = network
        out["data"]["image_size"] = 16
        if trainer["precision"] == "16-mixed":  # the paper's fp16 + GradScaler, through a CPU plugin
            out["trainer"] |= {"precision": None, "plugins": [{"class_path": "tests._lifecycle.CPUFloat16"}]}
        if trainer.get("sync_batchnorm"):  # GPU only: benchmarks/gpu_check.sh runs it
            out["trainer"]["sync_batchnorm"] = False
    if "grid_size" in args:
        out["model"]["init_args"]["grid_size"] = 4
    if args.get("phema"):  # a snapshot every 2 applied updates, so both runs write some (method.md §13)
        out["model"]["init_args"]["phema"] = {**args["phema"], "snapshot_every": PHEMA_EVERY}
    for section, keys in SIZE_AND_TIME.items():
        given = out[section]["init_args"] if section == "model" else out[section]
        assert set(given) <= keys, f"SHRINK.yaml may change only size and time, not {set(given) - keys}"
    loss = set(out["model"]["init_args"].get("loss", {}).get("init_args", {}))
    assert loss <= LOSS_SIZE_AND_TIME, f"SHRINK.yaml may change only size and time, not {loss - LOSS_SIZE_AND_TIME}"
    return out


def write_stage1_for(cfg: dict, device: str = "cpu") -> None:
    """The stage-1 file the config's ``init_from`` names: a random encoder of the fine-tuning network's shape."""
    from epg.lightning.pretrain import PretrainModule

    args = cfg["model"]["init_args"]
    network = dict(args.get("network") or {})
    if device == "cpu":
        network |= {**TINY, **TINY_PROJECTOR, "image_size": 16, "patch_size": 4}
    path = Path(args["init_from"])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    PretrainModule(preset=args["preset"], network=network).export_stage1(path)


def link_data(cfg: dict, digits: Path) -> None:
    """Point the config's train/val shard folders at the embedded digits' shards."""
    for split in ("train", "val"):
        target = Path(cfg["data"][f"{split}_shards"])
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(Path(digits).resolve() / split, target_is_directory=True)


def run_lifecycle(config: Path, digits: Path, device: str = "cpu", batch: int = 8) -> list[dict]:
    """Both runs of ``config`` in the current folder; returns the probe's rows. Raises if `epg fit` fails."""
    from epg.cli import main

    cfg = yaml.safe_load(Path(config).read_text())
    link_data(cfg, digits)
    if cfg["model"]["init_args"].get("init_from"):
        write_stage1_for(cfg, device)
    plan, probe = PLANS[config_kind(cfg)], Path("probe.jsonl").resolve()
    for i, steps in enumerate((plan["stop"], plan["end"])):
        shrink_file = Path(f"shrink{i}.yaml")
        shrink_file.write_text(yaml.safe_dump(shrink(cfg, steps, str(probe), device, batch)))
        code = main(["fit", "-c", str(config), "-c", str(shrink_file)])  # the second run resumes (ckpt last)
        if code != 0:
            raise RuntimeError(f"epg fit -c {config} -c {shrink_file} exited {code}")
    return [json.loads(line) for line in probe.read_text().splitlines()]


def _approx(a: float, b: float, rel: float = 1e-6) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def check_lifecycle(cfg: dict, rows: list[dict]) -> dict:
    """Assert every schedule boundary of the run in ``rows``; returns a summary of what was crossed."""
    kind, plan, args = config_kind(cfg), PLANS[config_kind(cfg)], cfg["model"]["init_args"]
    assert [r["step"] for r in rows] == list(range(1, plan["end"] + 1)), "the rerun must continue where it stopped"
    lr, warm = args["lr"], plan["model"]["warmup_steps"]
    assert all(r["fused"] for r in rows), "fused AdamW on every device"
    applied = [r for r in rows if r["applied"]]
    assert all(math.isfinite(r["loss"]) for r in applied)
    # EMA / target rule on every step (§3.5, §4, §5.2): copy ← m·copy + (1 − m)·online, nothing on a skipped step.
    for r in rows:
        for key in [k for k in r if k.endswith("_residual")]:
            assert r[key] < 1e-6, (key, r)
    by_updates = {r["updates_before"]: r for r in applied}
    assert by_updates[0]["lr"] == 0.0, "linear warm-up from 0"
    assert _approx(by_updates[warm // 2]["lr"], lr * (warm // 2) / warm)
    assert _approx(by_updates[warm]["lr"], lr), "warm-up end: the peak LR"
    crossed = {"updates": max(by_updates) + 1, "skipped": len(rows) - len(applied), "warmup_end": warm}
    if kind == "pretrain":
        # N(k) = min(20·2^⌈k/K′⌉, 1280) + 1 with K′ = ⌈12 / log2(65)⌉ = 2: doubles every 2 updates (§3.2).
        expected = {0: 21, 1: 41, 2: 41, 3: 81, 5: 161, 7: 321, 9: 641, 10: 641, 11: 1281}
        assert {k: by_updates[k]["num_scales"] for k in expected} == expected
        assert _approx(by_updates[11]["lr"], lr * 0.5 * (1 + math.cos(math.pi * 9 / 10)))  # cosine to 0 at K = 12
        assert all(r["clipped"] == 0 for r in rows), "stage 1 does not clip (§3.7)"
        assert by_updates[11]["target_distance"] > 0
        crossed["num_scales"] = sorted(set(expected.values()))
    elif kind == "dm":
        clip, total = args.get("grad_clip", 0.5), plan["model"]["total_steps"]
        for r in applied:  # clipping from the first update after warm-up (§4); the clip holds
            assert r["clipped"] == (1 if r["updates_before"] >= warm else 0), r
            if not r["clipped"]:
                assert _approx(r["grad_norm_after"], r["grad_norm"], 1e-4), r
            elif r["grad_norm"] > clip:
                assert _approx(r["grad_norm_after"], clip, 1e-4), r
        assert _approx(
            by_updates[total - 1]["lr"], lr * 0.5 * (1 + math.cos(math.pi * (total - 1 - warm) / (total - warm)))
        )
        assert max(by_updates) >= total, "the run must reach the end of the cosine"
        assert all(r["lr"] == 0.0 for r in applied if r["updates_before"] >= total), "cosine end"
        assert applied[-1]["ema0_distance"] > 0
        crossed["clipped_updates"] = sum(r["clipped"] for r in applied)
    else:
        # ECT stage a = δ + ⌊k/d⌋ for k ≥ d (d0 = d1 = 2) (§5.3); LR ×1 through update 6, ×f0 through 8, then ×f1
        # (the official step, §5.5: the factor changes on the update after the milestone).
        delta = args["loss"]["init_args"]["ect_delta"]
        stages = {k: by_updates[k]["ect_stage"] for k in (0, 1, 2, 3, 4, 6)}
        assert stages == {0: delta, 1: delta, 2: delta + 1, 3: delta + 1, 4: delta + 2, 6: delta + 3}, stages
        factors = args.get("lr_factors", [0.3, 0.08])
        assert _approx(by_updates[6]["lr"], lr)
        assert _approx(by_updates[7]["lr"], lr * factors[0]) and _approx(by_updates[8]["lr"], lr * factors[0])
        assert _approx(by_updates[9]["lr"], lr * factors[1])
        assert all(r["target_distance"] == 0.0 for r in applied), "the stop-gradient target is the online copy"
        assert all(r["clipped"] == 0 for r in rows), "the CM does not clip (§5.5)"
        crossed["ect_stages"] = sorted(set(r["ect_stage"] for r in applied))
    if args.get("phema"):  # one snapshot per PHEMA_EVERY applied updates, across the resume: none lost or repeated
        folder = Path(cfg["trainer"]["default_root_dir"]) / "phema"
        names = sorted(p.name for p in folder.iterdir())
        assert names == [f"phema-{u:09d}.pt" for u in range(PHEMA_EVERY, crossed["updates"] + 1, PHEMA_EVERY)], names
        stop = PLANS[kind]["stop"]
        before = [r["updates_before"] + r["applied"] for r in rows if r["step"] == stop][0]
        assert 0 < before // PHEMA_EVERY < len(names), "snapshots on both sides of the resume"
        for name in names:
            assert torch.load(folder / name, weights_only=True, mmap=True)["updates"] == int(name[6:15])
        crossed["phema_snapshots"] = len(names)
    return crossed


def _flat(params) -> torch.Tensor:
    """One fp32 vector of the (local shards of the) parameters."""
    return torch.cat([(p.to_local() if hasattr(p, "to_local") else p).detach().float().flatten() for p in params])


def _pairs(module) -> list[tuple[str, torch.nn.Module, torch.nn.Module, float]]:
    """(name, averaged copy, online network, decay) for each EMA / target copy of the module."""
    if hasattr(module, "ema_nets"):  # FinetuneModule
        rates = module.hparams.ema_rates
        pairs = [(f"ema{i}", e, module.net, m) for i, (e, m) in enumerate(zip(module.ema_nets, rates, strict=True))]
        if module.target_net is not None:
            pairs.append(("target", module.target_net, module.net, 0.0))
        if getattr(module, "phema", None) is not None:  # power-function copies: β_t of the updates made so far
            for i, (copy, gamma) in enumerate(zip(module.phema.nets, module.phema.gammas, strict=True)):
                pairs.append((f"phema{i}", copy, module.net, power_beta(max(module.updates, 1), gamma)))
        return pairs
    return [("target", module.target, module.online, module.hparams.target_momentum)]  # PretrainModule


class Probe(L.Callback):
    """Appends one JSON line per training step to ``path``: counters, LR, grad norms, schedules, EMA residuals.

    ``<copy>_residual``: max |copy − lerp(copy_before, online, 1 − m)| (max |copy − copy_before| on a step the grad
    scaler skipped): 0 when the averaging rule held. ``<copy>_distance``: ‖copy − online‖ after the step.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._before: dict[str, torch.Tensor] = {}
        self._updates = self._clipped = 0
        self._lr = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = {name: _flat(copy.parameters()) for name, copy, _, _ in _pairs(pl_module)}
        self._updates, self._clipped = pl_module.updates, pl_module.clipped_updates
        self._lr = trainer.optimizers[0].param_groups[0]["lr"]  # the LR of this step's update

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        applied = pl_module.updates - self._updates
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        record = {
            "step": trainer.global_step,
            "updates_before": self._updates,
            "applied": applied,
            "clipped": pl_module.clipped_updates - self._clipped,
            "lr": self._lr,
            "loss": float(metrics["train/loss"]),
            "grad_norm": float(metrics.get("train/grad_norm", math.nan)),  # before the clip
            "grad_norm_after": float(torch.nn.utils.get_total_norm(grads)) if grads else math.nan,
            "fused": bool(trainer.optimizers[0].defaults.get("fused")),
        }
        for key in ("ect_stage", "num_scales"):
            if f"train/{key}" in metrics:
                record[key] = int(metrics[f"train/{key}"])
        for name, copy, online, decay in _pairs(pl_module):
            after, before, net = _flat(copy.parameters()), self._before[name], _flat(online.parameters())
            expected = torch.lerp(before, net, 1.0 - decay) if applied else before
            record[f"{name}_residual"] = float((after - expected).abs().max())
            record[f"{name}_distance"] = float((after - net).norm())
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> int:
    """`python -m tests._lifecycle CONFIG --device cuda --out RESULT.json`: one lifecycle run, checked, as JSON."""
    import argparse
    import os
    import tempfile
    import time
    import traceback

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("config", help="a config under configs/, e.g. finetune/epg_xl16_dm_in256.yaml")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--batch", type=int, default=16, help="global batch (one device)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from epg.data.demo import prepare_demo

    config = ROOT / "configs" / args.config
    cfg = yaml.safe_load(config.read_text())
    record = {"config": args.config, "device": args.device, "batch": args.batch}
    record |= {"precision": cfg["trainer"]["precision"], "strategy": cfg["trainer"].get("strategy", "auto")}
    record["compile"] = bool(cfg["model"]["init_args"].get("compile"))
    start, here = time.time(), os.getcwd()
    try:
        with tempfile.TemporaryDirectory(prefix="epg_lifecycle_") as tmp:
            os.chdir(tmp)
            prepare_demo("digits")
            rows = run_lifecycle(config, Path("digits"), args.device, args.batch)
            record["crossed"] = check_lifecycle(cfg, rows)
            record["ok"] = True
    except Exception as err:  # the record says what broke; gpu_check carries on with the next run
        record |= {"ok": False, "error": "".join(traceback.format_exception_only(err)).strip()[-2000:]}
        record["traceback"] = traceback.format_exc()[-4000:]
    finally:
        os.chdir(here)
    record["wall_s"] = round(time.time() - start, 1)
    if args.device == "cuda" and torch.cuda.is_available():
        record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "traceback"}))
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    import sys

    sys.exit(main())

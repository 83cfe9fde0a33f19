"""Every shipped config through its whole schedule: `epg fit -c CONFIG -c SHRINK.yaml` on CPU, then a resume.

SHRINK.yaml (tests._lifecycle.shrink) changes size and time only: tiny widths/depths at 16 px, batch 8, step counts
and the schedule boundaries scaled with them, one CPU device. The recipe stays the config's: optimizer, LR, loss,
noise, EMA rates, strategy (DDP / FSDP2 on one gloo process), callbacks, and the precision ("16-mixed" runs as fp16
with the paper's GradScaler through a CPU plugin; "bf16-mixed" and "32-true" as they are). One deviation: stage 1's
SyncBatchNorm is off here (torch's DDP refuses it for CPU modules) and on in benchmarks/gpu_check.sh's CUDA runs.

Each run crosses every boundary of its schedule (tests._lifecycle.check_lifecycle asserts each):
- stage 2 DM: LR warm-up end (clipping turns on, method.md §4) and cosine end; resumed inside warm-up;
- stage 2 CM: warm-up end, ECT stage changes (§5.3), both LR milestones (§5.5), target = online after every update
  (§5.2); resumed before the first stage change;
- stage 1: warm-up end, every curriculum doubling up to its last N (§3.2), cosine end; resumed mid-curriculum;
and in all: the EMA/target rule on every step, finite losses, a validation pass, checkpoints, and (stage 2) a sample
grid in TensorBoard. GPU-only branches taken on CPU: fused AdamW (the default on every device), clipping a fused
optimizer's gradients under fp16 and bf16, DDP and FSDP2 code paths.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._config_utils import load
from tests._lifecycle import ROOT, check_lifecycle, config_kind, run_lifecycle

CONFIGS = sorted(p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.yaml"))


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from epg.data.demo import prepare_demo

    root = tmp_path_factory.mktemp("digits")
    prepare_demo(root)
    return root


def _tensorboard_tags(run: Path) -> dict[str, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: dict[str, list[str]] = {"images": [], "scalars": []}
    for event in sorted(run.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(event), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        for key in tags:
            tags[key] += acc.Tags()[key]
    return tags


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_config_lifecycle(name, tmp_path, monkeypatch, digits):
    monkeypatch.chdir(tmp_path)  # the config's relative paths (runs/..., data/..., weights/...) resolve here
    config = ROOT / "configs" / name
    cfg = load(config)
    rows = run_lifecycle(config, digits)
    check_lifecycle(cfg, rows)
    run = Path(cfg["trainer"]["default_root_dir"])
    assert (run / "checkpoints" / "last.ckpt").exists()
    tags = _tensorboard_tags(run)
    kind = config_kind(cfg)
    assert ("val/knn_acc" if kind == "pretrain" else "val/loss") in tags["scalars"]
    if kind != "pretrain":
        assert any(tag.startswith("samples/") for tag in tags["images"]), "a sample grid"

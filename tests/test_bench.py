"""`epg bench` and the CPU path of benchmarks/gpu_check.sh (the GPU path runs on an H200 only)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from epg.nn.flops import forward_macs, train_flops_per_image

ROOT = Path(__file__).parents[1]


def test_train_flops_accounting():
    assert train_flops_per_image("finetune", "EPG-XL/16") == 6 * forward_macs("EPG-XL/16").total
    # EPG-XL/16 at 367 img/s (the fp16 eager anchor of issue 7) is ≈ 290 TFLOP/s of model FLOPs.
    assert 250 < 367 * train_flops_per_image("finetune", "EPG-XL/16") / 1e12 < 330
    with pytest.raises(ValueError, match="unknown stage"):
        train_flops_per_image("sample", "EPG-XL/16")


def test_bench_rejects_unknown_preset():
    res = subprocess.run(
        [sys.executable, "-m", "epg.cli", "bench", "sample", "--preset", "EPG-Q/1"], capture_output=True, text=True
    )
    assert res.returncode == 2 and "unknown preset" in res.stderr


@pytest.mark.slow
def test_gpu_check_cpu_path_writes_json(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["mode"].startswith("cpu-smoke") and summary["all_ran"]
    names = {r["name"]: r["result"] for r in summary["runs"]}
    assert names["dm_smoke"]["images_per_s"] > 0 and names["pretrain_smoke"]["tflops"] >= 0
    # Timed past the LR warm-up: every timed DM step clips (stage 1 never does).
    assert names["dm_smoke"]["clipped_timed_steps"] == names["dm_smoke"]["steps"]
    assert names["pretrain_smoke"]["clipped_timed_steps"] == 0
    assert [r["impl"] for r in names["optimizer_smoke"]["runs"]] == ["fused", "foreach"]
    phema = names["phema_smoke"]  # benchmarks/phema_cost.py: post-hoc EMA update and reconstruction times
    assert phema["update_all_copies_s"] > 0 and phema["reconstruct_s"] > 0
    lifecycle = names["lifecycle_smoke"]  # the XL/16 config's two fits at tiny width, boundaries checked
    assert lifecycle["ok"] and lifecycle["crossed"]["clipped_updates"] > 0 and lifecycle["crossed"]["updates"] > 10
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "demo_smoke_samples_diffusion.png", "demo_smoke_summary_diffusion.json", "gpu_check.json"]  # fmt: skip
    assert names["sample_smoke"]["nfe"] >= 6  # 4 levels: 3 Heun steps of 2 calls, plus CFG calls
    demo = names["demo_smoke"]  # the GPU demo configs, 1 step per stage on the CPU
    assert demo["pretrain_steps"] == demo["finetune_steps"] == 1 and 0.0 <= demo["class_accuracy"] <= 1.0
    assert (tmp_path / "demo_smoke_samples_diffusion.png").is_file()

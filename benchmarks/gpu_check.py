"""Every GPU check in one run, JSON out: first the lifecycle runs of three paper configs on CUDA (real width,
precision, strategy and compile setting; every schedule boundary crossed in a few steps, then a resume: what would
otherwise break hours into a run), then training/sampling throughput, MFU, memory and host syncs, timed past the LR
warm-up with clipping on (issue 7), then the GPU demo variant's wall time and class accuracy (`epg demo --device gpu`).

Run through `benchmarks/gpu_check.sh`. Without a GPU it runs the same code paths on tiny presets, a tiny lifecycle run
and a 1-step demo (the CPU path, exercised by tests/test_bench.py) and marks the targets as not measured.
``--skip-lifecycle``, ``--skip-bench`` and ``--skip-demo`` leave a part out. Only gpu_check.json and the demo grids
are written to the output folder (the device tool brings back at most 8 files).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (name, epg bench argv, target description, target check on the result dict)
GPU_RUNS = [
    (
        "dm_xl16_bf16_compile",
        "train --stage finetune --preset EPG-XL/16 --batch 128 --steps 20 --warmup 8 --compile --check-syncs",
        ">= 540 img/s (>= 60% MFU of 790 TFLOP/s)",
        lambda r: r["images_per_s"] >= 540,
    ),
    (
        "dm_xl16_fp16_eager",
        "train --stage finetune --preset EPG-XL/16 --batch 128 --steps 15 --warmup 5 --precision 16-mixed",
        "reference: official-style fp16 eager (367 img/s anchor)",
        None,
    ),
    (
        "pretrain_b16_fp16_eager",
        "train --stage pretrain --preset RCM-B/16 --batch 128 --steps 15 --warmup 5 --precision 16-mixed",
        "baseline of the 1.4x target",
        None,
    ),
    (
        "pretrain_b16_bf16_compile",
        "train --stage pretrain --preset RCM-B/16 --batch 128 --steps 15 --warmup 8 --compile",
        ">= 1.4x pretrain_b16_fp16_eager",
        "ratio",
    ),
    (
        "sample_xl16_heun32_cfg",
        "sample --preset EPG-XL/16 --batch 256 --steps 32 --cfg 2.5 --autocast bf16",
        ">= 22 img/s",
        lambda r: r["images_per_s"] >= 22,
    ),
    (
        "dm_g16_b128_ckpt",
        "train --stage finetune --preset EPG-G/16 --batch 128 --steps 6 --warmup 3 --grad-checkpointing",
        "trains at batch 128 per GPU; report peak memory",
        lambda r: r["peak_memory_gib"] < 139,
    ),
]
# (name, python -m tests._lifecycle argv, target): each config's two `epg fit` runs and check_lifecycle's asserts.
LIFECYCLE_GPU = [
    ("lifecycle_xl16_dm", "finetune/epg_xl16_dm_in256.yaml --device cuda --batch 16", "16-mixed + paper scaler, DDP"),
    ("lifecycle_l16_cm", "finetune/epg_l16_cm_in256.yaml --device cuda --batch 16", "16-mixed, shared dropout RNG"),
    ("lifecycle_rcm_b16", "pretrain/rcm_b16_in256.yaml --device cuda --batch 16", "bf16, DDP + SyncBatchNorm"),
    ("lifecycle_g16_fsdp", "finetune/epg_g16_dm_in256.yaml --device cuda --batch 8", "bf16, FSDP2, grad ckpt"),
]
# (name, benchmarks/optimizer_step.py argv, target): fused vs foreach AdamW, one clipped update (the default's basis).
OPTIMIZER_GPU = [("optimizer_xl16", "--preset EPG-XL/16 --steps 20", "fused faster than foreach (speedup > 1)")]
OPTIMIZER_CPU = [("optimizer_smoke", "--preset EPG-Nano/4 --steps 2", "")]
# (name, benchmarks/phema_cost.py argv, target): post-hoc EMA update and reconstruction times (method.md §13).
PHEMA_GPU = [("phema_xl16", "--preset EPG-XL/16 --steps 20 --snapshots 4", "report update and reconstruction times")]
PHEMA_CPU = [("phema_smoke", "--preset EPG-Nano/4 --steps 2 --snapshots 2", "")]
LIFECYCLE_CPU = [("lifecycle_smoke", "finetune/epg_xl16_dm_in256.yaml --device cpu --batch 8", "tiny widths")]
CPU_RUNS = [
    ("dm_smoke", "train --stage finetune --preset EPG-Nano/4 --batch 4 --steps 2 --warmup 1 --precision 32", "", None),
    (
        "pretrain_smoke",
        "train --stage pretrain --preset EPG-Nano/4 --batch 4 --steps 2 --warmup 1 --precision 32",
        "",
        None,
    ),
    ("sample_smoke", "sample --preset EPG-Nano/4 --batch 4 --steps 4 --cfg 2.5 --repeats 1", "", None),
]


# (name, epg demo argv, target description, target check on the demo summary). Both share one demo folder (in /tmp,
# so checkpoints stay out of OUT): the consistency run reuses the diffusion run's stage 1, so its total excludes it.
DEMO_GPU = [
    (
        "demo_gpu_diffusion",
        "--device gpu --objective diffusion --fid-samples 2000",
        ">= 90% class accuracy in <= 600 s on one GPU (stage 1 + stage 2 + evaluation)",
        lambda r: r["class_accuracy"] >= 0.9 and r["total_s"] <= 600,
    ),
    (
        "demo_gpu_consistency",
        "--device gpu --objective consistency --fid-samples 2000",
        "one-step model: report accuracy and time",
        None,
    ),
]
DEMO_CPU = [
    (
        "demo_smoke",
        "--device gpu --accelerator cpu --pretrain-steps 1 --finetune-steps 1 --batch-size 8 --num-workers 0 "
        "--fid-samples 4 --fid-ref 4 --threads 1",
        "",
        None,
    ),
]
DEMO_KEYS = ("total_s", "timings_s", "class_accuracy", "fid", "fid_samples", "pretrain_steps", "finetune_steps")


def run_demo(name: str, args: str, out_dir: Path, timeout: int, demo_dir: Path) -> dict:
    """`epg demo ARGS --out DEMO_DIR`; the record keeps the summary's times, accuracy and FID; the grid PNG and the
    summary JSON are copied to ``out_dir``."""
    cmd = [sys.executable, "-m", "epg.cli", "demo", *args.split(), "--out", str(demo_dir)]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    record = {"name": name, "command": "epg demo " + args, "wall_s": round(time.time() - start, 1)}
    if proc.returncode != 0:
        record["error"] = (proc.stdout[-1000:] + proc.stderr[-2000:]).strip()
        return record
    summary = json.loads((demo_dir / "summary.json").read_text())
    record["result"] = {key: summary.get(key) for key in DEMO_KEYS}
    objective = summary["objective"]
    for file in (f"summary_{objective}.json", f"samples_{objective}.png"):
        shutil.copy(demo_dir / file, out_dir / f"{name}_{file}")
    return record


# Tools that write their result as JSON to --out: kind -> (argv after the interpreter, the command as recorded).
JSON_TOOLS = {
    "bench": (["-m", "epg.cli", "bench"], "epg bench"),
    "optimizer": (["benchmarks/optimizer_step.py"], "python benchmarks/optimizer_step.py"),
    "lifecycle": (["-m", "tests._lifecycle"], "python -m tests._lifecycle"),
    "phema": (["benchmarks/phema_cost.py"], "python benchmarks/phema_cost.py"),
}


def run_json(kind: str, name: str, args: str, timeout: int) -> tuple[dict, dict | None]:
    """Run a JSON_TOOLS tool with ARGS; the run's record and the JSON it wrote (None, with an error, when none)."""
    prefix, label = JSON_TOOLS[kind]
    path = Path(tempfile.mkdtemp(prefix="epg_gpu_check_")) / f"{name}.json"
    cmd = [sys.executable, *prefix, *args.split(), "--out", str(path)]
    record: dict = {"name": name, "command": f"{label} {args}"}
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        record["error"] = f"timeout after {timeout}s"
        return record, None
    record["wall_s"] = round(time.time() - start, 1)
    if not path.exists():
        record["error"] = (proc.stdout[-1000:] + proc.stderr[-3000:]).strip()
        return record, None
    return record, json.loads(path.read_text())


def run_one(name: str, args: str, out_dir: Path, timeout: int) -> dict:
    """`epg bench ARGS`."""
    record, payload = run_json("bench", name, args, timeout)
    if payload is not None:
        record["result"] = payload["results"][0]
    return record


def run_optimizer(name: str, args: str, out_dir: Path, timeout: int) -> dict:
    """benchmarks/optimizer_step.py ARGS: fused vs foreach AdamW update times."""
    record, payload = run_json("optimizer", name, args, timeout)
    if payload is not None:
        record["result"] = payload
    return record


def run_phema(name: str, args: str, out_dir: Path, timeout: int) -> dict:
    """benchmarks/phema_cost.py ARGS: post-hoc EMA memory, snapshot bytes, update and reconstruction times."""
    record, payload = run_json("phema", name, args, timeout)
    if payload is not None:
        record["result"] = {k: v for k, v in payload.items() if k != "presets"}
    return record


def run_lifecycle(name: str, args: str, out_dir: Path, timeout: int) -> dict:
    """`python -m tests._lifecycle ARGS`: two `epg fit` runs of a config (the second resumes), boundaries checked."""
    record, payload = run_json("lifecycle", name, args, timeout)
    if payload is not None and payload.get("ok"):
        record["result"] = payload
    elif payload is not None:
        record["error"] = payload.get("traceback") or payload.get("error")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-dir", default=os.environ.get("OUT") or "benchmarks/results")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per benchmark")
    parser.add_argument("--cpu", action="store_true", help="force the CPU smoke path")
    parser.add_argument("--skip-demo", action="store_true", help="leave out the GPU demo variant (issue 8)")
    parser.add_argument("--skip-bench", action="store_true", help="leave out the epg bench runs (issue 7)")
    parser.add_argument("--skip-lifecycle", action="store_true", help="leave out the config lifecycle runs")
    parser.add_argument("--lifecycle-timeout", type=int, default=300, help="seconds per lifecycle run")
    parser.add_argument("--demo-timeout", type=int, default=900, help="seconds per demo run")
    parser.add_argument(
        "--jobs",
        type=int,
        help="runs at a time (default: 1 on a GPU, whose timings must not share it; 2 on the CPU smoke path, whose "
        "subprocesses spend most of their time importing on one core)",
    )
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    import torch

    gpu = torch.cuda.is_available() and not args.cpu
    runs = []
    if not args.skip_lifecycle:
        runs += [
            (run_lifecycle, args.lifecycle_timeout, *run, None) for run in (LIFECYCLE_GPU if gpu else LIFECYCLE_CPU)
        ]
    if not args.skip_bench:
        runs += [(run_one, args.timeout, *run) for run in (GPU_RUNS if gpu else CPU_RUNS)]
        check = lambda r: r["fused_speedup"] > 1  # noqa: E731
        runs += [(run_optimizer, args.timeout, *run, check) for run in (OPTIMIZER_GPU if gpu else OPTIMIZER_CPU)]
        runs += [(run_phema, args.timeout, *run, None) for run in (PHEMA_GPU if gpu else PHEMA_CPU)]
    if not args.skip_demo:
        demo_dir = Path(tempfile.mkdtemp(prefix="epg_gpu_check_demo_"))
        demo = functools.partial(run_demo, demo_dir=demo_dir)
        runs += [(demo, args.demo_timeout, *run) for run in (DEMO_GPU if gpu else DEMO_CPU)]

    def run(entry: tuple) -> dict:
        runner, timeout, name, run_args, target, check = entry
        try:
            record = runner(name, run_args, out_dir, timeout)
        except subprocess.TimeoutExpired:  # run_demo's (the JSON tools record their own time-outs)
            record = {"name": name, "command": "epg demo " + run_args, "error": f"timeout after {timeout}s"}
        record["target"] = target
        result = record.get("result")
        if result is not None and callable(check):
            record["meets_target"] = bool(check(result))
        print(json.dumps(record), flush=True)
        return record

    jobs = args.jobs or (1 if gpu else min(2, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        records = list(pool.map(run, runs))  # in the order of `runs`
    by_name = {r["name"]: r.get("result") for r in records}
    base, fast = by_name.get("pretrain_b16_fp16_eager"), by_name.get("pretrain_b16_bf16_compile")
    if base and fast:
        ratio = fast["images_per_s"] / base["images_per_s"]
        for r in records:
            if r["name"] == "pretrain_b16_bf16_compile":
                r["speedup_vs_fp16_eager"] = round(ratio, 3)
                r["meets_target"] = ratio >= 1.4
    summary = {
        "mode": "gpu" if gpu else "cpu-smoke (targets not measured: no GPU)",
        "environment": {"torch": torch.__version__, "gpu": torch.cuda.get_device_name() if gpu else None},
        "jobs": jobs,
        "runs": records,
        "all_ran": all("result" in r for r in records),
    }
    (out_dir / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out_dir / 'gpu_check.json'}")
    return 0 if summary["all_ran"] else 1


if __name__ == "__main__":
    sys.exit(main())

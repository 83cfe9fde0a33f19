"""Fused vs foreach AdamW: time of one post-warm-up optimizer update (unscale + grad norm + clip + step); JSON out.

The update is what ``EPGModule`` does after warm-up: the global norm of the gradients, a clip to 0.5 and the AdamW
step, over the trainable parameters of a preset's network (two groups, as ``param_groups`` builds them). Run on CPU
here (``benchmarks/results/optimizer_step_cpu.json``) and on CUDA by ``benchmarks/gpu_check.sh``:

    python benchmarks/optimizer_step.py --preset EPG-S/4 --out benchmarks/results/optimizer_step_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from epg.lightning.base import OPTIMIZER_IMPLS, param_groups
from epg.nn.network import build_network


def time_update(preset: str, impl: str, device: str, steps: int, warmup: int = 2) -> dict:
    """Median seconds of one clipped AdamW update with ``impl`` ("fused" | "foreach") on ``device``."""
    torch.manual_seed(0)
    net = build_network(preset).to(device)
    groups = param_groups(net, 0.01, no_decay=("pos_embed", "cls_token"))
    fused = impl == "fused"
    optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.999), fused=fused, foreach=not fused)
    params = [p for p in net.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    times = []
    for i in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 0.5, foreach=True)
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    n_params = sum(p.numel() for p in params)
    return {"impl": impl, "median_s": round(times[len(times) // 2], 5), "min_s": round(times[0], 5), "params": n_params}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="EPG-S/4")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="JSON file (default: print only)")
    args = parser.parse_args(argv)
    runs = [time_update(args.preset, impl, args.device, args.steps) for impl in OPTIMIZER_IMPLS]
    fused, foreach = (r["median_s"] for r in runs)
    summary = {
        "kind": "optimizer_update",
        "preset": args.preset,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "runs": runs,
        "fused_speedup": round(foreach / fused, 3),
        "command": "python benchmarks/optimizer_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

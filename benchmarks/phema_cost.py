"""Cost of post-hoc EMA (method.md §13): memory per copy, snapshot bytes, update and reconstruction time; JSON out.

- Memory per extra power-function copy: parameters × 4 bytes (fp32 copies) plus the buffers, for every preset
  (from the parameter counts of ``build_network``, on the meta device: nothing is allocated).
- Snapshot bytes: copies × (parameters × bytes of the snapshot dtype + buffers) + a few kB of pickle; the formula is
  checked against a real snapshot file of ``--check-preset``.
- Update time: the median time of one ``PowerEMAs.update_`` (all copies) on ``--preset`` on ``--device``, next to
  one fixed-rate EMA update for scale.
- Reconstruction time: ``epg.posthoc.reconstruct`` of one σ_rel from ``--snapshots`` snapshots of ``--preset``.

CPU here (benchmarks/results/phema_cost_cpu.json); CUDA by benchmarks/gpu_check.sh::

    python benchmarks/phema_cost.py --preset EPG-S/4 --out benchmarks/results/phema_cost_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from epg.lightning.phema import SNAPSHOT_DTYPES, PhemaOptions, PowerEMAs
from epg.method.ema import ema_update_
from epg.nn.network import build_network
from epg.nn.presets import PRESETS
from epg.posthoc import reconstruct

SIGMA_RELS = (0.05, 0.10)


def sizes(preset: str) -> tuple[int, int]:
    """(parameter elements, floating buffer bytes) of a preset's network, built on the meta device."""
    with torch.device("meta"):
        net = build_network(preset)
    params = sum(p.numel() for p in net.parameters())
    buffers = sum(b.numel() * b.element_size() for b in net.buffers())
    return params, buffers


def snapshot_bytes(params: int, buffers: int, copies: int = 2, dtype: str = "float16") -> int:
    """Bytes of the tensors of one snapshot: each copy's parameters in ``dtype`` plus its buffers (fp32 here)."""
    per = torch.tensor([], dtype=SNAPSHOT_DTYPES[dtype] or torch.float32).element_size()
    return copies * (params * per + buffers)


def median_time(fn, device: str, steps: int, warmup: int = 2) -> float:
    times = []
    for i in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(i + 1)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="EPG-S/4", help="preset of the timed updates and reconstruction")
    parser.add_argument("--check-preset", default="EPG-Nano/4", help="preset whose real snapshot checks the formula")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--snapshots", type=int, default=8, help="snapshots the timed reconstruction combines")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    presets = {}
    for name in PRESETS:
        params, buffers = sizes(name)
        presets[name] = {
            "params": params,
            "copy_fp32_bytes": params * 4 + buffers,
            "snapshot_fp16_bytes": snapshot_bytes(params, buffers),
            "snapshot_fp32_bytes": snapshot_bytes(params, buffers, dtype="float32"),
        }

    with tempfile.TemporaryDirectory() as tmp:
        net = build_network(args.check_preset)
        ema = PowerEMAs(net, PhemaOptions(sigma_rels=SIGMA_RELS))
        path = ema.write_snapshot(tmp, 1)
        params, buffers = sizes(args.check_preset)
        check = {
            "preset": args.check_preset,
            "file_bytes": path.stat().st_size,
            "formula_bytes": snapshot_bytes(params, buffers),
        }
        check["overhead_bytes"] = check["file_bytes"] - check["formula_bytes"]

        net = build_network(args.preset).to(args.device)
        ema = PowerEMAs(net, PhemaOptions(sigma_rels=SIGMA_RELS)).to(args.device)
        fixed = build_network(args.preset).to(args.device).requires_grad_(False)
        update = median_time(lambda t: ema.update_(net, t), args.device, args.steps)
        one_ema = median_time(lambda t: ema_update_(fixed, net, 0.999), args.device, args.steps)

        folder = Path(tmp) / "phema"
        ema.options.snapshot_dtype = "float16"
        for i in range(1, args.snapshots + 1):
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(torch.randn_like(p), alpha=1e-3)
            ema.update_(net, i * 100)
            ema.write_snapshot(folder, i * 100)
        start = time.perf_counter()
        reconstruct(folder, [0.07])
        rec_s = time.perf_counter() - start
        params = sizes(args.preset)[0]

    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({platform.processor() or 'x86'})",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "sigma_rels": list(SIGMA_RELS),
        "presets": presets,
        "snapshot_file_check": check,
        "timed_preset": args.preset,
        "timed_params": params,
        "update_all_copies_s": round(update, 6),
        "update_per_copy_s": round(update / len(SIGMA_RELS), 6),
        "fixed_rate_ema_update_s": round(one_ema, 6),
        "reconstruct_s": round(rec_s, 3),
        "reconstruct_snapshots": args.snapshots,
        "command": "python benchmarks/phema_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "presets"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`epg bench train|sample`: img/s, TFLOP/s and MFU of training steps and sampling, printed and written as JSON.

The measurements are :func:`epg.bench.bench_train` and :func:`epg.bench.bench_sample`; the numbers in README.md's
performance table come from `benchmarks/gpu_check.sh`.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from epg.bench import bench_sample, bench_train, environment
from epg.io import write_text
from epg.nn.flops import dense_peak_tflops
from epg.nn.presets import get_config
from epg.sampling.options import AUTOCAST


def _write(results: list[dict], out: str | None) -> None:
    payload = {"environment": environment(), "command": "epg bench " + " ".join(sys.argv[2:]), "results": results}
    text = json.dumps(payload, indent=2)
    print(text)
    if out:
        write_text(out, text + "\n")


def main(argv: list[str] | None = None) -> int:
    """`epg bench train|sample ...`; prints JSON and writes it to --out."""
    parser = argparse.ArgumentParser(prog="epg bench", description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train", help="training-step throughput of PretrainModule/FinetuneModule")
    t.add_argument("--stage", choices=("pretrain", "finetune"), default="finetune")
    t.add_argument("--preset", default="EPG-XL/16")
    t.add_argument("--batch", type=int, default=128)
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--warmup", type=int, default=5)
    t.add_argument("--precision", default="bf16-mixed")
    t.add_argument("--compile", action="store_true")
    t.add_argument("--grad-checkpointing", action="store_true")
    t.add_argument("--check-syncs", action="store_true", help="count CUDA host syncs in the timed steps")
    s = sub.add_parser("sample", help="sampling throughput (Heun with interval CFG)")
    s.add_argument("--preset", default="EPG-XL/16")
    s.add_argument("--batch", type=int, default=256)
    s.add_argument("--steps", type=int, default=32)
    s.add_argument("--cfg", type=float, default=2.5)
    s.add_argument("--repeats", type=int, default=2)
    s.add_argument("--autocast", choices=[k for k in AUTOCAST if k != "none"], default=None)
    s.add_argument("--compile", action="store_true")
    peak = dense_peak_tflops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    for p in (t, s):
        p.add_argument(
            "--peak-tflops",
            type=float,
            default=peak,
            help="dense peak for MFU (default: this GPU's bf16 peak, epg.nn.flops)",
        )
        p.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    try:
        get_config(args.preset)
    except ValueError as err:
        print(f"epg bench: {err}", file=sys.stderr)
        return 2
    if args.what == "train":
        result = bench_train(
            args.stage,
            args.preset,
            args.batch,
            args.steps,
            args.warmup,
            args.precision,
            args.compile,
            args.grad_checkpointing,
            args.peak_tflops,
            args.check_syncs,
        )
    else:
        result = bench_sample(
            args.preset,
            args.batch,
            args.steps,
            args.cfg or None,
            args.repeats,
            args.autocast,
            args.compile,
            args.peak_tflops,
        )
    _write([result], args.out)
    return 0

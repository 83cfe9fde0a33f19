"""`epg fid sweep`: FID per (CFG scale, EMA copy or post-hoc EMA σ_rel) on few samples, the best setting, its full
run (method.md §6, §8, §13).

Each setting samples ``--num`` images in memory and appends a row to ``OUT/sweep.json``; rerunning the same command
skips the rows already there. The best setting is then optionally sampled ``--final-num`` times (PNGs + ADM-style
.npz, resumable, as `epg sample` writes them) and scored with every metric the reference allows; ``--labels both``
compares class-balanced with random labels (method.md §6.4). The sweep itself is :class:`epg.eval.sweep.Sweep`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from epg.commands.sample import LABEL_COUNTS_HELP
from epg.eval.errors import EvalInputError
from epg.eval.sweep import Sweep, ema_choices
from epg.sampling import SAMPLERS
from epg.sampling.grid import GUIDANCE_INTERVAL
from epg.sampling.options import SamplingOptionsError, format_interval, parse_interval
from epg.sampling.per_image import LABEL_MODES


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `epg fid sweep`."""
    p.add_argument("checkpoint", help="EPG network file, FinetuneModule checkpoint, or official file (with --preset)")
    p.add_argument("--ref", required=True, help="reference .npz from `epg fid ref` (or an ADM reference batch)")
    p.add_argument("--out", required=True, help="folder for sweep.json, sweep.png and the final run's samples")
    p.add_argument("--scales", default="1.0,1.5,2.0,2.5,3.0", help="comma-separated CFG scales w (1 = no guidance)")
    p.add_argument("--ema", default="all", help="EMA copies: all, or comma-separated indices (and/or 'none' = online)")
    p.add_argument("--num", type=int, default=1000, help="samples per setting of the sweep")
    p.add_argument("--final-num", type=int, help="then sample the best setting this many times (50000 for FID-50K)")
    sampler_help = "default: what the checkpoint's objective needs (heun or consistency)"
    p.add_argument("--sampler", choices=sorted(SAMPLERS), help=sampler_help)
    p.add_argument("--steps", type=int, help="grid levels (default: the sampler's, heun 32, consistency 1)")
    interval_help = "guidance σ interval lo,hi (unshifted; applied as (lo·s_H, hi·s_H]) or 'none' for every level"
    p.add_argument("--interval", default=format_interval(GUIDANCE_INTERVAL), help=interval_help)
    p.add_argument(
        "--labels", default="balanced", choices=(*LABEL_MODES, "both"), help="label mode; both: compare them (§6.4)"
    )
    p.add_argument("--label-counts", default="auto", help=LABEL_COUNTS_HELP)
    p.add_argument("--preset", help="architecture of an official checkpoint, e.g. EPG-XL/16")
    p.add_argument("--seed", type=int, default=0, help="image i depends only on (seed, i)")
    p.add_argument("--batch-size", type=int, default=100, help="images per sampling and Inception batch")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--sigma-rel", help="post-hoc EMA σ_rel values to sweep (method.md §13), instead of --ema")
    p.add_argument("--phema-run", help="run folder of the snapshots (default: the checkpoint's, RUN/checkpoints/..)")


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EvalInputError(f"{what} takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise EvalInputError(f"{what} is empty")
    return values


def run(args: argparse.Namespace) -> int:
    """Run `epg fid sweep` on parsed arguments; returns the exit status (errors: EvalInputError)."""
    scales = _floats(args.scales, "--scales")
    try:
        interval = parse_interval(args.interval, "--interval")
    except SamplingOptionsError as err:
        raise EvalInputError(str(err)) from None
    sweep = Sweep(
        checkpoint=args.checkpoint,
        ref=args.ref,
        out=Path(args.out),
        scales=scales,
        emas=ema_choices(args.ema, args.checkpoint),
        num=args.num,
        final_num=args.final_num,
        sampler=args.sampler,
        steps=args.steps,
        interval=interval,
        labels=args.labels,
        label_counts=args.label_counts,
        preset=args.preset,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        sigma_rels=_floats(args.sigma_rel, "--sigma-rel") if args.sigma_rel else None,
        phema_run=args.phema_run,
    )
    sweep.run()
    return 0

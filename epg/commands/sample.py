"""`epg sample`: N images from a checkpoint as PNGs plus an ADM-style ``<folder>.npz`` (method.md §6, §8).

Image i's noise and label depend only on (seed, i), so a rerun fills in exactly the missing files and any number of
devices produces the same set. Several devices: ``--devices N`` (Lightning Fabric DDP, which relaunches the command
line, so use it from a shell, not from a notebook) or launch under torchrun. The run itself is
:class:`epg.sampling.run.SampleRun`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from epg.io import pick_device
from epg.sampling import SAMPLERS
from epg.sampling.grid import GUIDANCE_INTERVAL
from epg.sampling.options import (
    AUTOCAST,
    SamplingOptions,
    SamplingOptionsError,
    format_interval,
    parse_ema,
    parse_interval,
)
from epg.sampling.per_image import LABEL_MODES
from epg.sampling.run import SampleRun, SampleRunError
from epg.sampling.stochastic import STOCHASTIC_VARIANTS

PROG = "epg sample"
LABEL_COUNTS_HELP = (
    "class frequencies of --labels random: training shards (folder or pattern) or their dataset.json; 'auto' (default) "
    "takes the training shards a Lightning checkpoint records; 'uniform' draws all classes equally"
)


def build_parser() -> argparse.ArgumentParser:
    """The `epg sample` argument parser."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="EPG network file, FinetuneModule checkpoint, or official file (with --preset)")
    p.add_argument("--out", required=True, help="folder for 000000.png …; the npz goes next to it as <out>.npz")
    p.add_argument("--num", type=int, required=True, help="number of images (50000 for FID-50K)")
    p.add_argument("--ema", default="0", help="EMA copy index of a Lightning checkpoint, or 'none' for online weights")
    p.add_argument("--preset", help="architecture of an official checkpoint, e.g. EPG-XL/16")
    p.add_argument("--parameterization", choices=("x0", "edm"), help="override the checkpoint's output form")
    p.add_argument(
        "--sampler",
        choices=sorted(SAMPLERS),
        help="default: what the checkpoint's objective needs (heun for a diffusion, consistency for a consistency "
        "model)",
    )
    p.add_argument("--steps", type=int, help="grid levels (default: heun 32, euler 50, stochastic 32, consistency 1)")
    p.add_argument("--append-zero", action="store_true", help="EDM form: append σ = 0, final Euler step (75 NFE)")
    p.add_argument("--s-churn", type=float, help="stochastic sampler: S_churn (default 40)")
    p.add_argument("--s-min", type=float, help="stochastic sampler: S_min of the churn window (default 0.05)")
    p.add_argument("--s-max", type=float, help="stochastic sampler: S_max of the churn window (default 50)")
    p.add_argument("--s-noise", type=float, help="stochastic sampler: S_noise (default 1.003)")
    p.add_argument(
        "--stochastic-variant",
        choices=STOCHASTIC_VARIANTS,
        help="stochastic sampler: official (default; window compared with the shifted σ', last step Euler, §6.1) or "
        "edm (window shifted too, every step corrected)",
    )
    p.add_argument("--sigma-mid", help="consistency sampler: comma-separated σ_mid values, unshifted (2 steps: 0.821)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale w (1 = none; 2.5 for EPG-XL/16 at 256)")
    p.add_argument("--autoguidance", type=float, help="autoguidance scale w in D_c + w·(D_c − D_poor); needs --poor")
    p.add_argument("--poor", help="the weaker checkpoint for --autoguidance")
    interval_help = (
        "guidance σ interval lo,hi (unshifted; applied as (lo·s_H, hi·s_H]) or 'none' for every level (default: "
        f"{format_interval(GUIDANCE_INTERVAL)} for --cfg, every level for --autoguidance as in the official code)"
    )
    p.add_argument("--interval", help=interval_help)
    p.add_argument("--no-clamp", action="store_true", help="do not clamp x̂0 to [−1, 1] (method.md §6.1)")
    p.add_argument(
        "--labels",
        default="balanced",
        choices=LABEL_MODES,
        help="class-balanced, or random from the training class frequencies (§6.4)",
    )
    p.add_argument("--label-counts", default="auto", help=LABEL_COUNTS_HELP)
    p.add_argument("--num-classes", type=int, help="classes to draw labels from (default: the network's)")
    p.add_argument("--batch", type=int, default=100, help="images per device batch (100 as in the paper)")
    p.add_argument("--seed", type=int, default=0, help="image i depends only on (seed, i)")
    p.add_argument("--autocast", default="none", choices=sorted(AUTOCAST), help="fp32 sampling unless set (§8)")
    p.add_argument("--devices", type=int, default=1, help="devices for DDP sampling (Lightning Fabric)")
    p.add_argument("--accelerator", default="auto", help="auto, cpu, cuda, …")
    p.add_argument("--no-npz", action="store_true", help="write only the PNGs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"{PROG}: {what} must be comma-separated numbers, got {text!r}") from None


def sample_run(args: argparse.Namespace) -> SampleRun:
    """The :class:`SampleRun` of parsed `epg sample` arguments; SystemExit with a one-line message on bad ones."""
    if args.devices < 1:
        raise SystemExit(f"{PROG}: --devices must be ≥ 1")
    try:
        if args.interval is None:  # CFG: the paper's band (§6.2); autoguidance: every level, as official autog_forward
            args.interval = format_interval(GUIDANCE_INTERVAL if args.autoguidance is None else None)
        interval = parse_interval(args.interval, "--interval")
        options = SamplingOptions(args.sampler, args.steps, args.cfg, interval, args.labels, args.seed)
        return SampleRun(
            checkpoint=args.checkpoint,
            out=Path(args.out),
            num=args.num,
            options=options,
            ema=parse_ema(args.ema),
            batch=args.batch,
            autocast=args.autocast,
            preset=args.preset,
            parameterization=args.parameterization,
            autoguidance=args.autoguidance,
            poor=args.poor,
            clamp=not args.no_clamp,
            label_counts=args.label_counts,
            num_classes=args.num_classes,
            append_zero=args.append_zero,
            s_churn=args.s_churn,
            s_min=args.s_min,
            s_max=args.s_max,
            s_noise=args.s_noise,
            stochastic_variant=args.stochastic_variant,
            sigma_mid=_floats(args.sigma_mid, "--sigma-mid") if args.sigma_mid else None,
            npz=not args.no_npz,
            prog=PROG,
        )
    except (SampleRunError, SamplingOptionsError) as err:
        raise SystemExit(f"{PROG}: {err}") from None


def _launch(args: argparse.Namespace):
    """(fabric or None, rank, world size, device): Fabric DDP for several devices or under torchrun."""
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ
    if args.devices == 1 and not torchrun:
        return None, 0, 1, pick_device("cuda" if args.accelerator == "gpu" else args.accelerator)
    from lightning import Fabric

    devices = int(os.environ.get("LOCAL_WORLD_SIZE", args.devices)) if torchrun else args.devices
    num_nodes = int(os.environ["WORLD_SIZE"]) // devices if torchrun else 1
    fabric = Fabric(accelerator=args.accelerator, devices=devices, num_nodes=num_nodes, strategy="ddp")
    fabric.launch()
    return fabric, fabric.global_rank, fabric.world_size, fabric.device


def main(argv: list[str] | None = None) -> int:
    """Run `epg sample`."""
    args = build_parser().parse_args(argv)
    run = sample_run(args)
    fabric, rank, world, device = _launch(args)
    barrier = None if fabric is None else fabric.barrier
    try:
        run.execute(device, rank, world, barrier=barrier, progress=not args.no_progress)
    except SampleRunError as err:
        raise SystemExit(f"{PROG}: {err}") from None
    return 0

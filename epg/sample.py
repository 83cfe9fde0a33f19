"""`epg sample`: N images from a checkpoint as PNGs plus an ADM-style ``<folder>.npz`` (method.md §6, §8).

Image i's noise and label depend only on (seed, i), so a rerun fills in exactly the missing files and any number of
devices produces the same set. Several devices: ``--devices N`` (Lightning Fabric DDP, which relaunches the command
line, so use it from a shell, not from a notebook) or launch under torchrun.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from epg.checkpoint import default_sampler, load_denoiser, read_global_step, read_hyper_parameters
from epg.data.shards import read_class_counts
from epg.io import pick_device, write_json
from epg.sampling import SAMPLERS, Guidance, SampleSettings, default_steps, generate_batches
from epg.sampling.files import png_name, write_adm_npz, write_png
from epg.sampling.generate import image_labels
from epg.sampling.grid import GUIDANCE_INTERVAL
from epg.sampling.options import (
    AUTOCAST,
    SamplingOptions,
    SamplingOptionsError,
    format_interval,
    parse_ema,
    parse_interval,
    settings_diff,
)
from epg.sampling.per_image import LABEL_MODES
from epg.sampling.stochastic import STOCHASTIC_VARIANTS

CONFIG_NAME = "sample_config.json"
LABEL_COUNTS_HELP = (
    "class frequencies of --labels random: training shards (folder or pattern) or their dataset.json; 'auto' (default) "
    "takes the training shards a Lightning checkpoint records; 'uniform' draws all classes equally"
)
STOCHASTIC_ARGS = ("s_churn", "s_min", "s_max", "s_noise", "stochastic_variant")


def build_parser() -> argparse.ArgumentParser:
    """The `epg sample` argument parser."""
    p = argparse.ArgumentParser(prog="epg sample", description=__doc__.splitlines()[0])
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


def _parse_floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"epg sample: {what} must be comma-separated numbers, got {text!r}") from None


def _check_args(args: argparse.Namespace) -> None:
    if args.num < 1 or args.batch < 1 or args.seed < 0 or args.devices < 1:
        raise SystemExit("epg sample: --num, --batch and --devices must be ≥ 1 and --seed ≥ 0")
    if args.cfg is not None and args.autoguidance is not None:
        raise SystemExit("epg sample: choose one of --cfg and --autoguidance")
    if (args.autoguidance is None) != (args.poor is None):
        raise SystemExit("epg sample: --autoguidance W and --poor CKPT go together")
    stochastic = [f for f in STOCHASTIC_ARGS if getattr(args, f) is not None]
    if stochastic and args.sampler != "stochastic":
        raise SystemExit(f"epg sample: --{stochastic[0].replace('_', '-')} is an option of --sampler stochastic")
    if args.sigma_mid and args.sampler != "consistency":
        raise SystemExit("epg sample: --sigma-mid is an option of --sampler consistency")
    if args.append_zero and args.sampler == "consistency":
        raise SystemExit("epg sample: --append-zero does not apply to --sampler consistency")


def _sampler_options(args: argparse.Namespace) -> dict:
    options = {f: getattr(args, f) for f in STOCHASTIC_ARGS if getattr(args, f) is not None}
    if "stochastic_variant" in options:
        options["variant"] = options.pop("stochastic_variant")
    if args.append_zero:
        options["append_zero"] = True
    if args.sigma_mid:
        options["sigma_mid"] = _parse_floats(args.sigma_mid, "--sigma-mid")
    return options


def label_counts(source: str, checkpoint: str | os.PathLike) -> tuple[list[int] | None, str]:
    """Training-set class counts for random labels (method.md §6.4) and a line saying where they come from.

    ``source`` names training shards or their dataset.json, "uniform" (None: equal frequencies), or "auto": the
    ``data.train_shards`` that a Lightning checkpoint records, read relative to the working directory. Where "auto"
    finds no counts (an official or converted checkpoint, shards elsewhere) the frequencies are uniform, with a note.
    """
    if source == "uniform":
        return None, "random labels drawn uniformly over the classes (--label-counts uniform)"
    spec = read_hyper_parameters(checkpoint)[1].get("train_shards") if source == "auto" else source
    counts = None
    if spec:
        try:
            counts = read_class_counts(str(spec))
        except (FileNotFoundError, ValueError):
            counts = None
    if counts is not None:
        return counts, f"random labels from the class frequencies of {spec} ({min(counts)}-{max(counts)} per class)"
    if source != "auto":
        raise SystemExit(
            f"--label-counts {source}: no dataset.json with class counts there; point it at training "
            "shards made by `epg prepare` (or their dataset.json), or pass 'uniform'"
        )
    found = f"its training shards {spec} have no dataset.json here" if spec else "it records no training shards"
    return None, (
        f"note: random labels are uniform over the classes: {found}; pass --label-counts TRAIN_SHARDS for the "
        "training set's class frequencies (method.md §6.4)"
    )


def counts_digest(counts: list[int] | None) -> str:
    """A short fingerprint of the label counts for a folder's settings ("uniform" for None)."""
    return "uniform" if counts is None else hashlib.sha256(json.dumps(counts).encode()).hexdigest()[:16]


def _interval(args: argparse.Namespace) -> tuple[float, float] | None:
    try:
        return parse_interval(args.interval, "--interval")
    except SamplingOptionsError as err:
        raise SystemExit(f"epg sample: {err}") from None


def _options(args: argparse.Namespace) -> SamplingOptions:
    """The sampling options of parsed arguments (CFG; autoguidance is added by :func:`_guidance`)."""
    return SamplingOptions(args.sampler, args.steps, args.cfg, _interval(args), args.labels, args.seed)


def _guidance(args: argparse.Namespace, device: torch.device) -> Guidance | None:
    if args.autoguidance is not None:
        poor = load_denoiser(args.poor, ema=_ema(args.ema), preset=args.preset).denoiser.to(device)
        return Guidance(args.autoguidance, _interval(args), kind="autoguidance", poor=poor)
    return _options(args).guidance


def _ema(text: str) -> int | None:
    try:
        return parse_ema(text)
    except SamplingOptionsError as err:
        raise SystemExit(f"epg sample: {err}") from None


def _identity(args: argparse.Namespace, num_classes: int | None, counts: list[int] | None) -> dict:
    """What determines the images; a rerun into the same folder must match it."""
    keys = "ema preset parameterization sampler steps cfg autoguidance poor interval no_clamp labels seed autocast"
    keys += " append_zero s_churn s_min s_max s_noise sigma_mid"
    identity = {k: getattr(args, k) for k in keys.split()}
    if args.sampler == "stochastic":  # the default variant changed from edm to official: older folders differ
        identity["stochastic_variant"] = args.stochastic_variant or "official"
    identity.update(checkpoint=os.path.abspath(args.checkpoint), num_classes=num_classes)
    # A checkpoint path such as last.ckpt is rewritten while training goes on: its step tells the weights apart.
    identity["checkpoint_step"] = read_global_step(args.checkpoint)
    if identity["poor"]:
        identity["poor"] = os.path.abspath(identity["poor"])
    if args.labels == "balanced":
        identity["num"] = args.num  # balanced labels depend on N
    else:
        identity["label_counts"] = counts_digest(counts)
    return identity


def _check_folder(out: Path, identity: dict, rank: int, prog: str = "epg sample") -> None:
    path = out / CONFIG_NAME
    if path.exists():
        stored = json.loads(path.read_text())
        diff = settings_diff(stored, identity)
        if diff:
            raise SystemExit(
                f"{prog}: {out} holds samples made with different settings ({', '.join(diff)}); "
                f"use a fresh --out folder, or delete {path} if the change does not alter the images"
            )
    elif rank == 0:
        write_json(path, identity)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed and checked `epg sample` arguments, ``steps`` filled in with the sampler's default."""
    args = build_parser().parse_args(argv)
    args.sampler = args.sampler or default_sampler(args.checkpoint, args.parameterization)
    if args.interval is None:  # CFG: the paper's band (§6.2); autoguidance: every level, as official autog_forward
        args.interval = format_interval(GUIDANCE_INTERVAL if args.autoguidance is None else None)
    _check_args(args)
    args.steps = args.steps or default_steps(args.sampler)
    return args


@dataclass
class SampleRun:
    """A folder of ``num`` samples being filled (PNGs, then ``<out>.npz``) and the settings that decide them.

    Shared by `epg sample` (Fabric) and `epg predict` (:class:`epg.lightning.predict.SampleWriter`): both check the
    folder against the same settings record, so either command resumes a folder that the other started.
    """

    out: Path
    num: int
    settings: SampleSettings
    npz: bool = True
    prog: str = "epg sample"  # the command named in messages

    @classmethod
    def prepare(
        cls, args: argparse.Namespace, denoiser: torch.nn.Module, rank: int = 0, prog: str = "epg sample"
    ) -> SampleRun:
        """Settings of parsed `epg sample` ``args`` for ``denoiser``; the folder is created or checked against them.

        Raises SystemExit with a one-line message, starting with ``prog``, on arguments that do not fit the network
        or the folder.
        """
        num_classes = args.num_classes or denoiser.null_label  # None: an unconditional network, no labels
        if args.num_classes and (denoiser.null_label is None or args.num_classes > denoiser.null_label):
            raise SystemExit(f"{prog}: --num-classes {args.num_classes} but the network has {denoiser.null_label}")
        counts = None
        if num_classes is not None and args.labels == "random":
            counts, where = label_counts(args.label_counts, args.checkpoint)
            if counts is not None and len(counts) != num_classes:
                raise SystemExit(
                    f"{prog}: {where}, but labels are drawn from {num_classes} classes; pass training shards of "
                    f"the same classes to --label-counts, or 'uniform'"
                )
            if rank == 0:
                print(f"{prog}: {where}", file=sys.stderr)
        out = Path(args.out)
        _check_folder(out, _identity(args, num_classes, counts), rank, prog)
        out.mkdir(parents=True, exist_ok=True)
        settings = _options(args).settings(
            guidance=_guidance(args, next(denoiser.parameters()).device),
            clamp=None if args.no_clamp else 1.0,
            autocast=AUTOCAST[args.autocast],
            num_classes=num_classes,
            class_counts=counts,
            options=_sampler_options(args),
        )
        return cls(out, args.num, settings, npz=not args.no_npz, prog=prog)

    def missing(self) -> list[int]:
        """Indices of the images not written yet."""
        existing = set(os.listdir(self.out))
        return [i for i in range(self.num) if png_name(i, self.num) not in existing]

    def write(self, indices: list[int], images: torch.Tensor) -> None:
        """Save uint8 images (B, H, W, 3) of image ``indices`` as PNGs (each atomically)."""
        for i, image in zip(indices, images.numpy(), strict=True):
            write_png(self.out / png_name(i, self.num), image)

    def finish(self, denoiser: torch.nn.Module) -> None:
        """Write ``<out>.npz`` (images + labels) once every PNG exists, unless it is newer than all of them."""
        if not self.npz:
            return
        npz = self.out.with_name(self.out.name + ".npz")
        names = [png_name(i, self.num) for i in range(self.num)]
        absent = [n for n in names if not (self.out / n).exists()]
        if absent:
            raise SystemExit(
                f"{self.prog}: {len(absent)} images are missing (e.g. {absent[0]}): rerun the same command"
            )
        newest = max((self.out / n).stat().st_mtime for n in names)
        if npz.exists() and npz.stat().st_mtime >= newest:
            print(f"{self.prog}: {npz} is up to date")
            return
        write_adm_npz(self.out, self.num, npz, image_labels(denoiser, range(self.num), self.num, self.settings))
        print(f"{self.prog}: wrote {self.num} images to {self.out}/ and {npz}")


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
    args = parse_args(argv)
    fabric, rank, world, device = _launch(args)
    model = load_denoiser(
        args.checkpoint, ema=_ema(args.ema), preset=args.preset, parameterization=args.parameterization
    )
    denoiser = model.denoiser.to(device)
    run = SampleRun.prepare(args, denoiser, rank)
    missing = run.missing()
    mine = [i for i in missing if i % world == rank]  # fixed by index: ranks may list the folder at different times
    bar = _progress(len(missing), disabled=rank != 0 or args.no_progress)
    for batch, images in generate_batches(denoiser, mine, args.num, run.settings, model.normalization, args.batch):
        run.write(batch, images)
        bar.update(min(len(batch) * world, bar.total - bar.n))
    bar.close()
    if fabric is not None:
        fabric.barrier()
    if rank == 0:
        run.finish(denoiser)
    return 0


def _progress(total: int, disabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="epg sample", unit="img", disable=disabled, file=sys.stderr)

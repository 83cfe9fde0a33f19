"""`epg fid sweep`: FID per (CFG scale, EMA copy) on few samples, the best setting, its full run (METHOD.md §6, §8).

Each setting samples ``--num`` images in memory (image i's noise and label depend only on (seed, i), as in
`epg sample`), scores them against the reference and appends a row to ``OUT/sweep.json``; rerunning the same command
skips the rows already there, so added scales or EMA copies cost only their own samples. The setting with the lowest
FID is then optionally sampled ``--final-num`` times through `epg sample` (PNGs + ADM-style .npz, resumable) and
scored with every metric the reference allows. ``--labels both`` reports class-balanced against random labels for
that setting (METHOD.md §6.4: the 1.58 vs 1.70 question).

FID of few samples is biased upwards (by roughly a constant for a fixed N), so use the sweep to rank settings, and
quote only the final run. This module also holds the in-memory sampling shared with the in-loop FID callback
(:mod:`epg.eval.callback`) and `epg demo`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from epg.checkpoint import default_sampler, load_denoiser, read_hyper_parameters
from epg.eval.metrics import (
    EvalInputError,
    Features,
    InceptionFeatures,
    compute_metrics,
    extract_features,
    frechet_to_stats,
)
from epg.eval.reference import ReferenceStats, open_reference
from epg.sample import LABEL_COUNTS_HELP, counts_digest, label_counts
from epg.sampling import SAMPLERS, Guidance, SampleSettings, default_steps, generate_batches
from epg.sampling.grid import GUIDANCE_INTERVAL
from epg.sampling.per_image import LABEL_MODES

POOL_DIM = 2048
RESULTS_NAME = "sweep.json"
PLOT_NAME = "sweep.png"
MODE_NAMES = {"balanced": "class-balanced", "random": "random"}

# --- per-image sampling in memory, split over ranks --------------------------------------------------------------


def rank_indices(num: int, rank: int = 0, world: int = 1) -> list[int]:
    """Image indices of one rank: i ≡ rank (mod world), so the union over ranks is 0…num−1 for any world size."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0…{world - 1}")
    return list(range(rank, num, world))


def sample_images(
    denoiser: torch.nn.Module,
    indices: Sequence[int],
    num: int,
    *,
    normalization: str = "imagenet",
    sampler: str = "heun",
    steps: int | None = None,
    guidance: float | Guidance | None = None,
    labels: str = "balanced",
    seed: int = 0,
    batch_size: int = 100,
    class_counts: Sequence[int] | None = None,
) -> torch.Tensor:
    """uint8 images (N, H, W, 3) on the CPU for ``indices`` out of ``num``, each fixed by (seed, index) (METHOD.md §6).

    ``denoiser`` is a :class:`~epg.method.denoiser.Denoiser` in eval mode on its device; labels are class-balanced
    or random over the network's classes (§6.4; none for an unconditional network), random ones with the training
    frequencies ``class_counts`` (uniform when None). Sampling runs in fp32 (§8).
    """
    size = denoiser.image_size
    num_classes = denoiser.null_label
    if labels == "random" and class_counts is not None and len(class_counts) != num_classes:
        raise EvalInputError(
            f"the label counts name {len(class_counts)} classes but the network has {num_classes}: give the counts "
            "of its training classes, or none (uniform labels)"
        )
    settings = SampleSettings(
        sampler=sampler, steps=steps, guidance=guidance, labels=labels, seed=seed, class_counts=class_counts
    )
    chunks = [torch.empty((0, size, size, 3), dtype=torch.uint8)]
    chunks += [images for _, images in generate_batches(denoiser, indices, num, settings, normalization, batch_size)]
    return torch.cat(chunks)


def pool_features(images: torch.Tensor | np.ndarray, inception: InceptionFeatures, batch_size: int = 100) -> np.ndarray:
    """Inception pool_3 features (N, 2048) of uint8 images (N, H, W, 3)."""
    parts = [np.zeros((0, POOL_DIM), np.float32)]
    for start in range(0, len(images), batch_size):
        parts.append(inception(images[start : start + batch_size])["pool"])
    return np.concatenate(parts)


# --- scoring -------------------------------------------------------------------------------------------------------


def fid_to_reference(pool: np.ndarray, reference: ReferenceStats) -> float:
    """FID of pool_3 features (N, 2048) against the reference's mu/sigma."""
    return frechet_to_stats(pool, reference.mu, reference.sigma)


def score(features: Features, reference: ReferenceStats, device: str = "cpu") -> dict[str, float]:
    """Every metric the reference and the weights allow: FID, sFID, IS, KID, precision/recall (METHOD.md §8)."""
    metrics = ["fid", *(["sfid"] if reference.mu_s is not None else [])]
    metrics += ["isc"] if features.logits is not None else []
    metrics += ["kid", "prc"] if reference.pool is not None else []
    return compute_metrics(features, reference, metrics, device=device)


# --- the sweep -----------------------------------------------------------------------------------------------------


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
    p.add_argument("--interval", default=",".join(map(str, GUIDANCE_INTERVAL)), help=interval_help)
    p.add_argument(
        "--labels", default="balanced", choices=(*LABEL_MODES, "both"), help="label mode; both: compare them (§6.4)"
    )
    p.add_argument("--label-counts", default="auto", help=LABEL_COUNTS_HELP)
    p.add_argument("--preset", help="architecture of an official checkpoint, e.g. EPG-XL/16")
    p.add_argument("--seed", type=int, default=0, help="image i depends only on (seed, i)")
    p.add_argument("--batch-size", type=int, default=100, help="images per sampling and Inception batch")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EvalInputError(f"{what} takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise EvalInputError(f"{what} is empty")
    return values


def _interval(text: str) -> tuple[float, float] | None:
    if text.lower() == "none":
        return None
    interval = _floats(text, "--interval")
    if len(interval) != 2:
        raise EvalInputError(f"--interval takes lo,hi or 'none', got {text!r}")
    return interval[0], interval[1]


def ema_choices(text: str, checkpoint: str | os.PathLike) -> list[int | None]:
    """EMA indices named by --ema (None = online weights); `all` reads the checkpoint's EMA rates."""
    if text.strip().lower() == "all":
        rates = read_hyper_parameters(checkpoint)[0].get("ema_rates")  # not gigabytes of weights
        return list(range(len(rates))) if rates else [None]  # no EMA copies: the stored/online weights
    choices: list[int | None] = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        if part != "none" and not part.isdigit():
            raise EvalInputError(f"--ema takes all, or EMA indices (0, 1, …) and 'none', got {text!r}")
        choices.append(None if part == "none" else int(part))
    if not choices:
        raise EvalInputError("--ema is empty")
    return choices


def _ema_arg(ema: int | None) -> str:
    return "none" if ema is None else str(ema)


def _identity(args: argparse.Namespace, sweep_labels: str, counts: list[int] | None) -> dict:
    """What the sweep's rows depend on besides (scale, EMA); a rerun into the same folder must match it."""
    keys = ("ref", "num", "sampler", "steps", "interval", "preset", "seed")
    identity = {k: getattr(args, k) for k in keys}
    identity.update(checkpoint=os.path.abspath(args.checkpoint), ref=os.path.abspath(args.ref), labels=sweep_labels)
    if args.labels != "balanced":
        identity["label_counts"] = counts_digest(counts)
    return identity


def _load_results(path: Path, identity: dict) -> dict:
    if not path.exists():
        return {"settings": identity, "rows": []}
    results = json.loads(path.read_text())
    stored = results.get("settings", {})
    diff = sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))
    if diff:
        raise EvalInputError(
            f"{path} holds a sweep with different settings ({', '.join(diff)}); use a fresh --out folder, "
            "or delete that file to start over"
        )
    return results


def _save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)


def best_row(rows: list[dict]) -> dict:
    """The row with the lowest FID (the first of equals in sweep order)."""
    finite = [r for r in rows if math.isfinite(r["fid"])]
    if not finite:
        raise EvalInputError("no setting gave a finite FID")
    return min(finite, key=lambda r: r["fid"])


def format_sweep(rows: list[dict]) -> str:
    """FID table: one line per CFG scale, one column per EMA copy."""
    weights = list(dict.fromkeys(r["weights"] for r in rows))
    scales = sorted({r["scale"] for r in rows})
    fid = {(r["scale"], r["weights"]): r["fid"] for r in rows}
    width = max(10, *(len(w) for w in weights))
    lines = [f"{'cfg':>6}  " + "  ".join(f"{w:>{width}}" for w in weights)]
    for scale in scales:
        cells = [fid.get((scale, w)) for w in weights]
        lines.append(f"{scale:>6.2f}  " + "  ".join(f"{'-' if c is None else f'{c:.3f}':>{width}}" for c in cells))
    return "\n".join(lines)


def plot_sweep(rows: list[dict], path: str | os.PathLike, title: str = "") -> bool:
    """FID against CFG scale, one line per EMA copy, best point marked, as a PNG; False without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("epg fid sweep: matplotlib is not installed, so no plot (pip install matplotlib)", file=sys.stderr)
        return False
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.add_subplot()
    for weights in dict.fromkeys(r["weights"] for r in rows):
        line = sorted((r["scale"], r["fid"]) for r in rows if r["weights"] == weights)
        ax.plot([s for s, _ in line], [f for _, f in line], marker="o", label=weights)
    best = best_row(rows)
    ax.scatter([best["scale"]], [best["fid"]], s=160, facecolors="none", edgecolors="black", zorder=3, label="best")
    ax.set_xlabel("CFG scale w")
    ax.set_ylabel(f"FID ({rows[0]['num']} samples)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True


def _tag(row: dict) -> str:
    return f"ema-{_ema_arg(row['ema'])}_cfg{row['scale']:g}"


def _final_run(args: argparse.Namespace, row: dict, mode: str, inception: InceptionFeatures, reference) -> dict:
    """Sample the chosen setting with `epg sample` (resumable PNGs + .npz), then score every metric."""
    from epg import sample as sample_tool

    folder = Path(args.out) / "final" / f"{_tag(row)}_{mode}_n{args.final_num}"
    argv = [args.checkpoint, "--out", str(folder), "--num", str(args.final_num), "--ema", _ema_arg(row["ema"])]
    argv += ["--sampler", args.sampler, "--steps", str(args.steps), "--cfg", str(row["scale"])]
    argv += ["--interval", args.interval, "--labels", mode, "--seed", str(args.seed), "--batch", str(args.batch_size)]
    argv += ["--label-counts", args.label_counts]
    argv += ["--accelerator", str(inception.device.type)] + (["--preset", args.preset] if args.preset else [])
    print(f"epg fid sweep: final run: epg sample {' '.join(argv)}")
    if sample_tool.main(argv):
        raise EvalInputError(f"`epg sample {' '.join(argv)}` failed")
    npz = folder.with_name(folder.name + ".npz")
    features = extract_features(npz, inception, args.batch_size, resolution=reference.resolution, progress=True)
    return {"samples": str(npz), "metrics": score(features, reference, device=str(inception.device))}


def _in_memory_fid(args, model, ema, scale, interval, mode, inception, reference, counts) -> dict:
    """One sweep row: ``args.num`` samples of one (EMA copy, scale, label mode) scored against the reference."""
    start = time.time()
    images = sample_images(
        model.denoiser,
        range(args.num),
        args.num,
        normalization=model.normalization,
        sampler=args.sampler,
        steps=args.steps,
        guidance=Guidance(scale, interval),
        labels=mode,
        seed=args.seed,
        batch_size=args.batch_size,
        class_counts=counts,
    )
    fid = fid_to_reference(pool_features(images, inception, args.batch_size), reference)
    seconds = round(time.time() - start, 2)
    return {
        "ema": ema,
        "weights": model.weights,
        "scale": scale,
        "labels": mode,
        "num": args.num,
        "fid": fid,
        "seconds": seconds,
    }


def run(args: argparse.Namespace) -> int:
    """Run `epg fid sweep` on parsed arguments; returns the exit status."""
    if args.num < 2 or (args.final_num is not None and args.final_num < 2) or args.batch_size < 1 or args.seed < 0:
        raise EvalInputError("--num and --final-num must be ≥ 2, --batch-size ≥ 1 and --seed ≥ 0")
    scales = _floats(args.scales, "--scales")
    interval = _interval(args.interval)
    emas = ema_choices(args.ema, args.checkpoint)
    args.sampler = args.sampler or default_sampler(args.checkpoint)
    args.steps = args.steps or default_steps(args.sampler)
    sweep_labels = "balanced" if args.labels == "both" else args.labels
    counts = None
    if args.labels != "balanced":
        counts, where = label_counts(args.label_counts, args.checkpoint)
        print(f"epg fid sweep: {where}")
    out = Path(args.out)
    path = out / RESULTS_NAME
    results = _load_results(path, _identity(args, sweep_labels, counts))

    inception = InceptionFeatures(device=args.device)
    reference = open_reference(args.ref, inception, batch_size=args.batch_size, progress=True)
    done = {(r["ema"], r["scale"]): r for r in results["rows"]}
    rows: list[dict] = []
    for ema in emas:
        todo = [s for s in scales if (ema, s) not in done]
        model = load_denoiser(args.checkpoint, ema=ema, preset=args.preset) if todo else None
        if model is not None:
            model.denoiser.to(inception.device)
            size = (model.denoiser.image_size,) * 2
            if reference.resolution is not None and tuple(reference.resolution) != size:
                raise EvalInputError(
                    f"the reference is at {reference.resolution[0]}x{reference.resolution[1]} but the network makes "
                    f"{size[0]}x{size[1]} images; make a reference at the sample resolution (`epg fid ref`)"
                )
        for scale in scales:
            row = done.get((ema, scale))
            if row is None:
                row = _in_memory_fid(args, model, ema, scale, interval, sweep_labels, inception, reference, counts)
                results["rows"].append(row)
                _save(path, results)
                print(f"{row['weights']:>12}  cfg {scale:<5g}  FID {row['fid']:.3f}  ({row['seconds']} s)")
            rows.append(row)
        del model

    best = best_row(rows)
    results["best"] = best
    print(f"\nFID of {args.num} samples ({args.sampler}, {args.steps} steps, {sweep_labels} labels) vs {args.ref}")
    print(format_sweep(rows))
    print(f"best: cfg {best['scale']:g} with {best['weights']} (FID {best['fid']:.3f})")
    title = f"{Path(args.checkpoint).name}: {args.sampler} {args.steps} steps, {sweep_labels} labels"
    if plot_sweep(rows, out / PLOT_NAME, title):
        print(f"wrote {out / PLOT_NAME}")

    modes = list(LABEL_MODES) if args.labels == "both" else [args.labels]
    if args.final_num is not None:
        final = {mode: _final_run(args, best, mode, inception, reference) for mode in modes}
        results["final"] = {"num": args.final_num, "setting": _tag(best), **final}
        _report({mode: final[mode]["metrics"] for mode in modes}, f"{args.final_num} samples, {_tag(best)}")
    elif args.labels == "both":  # compare label modes at --num: the balanced row is the sweep's
        model = load_denoiser(args.checkpoint, ema=best["ema"], preset=args.preset)
        model.denoiser.to(inception.device)
        random = _in_memory_fid(
            args, model, best["ema"], best["scale"], interval, "random", inception, reference, counts
        )
        results["labels"] = {"balanced": best, "random": random}
        _report({mode: {"fid": results["labels"][mode]["fid"]} for mode in modes}, f"{args.num} samples, {_tag(best)}")
    _save(path, results)
    print(f"wrote {path}")
    return 0


def _report(metrics: dict[str, dict], what: str) -> None:
    from epg.eval.metrics import format_comparison, format_results

    print(f"\n{what}:")
    if len(metrics) == 1:
        print(format_results(next(iter(metrics.values()))))
    else:
        print(format_comparison({MODE_NAMES[mode]: values for mode, values in metrics.items()}))

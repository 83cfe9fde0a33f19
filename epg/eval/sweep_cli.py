"""`epg fid sweep`: FID per (CFG scale, EMA copy) on few samples, the best setting, its full run (method.md §6, §8).

Each setting samples ``--num`` images in memory (image i's noise and label depend only on (seed, i), as in
`epg sample`), scores them against the reference and appends a row to ``OUT/sweep.json``; rerunning the same command
skips the rows already there, so added scales or EMA copies cost only their own samples. The setting with the lowest
FID is then optionally sampled ``--final-num`` times through `epg sample` (PNGs + ADM-style .npz, resumable) and
scored with every metric the reference allows. ``--labels both`` reports class-balanced against random labels for
that setting (method.md §6.4: the 1.58 vs 1.70 question).

FID of few samples is biased upwards (by roughly a constant for a fixed N), so use the sweep to rank settings, and
quote only the final run. The library (sampling, rows, results, plot) is :mod:`epg.eval.sweep`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from epg.checkpoint import default_sampler, load_denoiser
from epg.eval import sweep
from epg.eval.errors import EvalInputError
from epg.eval.inception import InceptionFeatures, extract_features
from epg.eval.metrics import score
from epg.eval.reference import open_reference
from epg.eval.tables import format_comparison, format_results, format_sweep
from epg.sample import LABEL_COUNTS_HELP, counts_digest, label_counts
from epg.sampling import SAMPLERS, default_steps
from epg.sampling.grid import GUIDANCE_INTERVAL
from epg.sampling.options import SamplingOptions, SamplingOptionsError, format_interval
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


def _identity(args: argparse.Namespace, sweep_labels: str, counts: list[int] | None) -> dict:
    """What the sweep's rows depend on besides (scale, EMA); a rerun into the same folder must match it."""
    keys = ("ref", "num", "sampler", "steps", "interval", "preset", "seed")
    identity = {k: getattr(args, k) for k in keys}
    identity.update(checkpoint=os.path.abspath(args.checkpoint), ref=os.path.abspath(args.ref), labels=sweep_labels)
    if args.labels != "balanced":
        identity["label_counts"] = counts_digest(counts)
    return identity


def _options(args: argparse.Namespace, scale: float, labels: str) -> SamplingOptions:
    """The sampling options of one setting of the sweep."""
    try:
        return SamplingOptions(args.sampler, args.steps, scale, args.interval, labels, args.seed)
    except SamplingOptionsError as err:
        raise EvalInputError(f"--interval: {err}") from None


def _final_run(args: argparse.Namespace, row: dict, mode: str, inception: InceptionFeatures, reference) -> dict:
    """Sample the chosen setting with `epg sample` (resumable PNGs + .npz), then score every metric."""
    from epg import sample as sample_tool

    folder = Path(args.out) / "final" / f"{sweep.row_tag(row)}_{mode}_n{args.final_num}"
    argv = [
        row.get("checkpoint") or args.checkpoint,
        "--out",
        str(folder),
        "--num",
        str(args.final_num),
        "--ema",
        sweep.ema_arg(row["ema"]),
    ]
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


def run(args: argparse.Namespace) -> int:
    """Run `epg fid sweep` on parsed arguments; returns the exit status."""
    if args.num < 2 or (args.final_num is not None and args.final_num < 2) or args.batch_size < 1 or args.seed < 0:
        raise EvalInputError("--num and --final-num must be ≥ 2, --batch-size ≥ 1 and --seed ≥ 0")
    scales = _floats(args.scales, "--scales")
    _options(args, 1.0, "balanced")  # a malformed --interval fails before any sampling
    emas = sweep.ema_choices(args.ema, args.checkpoint)
    args.sampler = args.sampler or default_sampler(args.checkpoint)
    args.steps = args.steps or default_steps(args.sampler)
    sweep_labels = "balanced" if args.labels == "both" else args.labels
    counts = None
    if args.labels != "balanced":
        counts, where = label_counts(args.label_counts, args.checkpoint)
        print(f"epg fid sweep: {where}")
    out = Path(args.out)
    path = out / sweep.RESULTS_NAME
    results = sweep.load_results(path, _identity(args, sweep_labels, counts))

    def row_of(model, ema, scale: float, mode: str) -> dict:
        settings = _options(args, scale, mode).settings(class_counts=counts)
        return sweep.in_memory_fid(model, ema, scale, settings, args.num, inception, reference, args.batch_size)

    inception = InceptionFeatures(device=args.device)
    reference = open_reference(args.ref, inception, batch_size=args.batch_size, progress=True)
    done = {(r["ema"], r.get("sigma_rel"), r["scale"]): r for r in results["rows"]}
    rows: list[dict] = []
    sources = [(ema, None) for ema in emas]
    if args.sigma_rel:  # one reconstructed checkpoint per σ_rel, its EMA slot 0 (epg.posthoc)
        sigma_rels = _floats(args.sigma_rel, "--sigma-rel")
        sources = [(0, s) for s in sigma_rels]
        todo = [s for s in sigma_rels if any((0, s, scale) not in done for scale in scales)]
        paths = phema_checkpoints(args.checkpoint, todo, out, args.phema_run)
    for ema, sigma_rel in sources:
        todo = [s for s in scales if (ema, sigma_rel, s) not in done]
        checkpoint = args.checkpoint if sigma_rel is None else paths.get(sigma_rel)
        model = load_denoiser(checkpoint, ema=ema, preset=args.preset) if todo else None
        if model is not None:
            model.denoiser.to(inception.device)
            size = (model.denoiser.image_size,) * 2
            if reference.resolution is not None and tuple(reference.resolution) != size:
                raise EvalInputError(
                    f"the reference is at {reference.resolution[0]}x{reference.resolution[1]} but the network makes "
                    f"{size[0]}x{size[1]} images; make a reference at the sample resolution (`epg fid ref`)"
                )
        for scale in scales:
            row = done.get((ema, sigma_rel, scale))
            if row is None:
                row = row_of(model, ema, scale, sweep_labels)
                if sigma_rel is not None:
                    row |= {"sigma_rel": sigma_rel, "checkpoint": str(checkpoint)}
                results["rows"].append(row)
                sweep.save_results(path, results)
                print(f"{row['weights']:>12}  cfg {scale:<5g}  FID {row['fid']:.3f}  ({row['seconds']} s)")
            rows.append(row)
        del model

    best = sweep.best_row(rows)
    results["best"] = best
    print(f"\nFID of {args.num} samples ({args.sampler}, {args.steps} steps, {sweep_labels} labels) vs {args.ref}")
    print(format_sweep(rows))
    print(f"best: cfg {best['scale']:g} with {best['weights']} (FID {best['fid']:.3f})")
    title = f"{Path(args.checkpoint).name}: {args.sampler} {args.steps} steps, {sweep_labels} labels"
    if sweep.plot_sweep(rows, out / sweep.PLOT_NAME, title):
        print(f"wrote {out / sweep.PLOT_NAME}")
    if sweep.plot_sigma_rel(rows, out / sweep.SIGMA_REL_PLOT_NAME, title):
        print(f"wrote {out / sweep.SIGMA_REL_PLOT_NAME}")

    modes = list(LABEL_MODES) if args.labels == "both" else [args.labels]
    tag = sweep.row_tag(best)
    if args.final_num is not None:
        final = {mode: _final_run(args, best, mode, inception, reference) for mode in modes}
        results["final"] = {"num": args.final_num, "setting": tag, **final}
        _report({mode: final[mode]["metrics"] for mode in modes}, f"{args.final_num} samples, {tag}")
    elif args.labels == "both":  # compare label modes at --num: the balanced row is the sweep's
        model = load_denoiser(best.get("checkpoint") or args.checkpoint, ema=best["ema"], preset=args.preset)
        model.denoiser.to(inception.device)
        results["labels"] = {"balanced": best, "random": row_of(model, best["ema"], best["scale"], "random")}
        _report({mode: {"fid": results["labels"][mode]["fid"]} for mode in modes}, f"{args.num} samples, {tag}")
    sweep.save_results(path, results)
    print(f"wrote {path}")
    return 0


def phema_checkpoints(checkpoint: str, sigma_rels: list[float], out: Path, run: str | None = None) -> dict[float, Path]:
    """Reconstruct each σ_rel from the snapshots of ``run`` (default: the folder above the checkpoint's
    ``checkpoints/``) into a copy of ``checkpoint`` under ``out/phema``; the files of earlier reruns are reused."""
    from epg.posthoc import reconstruct_run, reconstruction_name, snapshot_headers

    if run is None:
        parent = Path(checkpoint).resolve().parent
        run = parent.parent if parent.name == "checkpoints" else parent
    folder = out / "phema"
    headers = snapshot_headers(run)
    if not headers:
        raise EvalInputError(f"--sigma-rel: no post-hoc EMA snapshots in {run}/phema; give the run with --phema-run")
    updates = headers[-1][1]
    paths = {s: folder / reconstruction_name(s, updates) for s in sigma_rels}
    missing = [s for s, p in paths.items() if not p.exists()]
    if missing:
        try:
            reconstruct_run(run, missing, updates, checkpoint, folder)
        except ValueError as err:
            raise EvalInputError(f"--sigma-rel: {err}") from None
    return paths


def _report(metrics: dict[str, dict], what: str) -> None:
    print(f"\n{what}:")
    if len(metrics) == 1:
        print(format_results(next(iter(metrics.values()))))
    else:
        print(format_comparison({sweep.MODE_NAMES[mode]: values for mode, values in metrics.items()}))

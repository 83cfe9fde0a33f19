"""`epg demo`: the whole pipeline on the embedded MNIST digits: data, stage 1, stage 2, grid, FID, class accuracy.

The steps are :func:`epg.demo.pipeline.run_demo`'s (each printed with its elapsed time; a finished stage is skipped
and an interrupted one resumes from its last checkpoint); the summary goes to OUT/summary.json. Measured results of
the demo configurations (2 shared CPU cores) are in the YAML headers of ``configs/demo`` and in README.md ("The
demo").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from epg.demo.pipeline import run_demo
from epg.demo.settings import DEVICES, OBJECTIVES, DemoError, DemoSettings


def build_parser() -> argparse.ArgumentParser:
    """The `epg demo` argument parser."""
    p = argparse.ArgumentParser(prog="epg demo", description=__doc__.splitlines()[0])
    p.add_argument("--objective", default="diffusion", choices=sorted(OBJECTIVES), help="stage-2 model (§4 or §5)")
    p.add_argument("--device", default="cpu", choices=DEVICES, help="cpu: the 15-min demo; gpu: trained longer")
    p.add_argument("--out", help="folder for data, checkpoints, logs, samples, summary.json (runs/demo, runs/demo_gpu)")
    p.add_argument("--fresh", action="store_true", help="retrain both stages even when their checkpoints exist")
    p.add_argument("--config-dir", help="folder with pretrain.yaml, finetune_dm.yaml, finetune_cm.yaml and gpu/")
    p.add_argument("--pretrain-steps", type=int, help="stage-1 steps (default: the config's total_steps)")
    p.add_argument("--finetune-steps", type=int, help="stage-2 steps (default: the config's total_steps)")
    p.add_argument("--fid-samples", type=int, help="class-balanced samples for FID and accuracy (cpu 500)")
    p.add_argument("--fid-ref", type=int, help="val digits in the FID reference (at most 500; default all)")
    p.add_argument("--threads", type=int, help="torch threads of each step (default: all cores, at most 8 on cpu)")
    p.add_argument("--batch-size", type=int, help="override the configs' global batch size")
    p.add_argument("--num-workers", type=int, help="override the configs' data-loader workers")
    p.add_argument("--accelerator", help="override the configs' accelerator (e.g. cpu to try the gpu configs)")
    p.add_argument(
        "--sigma-rel",
        dest="sigma_rels",
        type=_sigma_rels,
        default=DemoSettings.sigma_rels,
        help="post-hoc EMA σ_rel values to reconstruct and score when stage 2 kept snapshots, comma-separated, or "
        "'none' (default 0.03,0.06,0.1; method.md §13)",
    )
    return p


def _sigma_rels(text: str) -> tuple[float, ...]:
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated numbers or 'none', got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns 0 on success, 1 (with a message) when a step fails."""
    opts = build_parser().parse_args(argv)
    try:
        settings = DemoSettings(**vars(opts))
        summary = run_demo(settings)
    except DemoError as err:
        print(f"epg demo: {err}", file=sys.stderr)
        return 1
    out, knn = settings.out, summary["stage1_knn"]
    print(
        f"\nepg demo ({settings.objective}) finished in {summary['total_s']:.0f}s: class accuracy "
        f"{summary['class_accuracy']:.1%}, FID {summary['fid']:.2f} ({summary['fid_samples']} samples vs "
        f"{summary['fid_reference']} val digits)\n"
        f"  stage-1 encoder: {knn['k']}-NN accuracy {knn['stage1']:.3f} vs {knn['random_init']:.3f} at random init "
        f"({knn['gain']:+.3f})\n"
        f"  samples (10x10, row c = class c): {summary['grid']}\n"
        f"  checkpoints: {Path(summary['checkpoints']['pretrain'])} (stage 1), "
        f"{Path(summary['checkpoints']['finetune']).parent} (stage 2)\n"
        f"  summary: {out / 'summary.json'}\n"
        f"  TensorBoard logs: tensorboard --logdir {out}",
        flush=True,
    )
    return 0

"""Scores of reconstructed post-hoc EMA profiles (method.md §13): one row per σ_rel, and their plot.

:func:`score_sigma_rels` reconstructs each σ_rel from a run's snapshots (:mod:`epg.posthoc`) into a checkpoint and
hands it to a scoring function (FID, class accuracy, … of that checkpoint's first EMA slot); `epg demo` and other
evaluations call it with their own scorer. :func:`plot_sigma_rels` draws every numeric score against σ_rel.
:func:`phema_checkpoints` and :func:`plot_sigma_rel` are the σ_rel side of :class:`epg.eval.sweep.Sweep`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from epg.eval.errors import EvalInputError
from epg.eval.plots import line_plot
from epg.posthoc import reconstruct_run, reconstruction_name, snapshot_headers


def score_sigma_rels(
    run: str | os.PathLike,
    sigma_rels: Sequence[float],
    score: Callable[[Path], dict],
    checkpoint: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
) -> list[dict]:
    """``[{"sigma_rel", "updates", "checkpoint", "profile_error", **score(checkpoint)}, …]`` for each σ_rel, the
    checkpoints written as :func:`epg.posthoc.reconstruct_run` does (default: a copy of RUN/checkpoints/last.ckpt
    under RUN/phema/reconstructed)."""
    rows = []
    for path, rec in reconstruct_run(run, sigma_rels, checkpoint=checkpoint, out=out):
        row = {"sigma_rel": rec.sigma_rel, "updates": rec.updates, "checkpoint": str(path)}
        rows.append(row | {"profile_error": rec.profile_error} | dict(score(path)))
    return rows


def plot_sigma_rels(rows: list[dict], path: str | os.PathLike, keys: Sequence[str] = ("fid",), title: str = "") -> bool:
    """One panel per key of ``keys`` (e.g. "fid", "class_accuracy") against σ_rel, as a PNG; False without
    matplotlib or rows."""
    if not rows:
        return False
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("post-hoc EMA: matplotlib is not installed, so no plot (pip install matplotlib)", file=sys.stderr)
        return False
    fig = Figure(figsize=(4 * len(keys), 3.5), dpi=120)
    line = sorted(rows, key=lambda r: r["sigma_rel"])
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        ax.plot([r["sigma_rel"] for r in line], [r[key] for r in line], marker="o")
        ax.set_xlabel("post-hoc EMA σ_rel")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return True


def plot_sigma_rel(rows: list[dict], path: str | os.PathLike, title: str = "") -> bool:
    """FID against the post-hoc EMA σ_rel, one line per CFG scale (rows with a ``sigma_rel``), as a PNG."""
    rows = [r for r in rows if r.get("sigma_rel") is not None]
    if not rows:
        return False
    scales = sorted({r["scale"] for r in rows})
    series = {f"CFG {w:g}": [(r["sigma_rel"], r["fid"]) for r in rows if r["scale"] == w] for w in scales}
    return line_plot(path, series, "post-hoc EMA σ_rel", f"FID ({rows[0]['num']} samples)", title)


def phema_checkpoints(
    checkpoint: str | os.PathLike, sigma_rels: Sequence[float], out: Path, run: str | os.PathLike | None = None
) -> dict[float, Path]:
    """Reconstruct each σ_rel from the snapshots of ``run`` (default: the folder above the checkpoint's
    ``checkpoints/``) into a copy of ``checkpoint`` under ``out/phema``; the files of earlier reruns are reused
    (`epg fid sweep --sigma-rel`, :class:`epg.eval.sweep.Sweep`)."""
    if run is None:
        parent = Path(checkpoint).resolve().parent
        run = parent.parent if parent.name == "checkpoints" else parent
    folder = Path(out) / "phema"
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

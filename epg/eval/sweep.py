"""The library of `epg fid sweep` (method.md §6, §8): in-memory sampling split over ranks, sweep rows and results.

Image i's noise and label depend only on (seed, i), as in `epg sample`; :func:`sample_images` is also the sampling of
the in-loop FID (:mod:`epg.eval.callback`) and `epg demo`. A sweep's rows (one per CFG scale and EMA copy) live in
``OUT/sweep.json`` with the settings that decide them, so that a rerun skips finished rows and refuses a folder made
with other settings. The command line is :mod:`epg.eval.sweep_cli`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from epg.checkpoint import read_hyper_parameters
from epg.eval.errors import EvalInputError
from epg.eval.inception import InceptionFeatures, pool_features
from epg.eval.metrics import fid_to_reference
from epg.eval.reference import ReferenceStats
from epg.io import write_json
from epg.sampling import SampleSettings, generate_batches
from epg.sampling.options import SamplingOptionsError, parse_ema, settings_diff

RESULTS_NAME = "sweep.json"
PLOT_NAME = "sweep.png"
SIGMA_REL_PLOT_NAME = "sweep_sigma_rel.png"
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
    settings: SampleSettings | None = None,
    normalization: str = "imagenet",
    batch_size: int = 100,
) -> torch.Tensor:
    """uint8 images (N, H, W, 3) on the CPU for ``indices`` out of ``num``, each fixed by (seed, index) (method.md §6).

    ``denoiser`` is a :class:`~epg.method.denoiser.Denoiser` in eval mode on its device; ``settings`` (default: Heun,
    no guidance, balanced labels, seed 0) decide the images: labels are class-balanced or random over the network's
    classes (§6.4; none for an unconditional network), random ones with the training frequencies
    ``settings.class_counts`` (uniform when None). Sampling runs in fp32 unless the settings ask for autocast (§8).
    """
    settings = settings or SampleSettings()
    size = denoiser.image_size
    num_classes = denoiser.null_label
    counts = settings.class_counts
    if settings.labels == "random" and counts is not None and len(counts) != num_classes:
        raise EvalInputError(
            f"the label counts name {len(counts)} classes but the network has {num_classes}: give the counts "
            "of its training classes, or none (uniform labels)"
        )
    chunks = [torch.empty((0, size, size, 3), dtype=torch.uint8)]
    chunks += [images for _, images in generate_batches(denoiser, indices, num, settings, normalization, batch_size)]
    return torch.cat(chunks)


def in_memory_fid(
    model,
    ema: int | None,
    scale: float,
    settings: SampleSettings,
    num: int,
    inception: InceptionFeatures,
    reference: ReferenceStats,
    batch_size: int = 100,
) -> dict:
    """One sweep row: ``num`` samples of one (EMA copy, CFG ``scale``) with ``settings`` scored by FID against the
    reference."""
    start = time.time()
    images = sample_images(model.denoiser, range(num), num, settings, model.normalization, batch_size)
    fid = fid_to_reference(pool_features(images, inception, batch_size), reference)
    return {
        "ema": ema,
        "weights": model.weights,
        "scale": scale,
        "labels": settings.labels,
        "num": num,
        "fid": fid,
        "seconds": round(time.time() - start, 2),
    }


# --- rows, results and choices -------------------------------------------------------------------------------------


def ema_choices(text: str, checkpoint: str | os.PathLike) -> list[int | None]:
    """EMA indices named by --ema (None = online weights); `all` reads the checkpoint's EMA rates."""
    if text.strip().lower() == "all":
        rates = read_hyper_parameters(checkpoint)[0].get("ema_rates")  # not gigabytes of weights
        return list(range(len(rates))) if rates else [None]  # no EMA copies: the stored/online weights
    try:
        choices = [parse_ema(part) for part in text.split(",") if part.strip()]
    except SamplingOptionsError:
        raise EvalInputError(f"--ema takes all, or EMA indices (0, 1, …) and 'none', got {text!r}") from None
    if not choices:
        raise EvalInputError("--ema is empty")
    return choices


def ema_arg(ema: int | None) -> str:
    """The --ema spelling of an EMA choice."""
    return "none" if ema is None else str(ema)


def load_results(path: Path, identity: dict) -> dict:
    """The sweep's results so far (``{"settings": identity, "rows": []}`` when new); a folder whose stored settings
    differ from ``identity`` is refused."""
    if not path.exists():
        return {"settings": identity, "rows": []}
    results = json.loads(path.read_text())
    diff = settings_diff(results.get("settings", {}), identity)
    if diff:
        raise EvalInputError(
            f"{path} holds a sweep with different settings ({', '.join(diff)}); use a fresh --out folder, "
            "or delete that file to start over"
        )
    return results


def save_results(path: Path, results: dict) -> None:
    """Write the sweep's results atomically."""
    write_json(path, results)


def best_row(rows: list[dict]) -> dict:
    """The row with the lowest FID (the first of equals in sweep order)."""
    finite = [r for r in rows if math.isfinite(r["fid"])]
    if not finite:
        raise EvalInputError("no setting gave a finite FID")
    return min(finite, key=lambda r: r["fid"])


def row_tag(row: dict) -> str:
    """A row's setting as a name, e.g. ``ema-0_cfg1.5`` or ``sigma_rel-0.05_cfg1.5`` (post-hoc EMA, method.md §13)."""
    if row.get("sigma_rel") is not None:
        return f"sigma_rel-{row['sigma_rel']:g}_cfg{row['scale']:g}"
    return f"ema-{ema_arg(row['ema'])}_cfg{row['scale']:g}"


def plot_sigma_rel(rows: list[dict], path: str | os.PathLike, title: str = "") -> bool:
    """FID against the post-hoc EMA σ_rel, one line per CFG scale (rows with a ``sigma_rel``), as a PNG."""
    rows = [r for r in rows if r.get("sigma_rel") is not None]
    if not rows:
        return False
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.add_subplot()
    for scale in sorted({r["scale"] for r in rows}):
        line = sorted((r["sigma_rel"], r["fid"]) for r in rows if r["scale"] == scale)
        ax.plot([s for s, _ in line], [f for _, f in line], marker="o", label=f"CFG {scale:g}")
    ax.set_xlabel("post-hoc EMA σ_rel")
    ax.set_ylabel(f"FID ({rows[0]['num']} samples)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True


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

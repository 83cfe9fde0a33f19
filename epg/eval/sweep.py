"""FID per (CFG scale, EMA copy) on few samples, the best setting, its full run (method.md §6, §8): `epg fid sweep`.

Image i's noise and label depend only on (seed, i), as in `epg sample`; :func:`sample_images` is also the sampling of
the in-loop FID (:mod:`epg.eval.callback`) and `epg demo`. :class:`Sweep` samples ``num`` images in memory per
setting, scores them against the reference and appends a row to ``OUT/sweep.json`` with the settings that decide
them, so that a rerun skips finished rows (added scales or EMA copies cost only their own samples) and refuses a
folder made with other settings. The setting with the lowest FID is then optionally sampled ``final_num`` times as an
:class:`~epg.sampling.run.SampleRun` (PNGs + ADM-style .npz, resumable) and scored with every metric the reference
allows; ``labels="both"`` reports class-balanced against random labels for that setting (method.md §6.4: the 1.58
vs 1.70 question).

FID of few samples is biased upwards (by roughly a constant for a fixed N), so use the sweep to rank settings, and
quote only the final run. The command line is :mod:`epg.commands.fid_sweep`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from epg.checkpoint import default_sampler, load_denoiser, read_hyper_parameters
from epg.eval.errors import EvalInputError
from epg.eval.inception import InceptionFeatures, extract_features, pool_features
from epg.eval.metrics import fid_to_reference, score
from epg.eval.phema import plot_sigma_rel
from epg.eval.plots import line_plot
from epg.eval.reference import ReferenceStats, open_reference
from epg.eval.tables import format_comparison, format_results, format_sweep
from epg.io import write_json
from epg.sampling import SampleSettings, default_steps, generate_batches
from epg.sampling.grid import GUIDANCE_INTERVAL
from epg.sampling.options import SamplingOptions, SamplingOptionsError, format_interval, parse_ema, settings_diff
from epg.sampling.per_image import LABEL_MODES
from epg.sampling.run import SampleRun, SampleRunError, counts_digest, label_counts

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


def plot_sweep(rows: list[dict], path: str | os.PathLike, title: str = "") -> bool:
    """FID against CFG scale, one line per EMA copy, best point marked, as a PNG; False without matplotlib."""
    series = {
        w: [(r["scale"], r["fid"]) for r in rows if r["weights"] == w]
        for w in dict.fromkeys(r["weights"] for r in rows)
    }
    best = best_row(rows)
    ylabel = f"FID ({rows[0]['num']} samples)"
    return line_plot(path, series, "CFG scale w", ylabel, title, ring=(best["scale"], best["fid"], "best"))


# --- the sweep ---------------------------------------------------------------------------------------------------


@dataclass
class Sweep:
    """`epg fid sweep` with typed settings: FID per (CFG scale, EMA copy), the best one, optionally its full run.

    Args:
        checkpoint: EPG network file, FinetuneModule checkpoint, or official file (with ``preset``).
        ref: reference .npz from `epg fid ref` (or an ADM reference batch).
        out: folder for sweep.json, sweep.png and the final run's samples.
        scales: CFG scales w (1 = no guidance).
        emas: EMA copies (None = the online weights); None: every copy the checkpoint keeps (:func:`ema_choices`).
        sigma_rels: post-hoc EMA σ_rel values to sweep instead of ``emas`` (method.md §13): each reconstructed from
            the snapshots of ``phema_run`` (default: the run folder above the checkpoint's ``checkpoints/``) into a
            copy of the checkpoint under ``out/phema`` (:func:`epg.eval.phema.phema_checkpoints`), its EMA slot 0.
        num: samples per setting of the sweep; final_num: then sample the best setting this many times.
        sampler, steps: None: what the checkpoint's objective needs (heun or consistency) and its steps.
        interval: the CFG σ interval (unshifted; None: every level).
        labels: "balanced", "random" or "both" (compare the label modes at the best setting, §6.4).
        label_counts: class frequencies of random labels (:func:`epg.sampling.run.label_counts`).
        preset: architecture of an official checkpoint.
        seed: image i depends only on (seed, i).
        batch_size: images per sampling and Inception batch.
        device: cuda or cpu (None: cuda when available).
    """

    checkpoint: str | os.PathLike
    ref: str | os.PathLike
    out: Path
    scales: Sequence[float] = (1.0, 1.5, 2.0, 2.5, 3.0)
    emas: Sequence[int | None] | None = None
    num: int = 1000
    final_num: int | None = None
    sampler: str | None = None
    steps: int | None = None
    interval: tuple[float, float] | None = GUIDANCE_INTERVAL
    labels: str = "balanced"
    label_counts: str = "auto"
    preset: str | None = None
    seed: int = 0
    batch_size: int = 100
    device: str | None = None
    sigma_rels: Sequence[float] | None = None
    phema_run: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.num < 2 or (self.final_num is not None and self.final_num < 2) or self.batch_size < 1 or self.seed < 0:
            raise EvalInputError("--num and --final-num must be ≥ 2, --batch-size ≥ 1 and --seed ≥ 0")
        if not self.scales:
            raise EvalInputError("--scales is empty")
        if self.labels not in (*LABEL_MODES, "both"):
            raise EvalInputError(f"--labels takes one of {(*LABEL_MODES, 'both')}, got {self.labels!r}")
        self.emas = ema_choices("all", self.checkpoint) if self.emas is None else list(self.emas)
        self.sigma_rels = [float(s) for s in self.sigma_rels or ()]
        self.sampler = self.sampler or default_sampler(self.checkpoint)
        self.steps = self.steps or default_steps(self.sampler)
        self.options(1.0, "balanced")  # a bad sampler or step count fails before any sampling

    @property
    def sweep_labels(self) -> str:
        """The label mode of the sweep's rows ("both" sweeps with balanced labels)."""
        return "balanced" if self.labels == "both" else self.labels

    def options(self, scale: float, labels: str) -> SamplingOptions:
        """The sampling options of one setting of the sweep."""
        try:
            return SamplingOptions(self.sampler, self.steps, scale, self.interval, labels, self.seed)
        except SamplingOptionsError as err:
            raise EvalInputError(str(err)) from None

    def identity(self, counts: list[int] | None) -> dict:
        """What the rows depend on besides (scale, EMA); a rerun into the same folder must match it."""
        identity = {"ref": self.ref, "num": self.num, "sampler": self.sampler, "steps": self.steps}
        identity.update(interval=format_interval(self.interval), preset=self.preset, seed=self.seed)
        identity.update(checkpoint=os.path.abspath(self.checkpoint), ref=os.path.abspath(self.ref))
        identity["labels"] = self.sweep_labels
        if self.labels != "balanced":
            identity["label_counts"] = counts_digest(counts)
        return identity

    def run(self) -> dict:
        """Sweep (skipping the rows in ``out/sweep.json``), print the table, plot, then the final run; the results."""
        counts = None
        if self.labels != "balanced":
            try:
                counts, where = label_counts(self.label_counts, self.checkpoint)
            except SampleRunError as err:
                raise EvalInputError(str(err)) from None
            print(f"epg fid sweep: {where}")
        path = self.out / RESULTS_NAME
        results = load_results(path, self.identity(counts))
        inception = InceptionFeatures(device=self.device)
        reference = open_reference(self.ref, inception, batch_size=self.batch_size, progress=True)

        def row_of(model, ema, scale: float, mode: str) -> dict:
            settings = self.options(scale, mode).settings(class_counts=counts)
            return in_memory_fid(model, ema, scale, settings, self.num, inception, reference, self.batch_size)

        done = {(r["ema"], r.get("sigma_rel"), r["scale"]): r for r in results["rows"]}
        rows: list[dict] = []
        for ema, sigma_rel, checkpoint in self.sources(done):
            todo = [s for s in self.scales if (ema, sigma_rel, s) not in done]
            model = self._load(ema, inception, reference, checkpoint) if todo else None
            for scale in self.scales:
                row = done.get((ema, sigma_rel, scale))
                if row is None:
                    row = row_of(model, ema, scale, self.sweep_labels)
                    if sigma_rel is not None:
                        row |= {"sigma_rel": sigma_rel, "checkpoint": str(checkpoint)}
                    results["rows"].append(row)
                    save_results(path, results)
                    print(f"{row['weights']:>12}  cfg {scale:<5g}  FID {row['fid']:.3f}  ({row['seconds']} s)")
                rows.append(row)
            del model

        best = best_row(rows)
        results["best"] = best
        what = f"{self.sampler}, {self.steps} steps, {self.sweep_labels} labels"
        print(f"\nFID of {self.num} samples ({what}) vs {self.ref}")
        print(format_sweep(rows))
        print(f"best: cfg {best['scale']:g} with {best['weights']} (FID {best['fid']:.3f})")
        title = f"{Path(self.checkpoint).name}: {self.sampler} {self.steps} steps, {self.sweep_labels} labels"
        if plot_sweep(rows, self.out / PLOT_NAME, title):
            print(f"wrote {self.out / PLOT_NAME}")
        if plot_sigma_rel(rows, self.out / SIGMA_REL_PLOT_NAME, title):
            print(f"wrote {self.out / SIGMA_REL_PLOT_NAME}")

        modes = list(LABEL_MODES) if self.labels == "both" else [self.labels]
        tag = row_tag(best)
        if self.final_num is not None:
            final = {mode: self.final_run(best, mode, inception, reference) for mode in modes}
            results["final"] = {"num": self.final_num, "setting": tag, **final}
            _report({mode: final[mode]["metrics"] for mode in modes}, f"{self.final_num} samples, {tag}")
        elif self.labels == "both":  # compare label modes at num: the balanced row is the sweep's
            model = self._load(best["ema"], inception, reference, best.get("checkpoint"))
            results["labels"] = {"balanced": best, "random": row_of(model, best["ema"], best["scale"], "random")}
            _report({mode: {"fid": results["labels"][mode]["fid"]} for mode in modes}, f"{self.num} samples, {tag}")
        save_results(path, results)
        print(f"wrote {path}")
        return results

    def sources(self, done: dict) -> list[tuple[int | None, float | None, str | os.PathLike | None]]:
        """(EMA slot, σ_rel, checkpoint) of each weight source: the EMA choices of ``checkpoint``, or with
        ``sigma_rels`` slot 0 of one reconstruction per σ_rel (made only for those with rows still to do)."""
        if not self.sigma_rels:
            return [(ema, None, self.checkpoint) for ema in self.emas]
        from epg.eval.phema import phema_checkpoints

        todo = [s for s in self.sigma_rels if any((0, s, scale) not in done for scale in self.scales)]
        paths = phema_checkpoints(self.checkpoint, todo, self.out, self.phema_run)
        return [(0, s, paths.get(s)) for s in self.sigma_rels]

    def _load(self, ema: int | None, inception: InceptionFeatures, reference: ReferenceStats, checkpoint=None):
        """The weights of one EMA choice (of ``checkpoint``, default the sweep's) on the Inception device, checked
        against the reference's resolution."""
        model = load_denoiser(checkpoint or self.checkpoint, ema=ema, preset=self.preset)
        model.denoiser.to(inception.device)
        size = (model.denoiser.image_size,) * 2
        if reference.resolution is not None and tuple(reference.resolution) != size:
            raise EvalInputError(
                f"the reference is at {reference.resolution[0]}x{reference.resolution[1]} but the network makes "
                f"{size[0]}x{size[1]} images; make a reference at the sample resolution (`epg fid ref`)"
            )
        return model

    def final_run(self, row: dict, mode: str, inception: InceptionFeatures, reference: ReferenceStats) -> dict:
        """Sample the chosen setting as a :class:`SampleRun` (resumable PNGs + .npz), then score every metric."""
        folder = self.out / "final" / f"{row_tag(row)}_{mode}_n{self.final_num}"
        options = self.options(row["scale"], mode)
        try:
            run = SampleRun(
                row.get("checkpoint") or self.checkpoint,
                folder,
                self.final_num,
                options,
                ema=row["ema"],
                batch=self.batch_size,
                preset=self.preset,
                label_counts=self.label_counts,
            )
            print(f"epg fid sweep: final run: {run.command_line()}")
            run.execute(inception.device)
        except SampleRunError as err:
            raise EvalInputError(f"final run into {folder}: {err}") from None
        npz = folder.with_name(folder.name + ".npz")
        features = extract_features(npz, inception, self.batch_size, resolution=reference.resolution, progress=True)
        return {"samples": str(npz), "metrics": score(features, reference, device=str(inception.device))}


def _report(metrics: dict[str, dict], what: str) -> None:
    print(f"\n{what}:")
    if len(metrics) == 1:
        print(format_results(next(iter(metrics.values()))))
    else:
        print(format_comparison({MODE_NAMES[mode]: values for mode, values in metrics.items()}))

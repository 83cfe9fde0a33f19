"""`epg demo`'s post-hoc EMA step (method.md §13): when stage 2 kept power-function snapshots (``phema`` in its
config), a few σ_rel profiles are reconstructed from them and each scored like the main evaluation (grid, FID and
class accuracy of :func:`epg.demo.evaluate.evaluate`, with fewer samples), then plotted against σ_rel."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from epg.demo.evaluate import evaluate
from epg.demo.settings import DemoSettings, log

# The reconstructions scored, with fewer samples each (FID of 100 samples is biased upwards: compare these rows with
# each other, not with the main FID).
PHEMA_SAMPLES = 100
RECONSTRUCTED_FOLDER = "phema_reconstructed"  # under the stage-2 run folder, beside checkpoints/


def has_snapshots(run: Path) -> bool:
    """Whether the run folder holds post-hoc EMA snapshots (``<run>/phema/phema-*.pt``)."""
    from epg.posthoc import snapshot_files

    return bool(snapshot_files(run))


def evaluate_phema(run: Path, ckpt: Path, data_dir: Path, demo: DemoSettings, cfg: dict, start: float) -> dict:
    """FID and class accuracy of each σ_rel of ``demo.sigma_rels`` reconstructed from the snapshots of ``run``
    into copies of ``ckpt`` (in ``run/phema_reconstructed``, where :func:`evaluate` finds the run's cached val
    statistics), each evaluated into ``demo.out/phema/<name>``; the rows and a plot ``demo.out/phema_<objective>.png``.
    The digit classifier and FID reference of the main evaluation are copied in, not trained or computed again."""
    from epg.eval.phema import plot_sigma_rels, score_sigma_rels

    few = dataclasses.replace(demo, fid_samples=min(demo.fid_samples, PHEMA_SAMPLES))

    def score(path: Path) -> dict:
        folder = demo.out / "phema" / path.stem
        folder.mkdir(parents=True, exist_ok=True)
        for cached in [demo.out / "digit_classifier.pt", *demo.out.glob("fid_reference_val*.npz")]:
            if cached.is_file() and not (folder / cached.name).exists():
                try:  # a hard link where the file system allows it (the reference cache can be tens of MB)
                    os.link(cached, folder / cached.name)
                except OSError:
                    shutil.copy(cached, folder / cached.name)
        result = evaluate(path, data_dir, dataclasses.replace(few, out=folder), cfg, start)
        return {key: result[key] for key in ("fid", "class_accuracy", "fid_samples", "grid")}

    rows = score_sigma_rels(run, demo.sigma_rels, score, checkpoint=ckpt, out=run / RECONSTRUCTED_FOLDER)
    plot = demo.out / f"phema_{demo.objective}.png"
    title = f"epg demo ({demo.objective}): post-hoc EMA, {few.fid_samples} samples per σ_rel"
    plot_sigma_rels(rows, plot, keys=("fid", "class_accuracy"), title=title)
    for row in rows:
        fid, accuracy = row["fid"], row["class_accuracy"]
        log(f"post-hoc EMA σ_rel {row['sigma_rel']:g}: FID {fid:.2f}, accuracy {accuracy:.1%}", start)
    return {"rows": rows, "plot": str(plot)}

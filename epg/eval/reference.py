"""Reference statistics of a real image set: pool_3 mu/sigma, sFID mu_s/sigma_s, pool_3 features (METHOD.md §8).

A reference file is an .npz with ADM's key names (``mu``, ``sigma``, ``mu_s``, ``sigma_s``; float64) plus
``pool_features`` (float32, N x 2048, for KID and precision/recall), ``resolution`` ([H, W]) and ``count``.
ADM's own reference batches (``VIRTUAL_imagenet256_labeled.npz``: ``arr_0`` images + ``mu``/``sigma``/...) are
accepted wherever a reference is: their images give the features, and their stored statistics are kept, as ADM's
evaluator does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from epg.eval.metrics import EvalInputError, InceptionFeatures, extract_features, statistics

FORMAT = "epg-fid-reference-v1"


@dataclass
class ReferenceStats:
    """Statistics of a real image set against which samples are scored."""

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None
    sigma_s: np.ndarray | None
    pool: np.ndarray | None
    resolution: tuple[int, int] | None
    count: int
    source: str

    def save(self, path: str | Path) -> None:
        """Write the statistics to an .npz atomically."""
        path = Path(path)
        arrays = {"format": np.array(FORMAT), "mu": self.mu, "sigma": self.sigma, "count": np.array(self.count)}
        arrays["source"] = np.array(self.source)
        if self.mu_s is not None:
            arrays.update(mu_s=self.mu_s, sigma_s=self.sigma_s)
        if self.pool is not None:
            arrays["pool_features"] = self.pool
        if self.resolution is not None:
            arrays["resolution"] = np.array(self.resolution)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def _is_reference_file(path: Path) -> bool:
    with np.load(path) as data:
        return "format" in data.files and str(data["format"]) == FORMAT


def load_reference(path: str | Path) -> ReferenceStats:
    """Read a reference .npz written by :meth:`ReferenceStats.save`."""
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"reference {path} does not exist; make one with `epg fid ref SRC --out {path}`")
    with np.load(path) as data:
        if "format" not in data.files or str(data["format"]) != FORMAT:
            raise EvalInputError(f"{path} is not a reference written by `epg fid ref`")
        optional = {key: data[key] for key in ("mu_s", "sigma_s", "pool_features", "resolution") if key in data.files}
        resolution = optional.get("resolution")
        return ReferenceStats(
            mu=data["mu"],
            sigma=data["sigma"],
            mu_s=optional.get("mu_s"),
            sigma_s=optional.get("sigma_s"),
            pool=optional.get("pool_features"),
            resolution=None if resolution is None else (int(resolution[0]), int(resolution[1])),
            count=int(data["count"]),
            source=str(data["source"]),
        )


def _adm_statistics(path: Path) -> dict[str, np.ndarray]:
    """The precomputed statistics an ADM reference .npz carries (mu, sigma, mu_s, sigma_s), if any."""
    with np.load(path) as data:
        return {key: data[key].astype(np.float64) for key in ("mu", "sigma", "mu_s", "sigma_s") if key in data.files}


def compute_reference(
    source: str | Path,
    inception: InceptionFeatures,
    batch_size: int = 100,
    progress: bool = False,
    crop_to: int | None = None,
) -> ReferenceStats:
    """Statistics of a real set: WebDataset shards, an image folder, or an ADM reference .npz.

    ``crop_to``: ADM-center-crop larger images to this size first (the resolution a run trains at).
    """
    text = str(source)
    stored: dict[str, np.ndarray] = {}
    if text.endswith(".npz") and Path(text).is_file():
        if _is_reference_file(Path(text)):
            return load_reference(text)
        stored = _adm_statistics(Path(text))
        with np.load(text) as data:
            has_images = "arr_0" in data.files
        if not has_images:
            if "mu" not in stored:
                raise EvalInputError(f"{text} has neither images (arr_0) nor statistics (mu/sigma)")
            return ReferenceStats(
                stored["mu"], stored["sigma"], stored.get("mu_s"), stored.get("sigma_s"), None, None, 0, text
            )
    features = extract_features(source, inception, batch_size=batch_size, progress=progress, crop_to=crop_to)
    mu, sigma = stored.get("mu"), stored.get("sigma")
    if mu is None:
        mu, sigma = statistics(features.pool)
    mu_s, sigma_s = stored.get("mu_s"), stored.get("sigma_s")
    if mu_s is None:
        mu_s, sigma_s = statistics(features.spatial)
    return ReferenceStats(mu, sigma, mu_s, sigma_s, features.pool, features.resolution, len(features), text)


def open_reference(
    path: str | Path, inception: InceptionFeatures, batch_size: int = 100, progress: bool = False
) -> ReferenceStats:
    """A reference for scoring: our reference .npz as is, or an ADM reference .npz processed on the fly."""
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"reference {path} does not exist; make one with `epg fid ref SRC --out {path}`")
    if _is_reference_file(path):
        return load_reference(path)
    return compute_reference(path, inception, batch_size=batch_size, progress=progress)

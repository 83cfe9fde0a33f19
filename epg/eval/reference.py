"""Reference statistics of a real image set: pool_3 mu/sigma, sFID mu_s/sigma_s, pool_3 features (method.md §8).

A reference file is an .npz with ADM's key names (``mu``, ``sigma``, ``mu_s``, ``sigma_s``; float64) plus
``pool_features`` (float32, N x 2048, for KID and precision/recall), ``resolution`` ([H, W]) and ``count``.
ADM's own reference batches (``VIRTUAL_imagenet256_labeled.npz``: ``arr_0`` images + ``mu``/``sigma``/...) are
accepted wherever a reference is: their images give the features, and their stored statistics are kept, as ADM's
evaluator does.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from epg.eval.distances import statistics
from epg.eval.errors import EvalInputError
from epg.eval.inception import InceptionFeatures, extract_features
from epg.io import atomic_path

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
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)


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
    source: str | Path | np.ndarray,
    inception: InceptionFeatures,
    batch_size: int = 100,
    progress: bool = False,
    crop_to: int | None = None,
    name: str | None = None,
) -> ReferenceStats:
    """Statistics of a real set: WebDataset shards, an image folder, an ADM reference .npz or uint8 images in memory.

    ``crop_to``: ADM-center-crop larger images to this size first (the resolution a run trains at). ``name``: the
    ``source`` recorded for images in memory (default "images").
    """
    text = (name or "images") if isinstance(source, np.ndarray) else str(source)
    stored: dict[str, np.ndarray] = {}
    if not isinstance(source, np.ndarray) and text.endswith(".npz") and Path(text).is_file():
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


def reference_cache(source: str, cache_dir: str | os.PathLike, crop_to: int | None = None) -> Path:
    """The file in ``cache_dir`` that holds the statistics computed from ``source`` (cropped to ``crop_to`` px)."""
    key = os.path.abspath(source) + ("" if crop_to is None else f"@{crop_to}px")
    return Path(cache_dir) / f"fid_reference_{hashlib.sha1(key.encode()).hexdigest()[:10]}.npz"


def cached_reference(
    source: str,
    cache_dir: str | os.PathLike,
    inception: InceptionFeatures,
    batch_size: int = 100,
    crop_to: int | None = None,
    log: Callable[[str], None] = print,
    who: str = "InLoopFID",
) -> ReferenceStats:
    """Reference statistics: a reference .npz as is; shards, a folder or an ADM .npz computed once and cached.

    ``crop_to``: compute them on the images ADM-center-cropped to the training resolution (method.md §7). The
    in-loop FID and the demo share the cache file (:func:`reference_cache`).
    """
    if source.endswith(".npz") and Path(source).is_file():
        try:
            return load_reference(source)
        except EvalInputError:
            pass  # an ADM reference batch: compute once like any other source
    cache = reference_cache(source, cache_dir, crop_to)
    if cache.is_file():
        reference = load_reference(cache)
        if reference.source == source:
            return reference
    log(f"{who}: computing reference statistics of {source} (cached as {cache})")
    reference = compute_reference(source, inception, batch_size=batch_size, progress=True, crop_to=crop_to)
    reference.save(cache)
    return reference

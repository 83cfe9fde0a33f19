"""Data layer: `epg prepare` (shards of ADM center crops, per-shard records, --verify), the demo digits, transforms,
the DataModule and its resumable training stream.

Imports are lazy so that `epg prepare` does not pay for importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EPGDataModule": "epg.data.datamodule",
    "EvalTransform": "epg.data.transforms",
    "FinetuneTransform": "epg.data.transforms",
    "PretrainViews": "epg.data.transforms",
    "adm_center_crop": "epg.data.adm_crop",
    "prepare_demo": "epg.data.demo",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'epg.data' has no attribute {name!r}")

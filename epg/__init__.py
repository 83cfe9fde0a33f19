"""EPG: end-to-end pixel-space generative modelling with self-supervised pre-training (arXiv 2510.12586).

Public API (no Lightning import):

- :func:`build_network` — the raw stage-2 network F(x_in, c_noise, y) of a preset.
- :func:`build_representation` — the stage-1 encoder + projector of a preset.
- :class:`Denoiser` — D(x, σ', y) in data space with the "x0" or "edm" output.
- :func:`load_official` — a released EPG checkpoint as a :class:`Denoiser`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from epg.method.denoiser import Denoiser
from epg.nn.network import EPGNetwork, EPGRepresentation, build_network, build_representation
from epg.nn.official import load_official_network, load_official_representation
from epg.nn.presets import PRESETS, EPGConfig, get_config

__version__ = "0.1.0"
__all__ = [
    "PRESETS",
    "Denoiser",
    "EPGConfig",
    "EPGNetwork",
    "EPGRepresentation",
    "build_network",
    "build_representation",
    "get_config",
    "load_official",
    "load_official_representation",
]


def load_official(
    source: str | os.PathLike | Mapping[str, torch.Tensor], preset: str, parameterization: str = "x0", **overrides
) -> Denoiser:
    """A released EPG checkpoint (file or state dict) as a :class:`Denoiser` ("x0" for DM, "edm" for CM)."""
    network = load_official_network(source, preset, **overrides)
    return Denoiser(network, parameterization=parameterization).eval()

"""The one sampling entry point, :func:`sample`, over every sampler of method.md §6."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from epg.sampling.consistency import consistency
from epg.sampling.guidance import Guidance, GuidedDenoiser, as_guidance
from epg.sampling.heun import Trajectory, euler, heun
from epg.sampling.rng import Generators
from epg.sampling.stochastic import edm_stochastic

SAMPLERS = {"heun": heun, "euler": euler, "stochastic": edm_stochastic, "consistency": consistency}
_COMMON = {"fn", "z", "steps", "record", "generator"}


@dataclass
class SampleResult:
    """Images in data space, network evaluations per sample, and optionally the (σ', x̂0) trajectory."""

    images: torch.Tensor
    nfe: int
    sampler: str
    steps: int
    trajectory: Trajectory | None = None


def sampler_options(sampler: str) -> dict[str, object]:
    """The sampler-specific keyword options of ``sampler`` and their defaults (e.g. ``append_zero``, ``s_churn``)."""
    params = inspect.signature(_lookup(sampler)).parameters
    return {name: p.default for name, p in params.items() if name not in _COMMON}


def default_steps(sampler: str) -> int:
    """The step count a sampler uses when none is given (Heun 32, Euler 50, stochastic 32, consistency 1)."""
    return inspect.signature(_lookup(sampler)).parameters["steps"].default


def sample(
    denoiser: nn.Module,
    z: torch.Tensor,
    y: torch.Tensor | int | None = None,
    *,
    sampler: str = "heun",
    steps: int | None = None,
    guidance: float | Guidance | None = None,
    clamp: float | None = 1.0,
    autocast: torch.dtype | None = None,
    generator: Generators = None,
    return_info: bool = False,
    keep_trajectory: bool = False,
    **options,
) -> torch.Tensor | SampleResult:
    """Sample images in data (model) space from standard normal ``z`` of the output shape (method.md §6).

    ``denoiser`` is a :class:`~epg.method.denoiser.Denoiser` (put it in eval mode); ``z`` is scaled here by
    s_H·σ_max. ``y``: (B,) labels or one int for all (None for unconditional networks). ``guidance``: a CFG scale
    or a :class:`Guidance` (interval in unshifted units, default (0.19, 1.61]). ``clamp``: the §6.1 clamp of every
    x̂0 to [−clamp, clamp] (None: off). Runs in fp32 unless ``autocast`` names a dtype (§8). ``generator`` (one, or
    one per sample) drives the stochastic samplers; deterministic ones ignore it. ``options`` go to the sampler:
    ``append_zero`` (heun/euler/stochastic: σ = 0 appended, EDM-style 75 NFE), ``s_churn``/``s_min``/``s_max``/
    ``s_noise`` (stochastic), ``sigma_mid`` (consistency). Returns the images, or a :class:`SampleResult` with the
    NFE per sample (and the trajectory with ``keep_trajectory``) when ``return_info``.
    """
    run = _lookup(sampler)
    unknown = set(options) - set(sampler_options(sampler))
    if unknown:
        accepted = sampler_options(sampler)
        raise ValueError(f"sampler {sampler!r} takes no option(s) {sorted(unknown)}: it accepts {accepted}")
    if not all(hasattr(denoiser, a) for a in ("raw", "output", "shift")):
        raise TypeError(f"sample() needs a Denoiser, got {type(denoiser).__name__}: wrap the network in Denoiser(net)")
    steps = default_steps(sampler) if steps is None else steps
    z = z.float()
    if isinstance(y, int):
        y = torch.full((z.shape[0],), y, dtype=torch.long, device=z.device)
    elif y is not None:
        y = y.to(z.device, torch.long)
    if "generator" in inspect.signature(run).parameters:
        options["generator"] = generator
    record: Trajectory | None = [] if keep_trajectory else None
    with torch.no_grad():
        fn = GuidedDenoiser(denoiser, y, as_guidance(guidance), clamp, autocast)
        images = run(fn, z, steps=steps, record=record, **options)
    if not return_info:
        return images
    return SampleResult(images=images, nfe=fn.nfe, sampler=sampler, steps=steps, trajectory=record)


def _lookup(sampler: str):
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[sampler]

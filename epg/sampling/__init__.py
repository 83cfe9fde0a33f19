"""Samplers for any :class:`~epg.method.denoiser.Denoiser` through one entry point, :func:`sample` (method.md §6)."""

from epg.sampling.consistency import consistency
from epg.sampling.entry import SAMPLERS, SampleResult, default_steps, sample, sampler_options
from epg.sampling.generate import SampleSettings, generate, generate_batches
from epg.sampling.grid import GUIDANCE_INTERVAL, in_interval, sampling_sigmas
from epg.sampling.guidance import Guidance, GuidedDenoiser, as_guidance
from epg.sampling.heun import euler, heun
from epg.sampling.options import SamplingOptions
from epg.sampling.stochastic import edm_stochastic

__all__ = [
    "GUIDANCE_INTERVAL",
    "SAMPLERS",
    "Guidance",
    "GuidedDenoiser",
    "SampleResult",
    "SampleSettings",
    "SamplingOptions",
    "as_guidance",
    "consistency",
    "default_steps",
    "edm_stochastic",
    "euler",
    "generate",
    "generate_batches",
    "heun",
    "in_interval",
    "sample",
    "sampler_options",
    "sampling_sigmas",
]

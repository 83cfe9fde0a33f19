"""Guided, clamped denoiser evaluations for the samplers: CFG with an interval and autoguidance (method.md §6.1, §6.2).

Every evaluation counts its network calls per sample, so a sampler's NFE is known without touching the device.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from epg.sampling.grid import GUIDANCE_INTERVAL, in_interval

GUIDANCE_KINDS = ("cfg", "autoguidance")
DEFAULT_INTERVAL = "default"  # the interval of Guidance(...) left unset: the paper's band for CFG, all levels else


@dataclass
class Guidance:
    """How to guide: ``scale`` w, the σ interval (unshifted units; None = all levels), kind and the poor model.

    - ``"cfg"``: F_g = F_u + w·(F_c − F_u) on the raw output before clamping, F_u at the null label (§6.2);
      w = 1 is no guidance. Default interval: the paper's (0.19, 1.61].
    - ``"autoguidance"``: D_c + w·(D_c − D_poor) with a weaker :class:`~epg.method.denoiser.Denoiser` ``poor``
      (§6.1, the official code's form); note that here w = 0 is no guidance. Default interval: every level, as the
      official ``autog_forward`` guides every call (only its ``cfg_forward`` reads the band); pass an interval to
      restrict it.
    """

    scale: float
    interval: tuple[float, float] | None | str = DEFAULT_INTERVAL  # "default": the kind's default (see above)
    kind: str = "cfg"
    poor: nn.Module | None = None

    def __post_init__(self) -> None:
        if self.kind not in GUIDANCE_KINDS:
            raise ValueError(f"unknown guidance kind {self.kind!r}: choose one of {GUIDANCE_KINDS}")
        if isinstance(self.interval, str):
            if self.interval != DEFAULT_INTERVAL:
                raise ValueError(f"guidance interval {self.interval!r} must be (lo, hi), None or {DEFAULT_INTERVAL!r}")
            self.interval = GUIDANCE_INTERVAL if self.kind == "cfg" else None
        if self.kind == "autoguidance" and self.poor is None:
            raise ValueError("autoguidance needs the poor denoiser: pass Guidance(..., poor=weaker_denoiser)")
        if self.interval is not None and not self.interval[0] < self.interval[1]:
            raise ValueError(f"guidance interval {self.interval} must be (lo, hi) with lo < hi, or None")

    @property
    def is_identity(self) -> bool:
        """True when the scale makes guidance a no-op (CFG w = 1, autoguidance w = 0)."""
        return self.scale == (1.0 if self.kind == "cfg" else 0.0)


def as_guidance(guidance: float | Guidance | None) -> Guidance | None:
    """A :class:`Guidance` from a CFG scale, a Guidance, or None; no-op scales become None (no extra calls)."""
    if guidance is None:
        return None
    if not isinstance(guidance, Guidance):
        guidance = Guidance(scale=float(guidance))
    return None if guidance.is_identity else guidance


class GuidedDenoiser:
    """x̂0(x, σ') = clamp(guided D(x, σ', y), −c, c) for one batch, with the NFE per sample in ``self.nfe``."""

    def __init__(
        self,
        denoiser: nn.Module,
        y: torch.Tensor | None,
        guidance: Guidance | None = None,
        clamp: float | None = 1.0,
        autocast: torch.dtype | None = None,
    ) -> None:
        self.denoiser = denoiser
        self.y = y
        self.guidance = guidance
        self.clamp = clamp
        self.autocast = autocast
        self.shift = denoiser.shift
        self.nfe = 0
        self._y_pair = None
        if guidance is not None and guidance.kind == "cfg":
            null = denoiser.null_label
            if null is None or y is None:
                raise ValueError("classifier-free guidance needs a class-conditional network and labels y")
            self._y_pair = torch.cat([y, torch.full_like(y, null)])

    def guided(self, sigma: float) -> bool:
        """Whether an evaluation at σ' runs the guided (two-call) form."""
        return self.guidance is not None and in_interval(sigma, self.guidance.interval, self.shift)

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """The clamped (guided) denoised estimate at the host-side noise level ``sigma`` (shifted units)."""
        s = x.new_full((x.shape[0],), sigma)
        if not self.guided(sigma):
            out = self.denoiser.output(x, s, self._raw(self.denoiser, x, s, self.y))
            self.nfe += 1
        elif self.guidance.kind == "cfg":
            # One batched call for the conditional and unconditional halves (method.md §6.2).
            raw_c, raw_u = self._raw(self.denoiser, torch.cat([x, x]), torch.cat([s, s]), self._y_pair).chunk(2)
            out = self.denoiser.output(x, s, torch.lerp(raw_u, raw_c, self.guidance.scale))
            self.nfe += 2
        else:
            d_c = self.denoiser.output(x, s, self._raw(self.denoiser, x, s, self.y))
            poor = self.guidance.poor
            d_p = poor.output(x, s, self._raw(poor, x, s, self.y))
            out = d_c + self.guidance.scale * (d_c - d_p)
            self.nfe += 2
        return out if self.clamp is None else out.clamp(-self.clamp, self.clamp)

    def _raw(self, denoiser: nn.Module, x: torch.Tensor, s: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        ctx = torch.autocast(x.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with ctx:
            return denoiser.raw(x, s, y).float()

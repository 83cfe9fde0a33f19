"""One YAML/CLI-friendly sampling options object for every surface that samples (method.md §6, §6.2, §6.4).

:class:`SamplingOptions` is what a config or a command line declares (sampler, steps, CFG scale, guidance interval,
labels, seed); :meth:`SamplingOptions.settings` turns it into the :class:`~epg.sampling.generate.SampleSettings` that
the generate loop and the grid maker read. FinetuneModule's grid (``model.init_args.sampling``), InLoopFID
(``init_args.sampling``), the demo, `epg sample`, `epg predict` and `epg fid sweep` all go through it, and the
helpers below are the single place for parsing a guidance interval ("lo,hi" or "none"), an EMA choice ("0", "none")
and for comparing a folder's stored settings with a rerun's (resume checks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from epg.sampling.entry import SAMPLERS
from epg.sampling.generate import SampleSettings
from epg.sampling.grid import GUIDANCE_INTERVAL
from epg.sampling.guidance import Guidance, as_guidance
from epg.sampling.per_image import LABEL_MODES

# "bf16"/"fp16"/"none" → the autocast dtype of sampling (None: fp32, method.md §8); the one map of the package.
AUTOCAST: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_INTERVAL = "default"  # the spelling of the paper's interval (also "paper")


class SamplingOptionsError(ValueError):
    """A sampling option is malformed (an unknown sampler, an interval that is not lo < hi, …)."""


def parse_interval(value: str | Sequence[float] | None, what: str = "interval") -> tuple[float, float] | None:
    """A CFG σ interval (unshifted, method.md §6.2) from "lo,hi", "none"/None (every level), "default" (the
    paper's) or a pair of numbers; raises SamplingOptionsError otherwise."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("none", "null", ""):
            return None
        if text in (DEFAULT_INTERVAL, "paper"):
            return GUIDANCE_INTERVAL
        parts = [p for p in text.split(",") if p.strip()]
    else:
        parts = list(value)
    try:
        interval = tuple(float(v) for v in parts)
    except (TypeError, ValueError):
        raise SamplingOptionsError(f"{what} takes lo,hi or 'none', got {value!r}") from None
    if len(interval) != 2:
        raise SamplingOptionsError(f"{what} takes lo,hi or 'none', got {value!r}")
    if not interval[0] < interval[1]:
        raise SamplingOptionsError(f"{what} {interval} must be lo,hi with lo < hi, or 'none'")
    return interval


def format_interval(interval: tuple[float, float] | None) -> str:
    """The command-line spelling of an interval ("lo,hi" or "none"), the inverse of :func:`parse_interval`."""
    return "none" if interval is None else ",".join(map(str, interval))


def parse_ema(value: str | int | None, what: str = "--ema") -> int | None:
    """An EMA copy index from "0", "1", … or "none"/None (the online weights)."""
    if value is None or isinstance(value, int):
        return value
    text = str(value).strip().lower()
    if text == "none":
        return None
    if not text.isdigit():
        raise SamplingOptionsError(f"{what} takes an EMA index (0, 1, …) or 'none', got {value!r}")
    return int(text)


def select_network(module: torch.nn.Module, ema: int | None, who: str, what: str = "EMA copy") -> torch.nn.Module:
    """``module.ema_nets[ema]``, or the online ``module.net`` for None; a clear error, naming the option ``what``,
    for a copy it does not keep."""
    if ema is None:
        return module.net
    ema_nets = getattr(module, "ema_nets", None)
    if ema_nets is None or not 0 <= ema < len(ema_nets):
        count = 0 if ema_nets is None else len(ema_nets)
        raise ValueError(
            f"{who}: {what} {ema} but the module keeps {count} EMA copies; pick one of them or None for the online "
            "weights"
        )
    return ema_nets[ema]


def settings_diff(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ between a folder's stored settings and a rerun's (the resume check)."""
    return sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))


@dataclass
class SamplingOptions:
    """How to sample, as a config or command line declares it (method.md §6).

    Args:
        sampler: "heun", "euler", "stochastic" or "consistency" (None: the objective's or checkpoint's default).
        steps: grid levels (None: the sampler's default, heun 32, consistency 1).
        cfg: CFG scale w (None or 1: no guidance, §6.2).
        interval: the CFG σ interval in unshifted units, applied as (lo·s_H, hi·s_H]; default the paper's
            (0.19, 1.61]; None (YAML null, "none") guides every level; "lo,hi" strings are accepted.
        labels: "balanced" (N/C per class) or "random" (§6.4).
        seed: image i's noise and label depend only on (seed, i).
    """

    sampler: str | None = None
    steps: int | None = None
    cfg: float | None = None
    interval: tuple[float, float] | str | None = GUIDANCE_INTERVAL
    labels: str = "balanced"
    seed: int = 0

    def __post_init__(self) -> None:
        self.interval = parse_interval(self.interval, "sampling.interval")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise SamplingOptionsError(f"unknown sampler {self.sampler!r}; choose one of {sorted(SAMPLERS)}")
        if self.labels not in LABEL_MODES:
            raise SamplingOptionsError(f"unknown labels {self.labels!r}; choose one of {LABEL_MODES}")
        if self.steps is not None and self.steps < 1:
            raise SamplingOptionsError(f"sampling.steps must be ≥ 1, got {self.steps}")
        if self.seed < 0:
            raise SamplingOptionsError(f"sampling.seed must be ≥ 0, got {self.seed}")

    @classmethod
    def of(cls, value: SamplingOptions | Mapping[str, Any] | None) -> SamplingOptions:
        """Options from an instance, a dict of its fields (a checkpoint's hyper-parameter, YAML) or None."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return dataclasses.replace(value)
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise SamplingOptionsError(f"unknown sampling option(s) {unknown}")
            return cls(**dict(value))
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(cls) if hasattr(value, f.name)}
        return cls(**fields)  # a jsonargparse Namespace

    def as_dict(self) -> dict[str, Any]:
        """Plain fields (the interval as a list) for hyper-parameters, JSON and YAML."""
        out = dataclasses.asdict(self)
        out["interval"] = None if self.interval is None else list(self.interval)
        return out

    @property
    def guidance(self) -> Guidance | None:
        """The CFG :class:`Guidance` (None when ``cfg`` is None or 1)."""
        return as_guidance(None if self.cfg is None else Guidance(float(self.cfg), self.interval))

    def resolved_sampler(self, default: str = "heun") -> str:
        """``sampler``, or ``default`` (the objective's sampler) when it is None."""
        return self.sampler or default

    def settings(self, default_sampler: str = "heun", **overrides: Any) -> SampleSettings:
        """The :class:`SampleSettings` these options give; ``overrides`` set its other fields (num_classes,
        class_counts, autocast, clamp, options, guidance, seed, labels, …)."""
        fields: dict[str, Any] = dict(
            sampler=self.resolved_sampler(default_sampler),
            steps=self.steps,
            guidance=self.guidance,
            labels=self.labels,
            seed=self.seed,
        )
        fields.update(overrides)
        return SampleSettings(**fields)

"""What the three losses share: the call they are made by (:class:`Objective`), the :class:`Terms` they return, the
class-path spec they are configured and checkpointed by, and their seeded draws (method.md §3–§5)."""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from epg.io import seed_from

PACKAGE = "epg.method.objectives"


def gaussian_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard-normal noise shaped like ``x``, drawn from ``generator`` (which must live on x's device)."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def seeded_generator(*key: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch Generator whose seed is a hash of the integers ``key`` (e.g. seed, step, stream, rank)."""
    return torch.Generator(device=device).manual_seed(seed_from(*key))


def nonfinite_span(per_sample: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of ``values`` over the samples whose ``per_sample`` loss is not finite (all samples if none is).

    Device tensors, no host sync: ``values`` are the per-sample noise levels σ' of the batch.
    """
    values = values.detach().float().reshape(-1)
    bad = ~torch.isfinite(per_sample.detach().reshape(-1))
    pick = bad | ~bad.any()
    lo = torch.where(pick, values, torch.full_like(values, math.inf)).amin()
    hi = torch.where(pick, values, torch.full_like(values, -math.inf)).amax()
    return lo, hi


def class_labels(module: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """The labels y of a stage-2 ``batch`` = (x0, y, …) for ``module.net`` (None when it is unconditional)."""
    return batch[1] if module.net.class_embed is not None else None


@dataclass
class Terms:
    """One loss evaluation: what the module minimises, logs and watches for NaN/inf."""

    loss: torch.Tensor  # scalar to minimise
    logs: dict[str, torch.Tensor | float]  # train/<name> every step (a float: the same on every rank)
    span: tuple[torch.Tensor | float, torch.Tensor | float]  # noise levels of the non-finite samples (NaN watch)
    label: str = "σ'"  # what ``span`` measures, in the NaN message


class Objective:
    """A training loss that owns its hyper-parameters (the paper's values are its constructor's defaults), its
    draws and its weights, called the same way by both modules: ``loss(module, batch, updates, generator)``.

    Configured by ``class_path`` (``model.init_args.loss``) and stored in checkpoints as the plain dict
    :meth:`spec`. Subclasses keep every constructor argument as a same-named attribute.
    """

    def __call__(
        self, module: nn.Module, batch: tuple[torch.Tensor, ...], updates: int, generator: torch.Generator
    ) -> Terms:
        """The loss of ``batch`` for the networks of ``module`` after ``updates`` applied optimizer updates.

        ``generator`` draws this batch's noise (the module seeds it per step, micro-batch and rank).
        """
        raise NotImplementedError

    def details(self, terms: Terms) -> dict[str, tuple[torch.Tensor, int]]:
        """Logs of ``terms`` that sync with the device (per-σ buckets), made on logging steps only: name → (value,
        batch size)."""
        return {}

    def init_args(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this loss (all of them, defaults included)."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {name: _plain(getattr(self, name)) for name in names}

    def spec(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}``: how a config names this loss and a checkpoint stores it."""
        cls = type(self)
        public = f"{PACKAGE}.{cls.__name__}"
        path = public if getattr(importlib.import_module(PACKAGE), cls.__name__, None) is cls else _qualified(cls)
        return {"class_path": path, "init_args": self.init_args()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_args().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.init_args() == self.init_args()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]


class FinetuneLoss(Objective):
    """A stage-2 loss: what the fine-tuning module builds and samples around it follows from these attributes."""

    parameterization: ClassVar[str] = "x0"  # the denoiser output it trains (method.md §1.5)
    sampler: ClassVar[str] = "heun"  # the sampler of its checkpoints when none is named (method.md §6)
    needs_target: ClassVar[bool] = False  # a stop-gradient copy of the online network (``module.target_net``)
    needs_aux: ClassVar[bool] = False  # the frozen stage-1 network (``module.aux_net``; needs ``init_from``)
    # AdamW and schedule defaults of the paper for this objective (the module's None arguments pick them).
    betas: ClassVar[tuple[float, float]] = (0.9, 0.999)
    weight_decay: ClassVar[float] = 0.01
    lr_schedule: ClassVar[str] = "cosine"
    grad_clip: ClassVar[float | None] = 0.5


def build_loss(loss: Objective | Mapping | None, base: type[Objective], default: type[Objective]) -> Objective:
    """The loss object of a module argument: an instance, a ``{"class_path", "init_args"}`` dict (a checkpoint's
    hyper-parameters, a parsed config) or None (``default`` with the paper's values); it must be a ``base``."""
    if loss is None:
        return default()
    if isinstance(loss, Mapping):
        loss = loss_class(loss)(**dict(loss.get("init_args") or {}))
    if not isinstance(loss, base):
        raise ValueError(f"loss must be a {base.__name__} ({PACKAGE}), got {type(loss).__name__}")
    return loss


def loss_class(spec: Mapping) -> type[Objective]:
    """The class a ``{"class_path", "init_args"}`` spec names (short names are this package's)."""
    if "class_path" not in spec:
        raise ValueError(f"loss must name its class_path (e.g. {PACKAGE}.DiffusionLoss), got {dict(spec)}")
    module, _, name = str(spec["class_path"]).rpartition(".")
    return getattr(importlib.import_module(module or PACKAGE), name)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# Where the keys of the releases before the loss objects went (model.init_args.<old> → the new dotted key): the CLI
# refuses an old key with a line naming its new one. Nothing reads the old keys any more.
_LOSS_KEYS = {
    **{k: k for k in ("tau_contrastive", "tau_consistency", "tau_schedule", "tau_min", "tau_max")},
    **{k: k for k in ("tau_start", "tau_end", "curriculum_n0", "curriculum_n1", "p_mean", "p_std", "sigma_grid")},
    **{k: k for k in ("ect_d0", "ect_d1", "ect_delta", "ect_q", "ect_kappa", "ect_b", "huber_c")},
    **{"aux_weight": "aux_weight", "aux_tau": "aux_tau", "loss_weighting": "weighting", "ect_weighting": "weighting"},
}
_SAMPLING_KEYS = {
    "sample_sampler": "sampler",
    "sample_steps": "steps",
    "sample_guidance": "cfg",
    "sample_guidance_interval": "interval",
    "grid_seed": "seed",
}
MOVED_KEYS: dict[str, str] = {
    **{f"model.init_args.{old}": f"model.init_args.loss.init_args.{new}" for old, new in _LOSS_KEYS.items()},
    **{f"model.init_args.{old}": f"model.init_args.sampling.{new}" for old, new in _SAMPLING_KEYS.items()},
    "model.init_args.objective": "model.init_args.loss.class_path",
}

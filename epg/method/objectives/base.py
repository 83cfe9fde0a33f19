"""What the three losses share: the class-path spec they are configured and checkpointed by, the noise draw, and the
map of the flat hyper-parameters of older configs and checkpoints onto the loss objects (method.md §3–§5)."""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

PACKAGE = "epg.method.objectives"


def gaussian_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard-normal noise shaped like ``x``, drawn from ``generator`` (which must live on x's device)."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


_DEFAULT_LOSSES: dict[str, type] = {}  # objective string → the package's loss class (filled by subclassing)


class Objective:
    """A training loss that owns its hyper-parameters (the paper's values are its constructor's defaults), its
    noise draws and its weights. Configured by ``class_path`` (``model.init_args.loss``) and stored in checkpoints
    as the plain dict :meth:`spec`. Subclasses keep every constructor argument as a same-named attribute."""

    objective: ClassVar[str] = ""  # the module's objective string ("rcm", "diffusion", "consistency")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The package's own loss of each objective string is its default (a user's subclass never replaces it).
        if "objective" in cls.__dict__ and cls.__module__.startswith(f"{PACKAGE}."):
            _DEFAULT_LOSSES.setdefault(cls.objective, cls)

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
    """A stage-2 loss (``DiffusionLoss`` or ``ConsistencyLoss``): ``objective`` names it in checkpoints and
    ``parameterization`` is the denoiser output it trains (method.md §1.5)."""

    parameterization: str = "x0"


def build_loss(loss: Objective | Mapping | None, base: type[Objective], default: type[Objective]) -> Objective:
    """The loss object of a module argument: an instance, a ``{"class_path", "init_args"}`` dict (a checkpoint's
    hyper-parameters, a parsed config) or None (``default`` with the paper's values); it must be a ``base``."""
    if loss is None:
        return default()
    if isinstance(loss, Mapping):
        if "class_path" not in loss:
            raise ValueError(f"loss must name its class_path (e.g. {PACKAGE}.{default.__name__}), got {dict(loss)}")
        module, _, name = str(loss["class_path"]).rpartition(".")
        cls = getattr(importlib.import_module(module or PACKAGE), name)
        loss = cls(**dict(loss.get("init_args") or {}))
    if not isinstance(loss, base):
        raise ValueError(f"loss must be a {base.__name__} ({PACKAGE}), got {type(loss).__name__}")
    return loss


# ---- the flat hyper-parameters before the loss objects (configs and checkpoints of older versions) -----------------
# old model.init_args key -> the loss class's init arg, per module (stage 1) or objective (stage 2)
LEGACY_KEYS: dict[str, dict[str, str]] = {
    "rcm": {
        k: k
        for k in (
            "tau_contrastive",
            "tau_consistency",
            "tau_schedule",
            "tau_min",
            "tau_max",
            "tau_start",
            "tau_end",
            "curriculum_n0",
            "curriculum_n1",
        )
    },
    "diffusion": {"p_mean": "p_mean", "p_std": "p_std", "sigma_grid": "sigma_grid", "loss_weighting": "weighting"},
    "consistency": {
        **{k: k for k in ("p_mean", "p_std", "ect_d0", "ect_d1", "ect_delta", "ect_q", "ect_kappa", "ect_b")},
        **{k: k for k in ("huber_c", "aux_weight", "aux_tau")},
        "ect_weighting": "weighting",
    },
}
# Keys every older stage-2 module took, whichever its objective (the other objective's are dropped on migration).
STAGE2_LEGACY = {*LEGACY_KEYS["diffusion"], *LEGACY_KEYS["consistency"]}


def legacy_key_message(key: str, kind: str) -> str | None:
    """Where an old flat ``model.init_args`` key of a ``kind`` ("rcm" or "finetune") module went; None if not one."""
    kinds = ("rcm",) if kind == "rcm" else ("diffusion", "consistency")
    found = [(k, LEGACY_KEYS[k][key]) for k in kinds if key in LEGACY_KEYS[k]]
    if not found:
        return None
    names = {"rcm": "RCMLoss", "diffusion": "DiffusionLoss", "consistency": "ConsistencyLoss"}
    new = "/".join(sorted({name for _, name in found}))
    classes = " or ".join(f"{PACKAGE}.{names[k]}" for k, _ in found)
    return f"moved into the loss object: set model.init_args.loss.init_args.{new} (loss class_path {classes})"


def split_legacy(hparams: Mapping[str, Any], kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(other hyper-parameters, loss init args) of old flat ``hparams``; ``kind`` is "rcm", "diffusion" or
    "consistency". The other stage-2 objective's keys, which older modules kept unused, are dropped."""
    table = LEGACY_KEYS[kind]
    rest, loss = {}, {}
    for key, value in hparams.items():
        if key in table:
            if value is not None:  # None was "the objective's default" (p_mean)
                loss[table[key]] = value
        elif kind == "rcm" or key not in STAGE2_LEGACY:
            rest[key] = value
    return rest, loss


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def legacy_loss(
    loss: Objective | Mapping | None,
    legacy: Mapping[str, Any],
    kind: str,
    base: type[Objective],
    default: type[Objective],
) -> Objective:
    """A module's loss object from its ``loss`` argument and the flat ``legacy`` keyword arguments of an older
    config or checkpoint (``kind``: "rcm", "diffusion" or "consistency"): the old keys become the default loss's
    init args, with a deprecation warning; an unknown key is a TypeError, as for any constructor."""
    unknown = sorted(set(legacy) - set(LEGACY_KEYS[kind]) - (STAGE2_LEGACY if kind != "rcm" else set()))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)}")
    if not legacy:
        return build_loss(loss, base, default)
    if loss is not None:
        raise ValueError(
            f"give the loss settings in loss.init_args only, not also as {', '.join(sorted(legacy))} beside loss"
        )
    _, init_args = split_legacy(legacy, kind)
    warnings.warn(
        f"flat loss keys {', '.join(sorted(legacy))} are deprecated: they moved into the loss object "
        f"(loss={{class_path: {PACKAGE}.{default.__name__}, init_args: {init_args}}})",
        DeprecationWarning,
        stacklevel=3,
    )
    return default(**init_args)


def loss_kind(hparams: Mapping[str, Any]) -> str:
    """ "rcm" for a stage-1 module's hyper-parameters, else the stage-2 objective ("diffusion" by default)."""
    return str(hparams.get("objective") or "diffusion") if "objective" in hparams else "rcm"


def default_loss(kind: str) -> type[Objective]:
    """The loss class of a kind ("rcm", "diffusion", "consistency")."""
    return _DEFAULT_LOSSES[kind]


def loss_spec(value: Objective | Mapping | None, kind: str) -> dict[str, Any]:
    """The full ``{"class_path", "init_args"}`` of a module's ``loss`` value (None: the kind's default loss)."""
    return build_loss(value, Objective, default_loss(kind)).spec()


def migrate_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """A module's hyper-parameters with the flat loss keys of older checkpoints moved into ``loss`` (a spec)."""
    hparams = dict(hparams)
    kind = loss_kind(hparams)
    if "loss" in hparams or not set(hparams) & set(LEGACY_KEYS[kind]):
        return hparams
    rest, init_args = split_legacy(hparams, kind)
    return {**rest, "loss": default_loss(kind)(**init_args).spec()}

"""What `epg fit` checks before it resumes a run: the run folder's last checkpoint, the hyper-parameters that changed
since it was written (refused unless ``--accept_changed_hparams``), and the logger version it continues."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
from collections.abc import Mapping
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from epg.data.shards import is_remote
from epg.io import recover_interrupted_swap
from epg.lightning.base import EPGModule
from epg.lightning.faults import ConfigError, LoggerVersions
from epg.method.objectives import DiffusionLoss, Objective, RCMLoss, build_loss
from epg.nn.presets import ENCODER_FIELDS, get_config
from epg.sampling.options import SamplingOptions

ACCEPT = "accept_changed_hparams"
# Hyper-parameters a resume may change freely (where files are, how fast a step runs) ...
RESUME_FREE = {
    "model": {"init_from", "init_preset", "export_path", "compile", "optimizer_impl", "max_consecutive_skips"},
    "data": {
        "train_shards",
        "val_shards",
        "num_workers",
        "shard_records",
        "allow_damaged_shards",
        "rank",
        "world_size",
    },
    "network": {"grad_checkpointing"},
}
# ... and those it never can, even with --accept_changed_hparams: the checkpoint's tensors would not fit.
ARCHITECTURE = {"model": {"preset"}, "data": {"stage"}}
NETWORK_TUNABLE = {"drop"}  # network fields that are no shape
STAGE1_FIELDS = (*ENCODER_FIELDS, "dec_depth")  # network fields a fine-tuning run may take from its init_from


@dataclasses.dataclass
class Change:
    """A hyper-parameter whose config value differs from the checkpoint's."""

    option: str
    old: Any
    new: Any
    fixed: bool = False  # no resume can change it

    def __str__(self) -> str:
        return f"{self.option} {_show(self.old)} -> {_show(self.new)}"


def last_checkpoint(folder: str) -> str | None:
    """``folder/last.ckpt`` if it exists (a sharded folder that a crash left as ``.last.ckpt.old`` renamed back
    first, see :func:`epg.io.recover_interrupted_swap`), else None."""
    path = os.path.join(folder, "last.ckpt")
    recover_interrupted_swap(path)
    return path if os.path.exists(path) else None


def resolve_checkpoint(ckpt_path: str | None, trainer: Namespace, subcommand: str) -> str | None:
    """The checkpoint a subcommand loads: "last" is the run's ``last.ckpt`` (``fit``: None when there is none, so that
    it starts at step 0; ``validate``/``predict``: a :class:`ConfigError`); Lightning's other names pass through."""
    if ckpt_path is None or str(ckpt_path) in ("best", "hpc") or str(ckpt_path).startswith("registry"):
        return ckpt_path
    if ckpt_path != "last":
        if not is_remote(str(ckpt_path)) and not os.path.exists(ckpt_path):
            raise ConfigError("ckpt_path", f"{ckpt_path} does not exist")
        return ckpt_path
    specs = checkpoint_specs(trainer)  # the first that saves last.ckpt, as SigtermCheckpoint's
    folders = [s.init_args.get("dirpath") for s in sorted(specs, key=lambda s: not s.init_args.get("save_last"))]
    if not folders or folders[0] is None:
        if subcommand == "fit":
            return "last"  # Lightning's search, in the folder it picks
        raise ConfigError("ckpt_path", "the config has no ModelCheckpoint folder to find the last checkpoint in")
    found = last_checkpoint(str(folders[0]))
    if subcommand == "fit":
        text = f"resuming from {found}" if found else f"no last checkpoint in {folders[0]}: starting at step 0"
        rank_zero_info(f"epg fit: {text} (--ckpt_path last)")
    elif not found:
        raise ConfigError(
            "ckpt_path",
            f"no checkpoint of this run in {folders[0]}: train it first (epg fit with the same config) or pass "
            "--ckpt_path FILE",
        )
    else:
        rank_zero_info(f"epg {subcommand}: {found} (--ckpt_path last)")
    return found


def checkpoint_specs(trainer: Namespace) -> list[Namespace]:
    """The ModelCheckpoint ``class_path`` specs of ``trainer.callbacks``."""
    specs = [s for s in as_list(trainer.get("callbacks")) if isinstance(s, Namespace) and s.get("class_path")]
    return [s for s in specs if issubclass(_class(str(s.class_path)), ModelCheckpoint)]


def _class(path: str) -> type:
    module, _, name = path.rpartition(".")
    with contextlib.suppress(ImportError, AttributeError, ValueError):
        found = getattr(importlib.import_module(module), name)
        return found if isinstance(found, type) else object
    return object


def resumed_network(saved: Mapping, explicit: Mapping) -> dict:
    """The network of a run resumed from hyper-parameters ``saved``: the checkpoint's, with the config's
    (``explicit``) values of the fields that are no shape. Resuming never reads ``init_from``."""
    kept = {k: v for k, v in explicit.items() if k in NETWORK_TUNABLE | RESUME_FREE["network"]}
    return {**network_dict(saved.get("network")), **kept}


def check_resume(checkpoint: str, changes: list[Change], fit: bool, accept: bool) -> list[Change]:
    """The ``changes`` a run continues with; a :class:`ConfigError` for a change of shape (always) or of any other
    hyper-parameter when ``fit`` resumes without ``accept``."""
    fixed = [c for c in changes if c.fixed]
    if fixed:
        advice = "start a new run in another trainer.default_root_dir" if fit else "use its config"
        text = "; ".join(map(str, fixed))
        raise ConfigError("ckpt_path", f"{checkpoint} holds another network or stage than the config: {text}; {advice}")
    if not fit or not changes:
        return []
    if not accept:
        raise ConfigError(
            "ckpt_path",
            f"{checkpoint} was trained with other hyper-parameters: {'; '.join(map(str, changes))}; pass --{ACCEPT} "
            "to continue with the new values, or start a new run in another trainer.default_root_dir",
        )
    rank_zero_info(
        f"epg fit: continuing {checkpoint} with changed hyper-parameters (--{ACCEPT}): {changes_text(changes)}"
    )
    return changes


def changes_text(changes: list[Change]) -> str:
    return "; ".join(map(str, changes))


def hparam_changes(
    model: Mapping, network: Mapping, data: Mapping, saved: Mapping, saved_data: Mapping
) -> list[Change]:
    """How the config (model init args, its network overrides and data args) differs from a checkpoint's saved
    hyper-parameters, leaving out what a resume may change freely (:data:`RESUME_FREE`)."""
    if ("init_from" in model) != ("init_from" in saved):  # only stage 2 starts from a stage-1 file
        stage = {True: "stage 2 (FinetuneModule)", False: "stage 1 (PretrainModule)"}
        return [Change("model.class_path", stage["init_from" in saved], stage["init_from" in model], fixed=True)]
    changes = _loss_changes(model, saved) if "loss" in model and "loss" in saved else []
    if "init_from" in saved:
        changes += _sampling_changes(model.get("sampling"), saved.get("sampling"))
    for key in sorted(set(model) & set(saved) - RESUME_FREE["model"] - {"network", "loss", "sampling"}):
        old, new = _norm(saved[key]), _norm(model[key])
        if key == "ema_rates" and len(old or []) != len(new or []):
            changes.append(Change(f"model.init_args.{key}", old, new, fixed=True))
        elif old != new:
            changes.append(Change(f"model.init_args.{key}", old, new, fixed=key in ARCHITECTURE["model"]))
    if "preset" in saved and saved.get("preset") == model.get("preset"):
        changes += _network_changes(saved["preset"], network_dict(saved.get("network")), dict(network))
    for key in sorted(set(data) & set(saved_data) - RESUME_FREE["data"]):
        old, new = _norm(saved_data[key]), _norm(data[key])
        if old != new:
            changes.append(Change(f"data.{key}", old, new, fixed=key in ARCHITECTURE["data"]))
    return changes


def _loss_changes(model: Mapping, saved: Mapping) -> list[Change]:
    """How the config's loss object differs from the checkpoint's: its class, or each init arg that differs."""
    default = DiffusionLoss if "init_from" in saved else RCMLoss
    try:
        old = build_loss(_plain(saved["loss"]), Objective, default).spec()
        new = build_loss(_plain(model["loss"]), Objective, default).spec()
    except (ValueError, TypeError, ImportError, AttributeError):
        return []  # the module's constructor names the bad value
    if old["class_path"] != new["class_path"]:  # another objective: other networks (the CM's aux_net)
        return [Change("model.init_args.loss.class_path", old["class_path"], new["class_path"], fixed=True)]
    old_args, new_args = _norm(old["init_args"]), _norm(new["init_args"])
    prefix = "model.init_args.loss.init_args"
    return [Change(f"{prefix}.{k}", old_args[k], new_args[k]) for k in sorted(old_args) if old_args[k] != new_args[k]]


def _sampling_changes(new: Any, old: Any) -> list[Change]:
    """How the config's grid sampling options differ from the checkpoint's, field by field (defaults filled in)."""
    try:
        old, new = SamplingOptions.of(_plain(old)).as_dict(), SamplingOptions.of(_plain(new)).as_dict()
    except (ValueError, TypeError):
        return []  # the module's constructor names the bad value
    return [Change(f"model.init_args.sampling.{k}", old[k], new[k]) for k in sorted(old) if old[k] != new[k]]


def _network_changes(preset: str, old: dict, new: dict) -> list[Change]:
    """Network fields that differ; those the config leaves out that a fine-tuning run took from its init_from
    (``STAGE1_FIELDS``) are the checkpoint's."""
    taken = {k: v for k, v in old.items() if k in STAGE1_FIELDS and k not in new}
    try:
        before, after = get_config(preset, **old), get_config(preset, **{**taken, **new})
    except (ValueError, TypeError):
        return []  # check_config names the bad value
    return [
        Change(
            f"model.init_args.network.{f.name}",
            getattr(before, f.name),
            getattr(after, f.name),
            f.name not in NETWORK_TUNABLE,
        )
        for f in dataclasses.fields(before)
        if f.name not in RESUME_FREE["network"] and getattr(before, f.name) != getattr(after, f.name)
    ]


def continue_logging(trainer: Namespace, meta: Mapping) -> None:
    """Point the config's loggers at the versions that wrote the checkpoint ``meta`` (recorded by
    :class:`LoggerVersions`; TensorBoard also hides what it logged after the checkpoint's step, ``purge_step``).
    Lightning's default logger (no ``trainer.logger``), TensorBoard in ``default_root_dir``, is spelled out for it."""
    versions = list(meta.get(LoggerVersions.KEY) or [])
    if not versions:
        return
    if trainer.get("logger") in (None, True):
        init = Namespace(save_dir=trainer.get("default_root_dir") or os.getcwd(), version=None, purge_step=None)
        trainer.logger = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger", init_args=init)
    specs = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
    for spec, version in zip(specs, versions, strict=False):
        init = spec.get("init_args") if isinstance(spec, Namespace) else None
        if init is None or "version" not in init or init.get("version") is not None or version is None:
            continue
        init.version = version
        if "purge_step" in init and init.get("purge_step") is None:
            init.purge_step = int(meta.get("global_step", 0))


class AcceptedChanges(Callback):
    """On a resume with ``--accept_changed_hparams``: the optimizer hyper-parameters of the current config (lr, betas,
    weight decay, eps) replace the checkpoint's in its optimizer and LR-schedule states, and the accepted changes are
    logged (TensorBoard text ``epg/accepted_changes``)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        fresh = pl_module.configure_optimizers()
        fresh = fresh["optimizer"] if isinstance(fresh, dict) else fresh
        updates = int(checkpoint.get("epg_updates", 0))
        scale = pl_module.lr_multiplier(updates) if isinstance(pl_module, EPGModule) else 1.0
        saved = checkpoint.get("optimizer_states") or []
        for new, old in zip(fresh if isinstance(fresh, list | tuple) else [fresh], saved, strict=False):
            for group, stored in zip(new.param_groups, old["param_groups"], strict=True):
                stored.update({k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr")})
                stored["initial_lr"] = group.get("initial_lr", group["lr"])
                stored["lr"] = stored["initial_lr"] * scale
        for scheduler, old in zip(checkpoint.get("lr_schedulers") or [], saved, strict=False):
            scheduler["base_lrs"] = [g["initial_lr"] for g in old["param_groups"]]
            scheduler["_last_lr"] = [g["lr"] for g in old["param_groups"]]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                experiment.add_text("epg/accepted_changes", self.text, trainer.global_step)


def as_list(value: Any) -> list:
    """None as [], a list or tuple as a list, anything else as a one-item list."""
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def network_dict(network: Any) -> dict:
    """A config's ``network`` (a Namespace of NetworkOptions fields, a dict or None) as the fields it sets."""
    return {k: v for k, v in dict(_plain(network) or {}).items() if v is not None}


def _norm(value: Any) -> Any:
    """Namespaces and mappings as dicts and tuples as lists, recursively, to compare saved with parsed values."""
    value = _plain(value)
    if isinstance(value, Mapping):
        return {k: _norm(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_norm(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    """A jsonargparse Namespace (nested) as plain dicts."""
    return value.as_dict() if hasattr(value, "as_dict") else value


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)

"""The checks and model-given defaults of an `epg` config; its mistakes end as one-line errors (:class:`ConfigError`
naming the option): keys that moved or follow another, GPUs the machine lacks, data that disagrees with the model
network, missing shards or stage-1 files, and the errors of the classes built from the config. Also the run-folder
paths, the network the data defaults need before the model is built, and the Lightning notes `epg` silences."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from epg.checkpoint import stage1_config
from epg.data.shards import expand_shards, is_remote
from epg.lightning import resume
from epg.lightning.faults import ConfigError
from epg.lightning.resume import checkpoint_specs, network_dict
from epg.method.objectives import MOVED_KEYS
from epg.nn.official import CheckpointMismatchError
from epg.nn.presets import NetworkOptions, get_config, with_stage1_encoder

LINK = ("data.normalization", "model.init_args.normalization")  # the model's follows the data's
FROM_MODEL = ("image_size", "num_classes")  # data options that default to the model network's
_NETWORK_FIELDS = [f.name for f in dataclasses.fields(NetworkOptions)]


def refuse_given(args: Any) -> None:
    """A :class:`ConfigError` when ``args`` (a flag, or a config file they name) set a key that moved
    (:data:`~epg.method.objectives.MOVED_KEYS`) or one that follows another (jsonargparse would silently replace it)."""
    if not isinstance(args, list | tuple):
        return
    args = [str(a) for a in args]
    given = [(a.split("=", 1)[0].lstrip("-"), a) for a in args if a.startswith("--")]
    files = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-c", "--config")]
    for path in files + [a.split("=", 1)[1] for a in args if a.startswith("--config=")]:
        with contextlib.suppress(OSError, yaml.YAMLError), open(path) as f:
            given += [(key, path) for key in _dotted(yaml.safe_load(f))]
    for key, where in given:
        key = re.sub(r"^model\.(?!init_args\.|class_path)", "model.init_args.", key)
        if key == LINK[1]:
            raise ConfigError(key, f"follows {LINK[0]} (they must agree), so set {LINK[0]} instead (given in {where})")
        if key in MOVED_KEYS:
            raise ConfigError(key, f"moved: set {MOVED_KEYS[key]} (given in {where})")


def check_devices(trainer: Namespace) -> None:
    """A :class:`ConfigError` when the config asks for GPUs that this machine does not have."""
    accelerator = trainer.get("accelerator")
    if not isinstance(accelerator, str) or accelerator not in ("gpu", "cuda"):
        return
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices = trainer.get("devices")
    if available < (devices if isinstance(devices, int) and devices > 0 else 1):
        raise ConfigError(
            "trainer.accelerator",
            f"{accelerator} with {devices} device(s), but this machine has {available} CUDA GPU(s); on the CPU run "
            "with --trainer.accelerator cpu --trainer.devices 1 --trainer.strategy auto --trainer.precision 32-true"
            if available == 0
            else f"{accelerator} with {devices} device(s), but this machine has {available}; set trainer.devices",
        )


def derive_run_paths(trainer: Namespace, model_args: Namespace) -> None:
    """Paths in the run folder ``trainer.default_root_dir``: each ModelCheckpoint's ``dirpath`` and a relative
    stage-1 ``export_path``."""
    root = trainer.get("default_root_dir")
    if not root:
        return
    for spec in checkpoint_specs(trainer):
        if spec.init_args.get("dirpath") is None:
            spec.init_args.dirpath = os.path.join(root, "checkpoints")
    export = model_args.get("export_path")
    if export and not is_remote(str(export)) and not os.path.isabs(export):
        model_args.export_path = os.path.join(root, export)


def config_network(model_args: Namespace, explicit: Mapping, saved: Mapping) -> dict:
    """The model network, written into ``model_args.network``: a resume's is the checkpoint's (hyper-parameters
    ``saved``; ``init_from`` is not read); a fine-tuning run's takes the encoder of its stage-1 file, which the data
    defaults (:func:`fill_from_model`) and checks (:func:`check_config`) need before the model is built."""
    network = dict(explicit)
    if "preset" in saved:
        network = resume.resumed_network(saved, explicit)
    elif model_args.get("init_from") and os.path.exists(str(model_args.init_from)):
        with contextlib.suppress(ValueError, TypeError, KeyError):  # check_config names a bad preset or file
            stage1 = stage1_config(model_args.init_from, model_args.get("init_preset") or model_args.get("preset"))
            network = network if stage1 is None else with_stage1_encoder(model_args.preset, network, stage1)
    if "network" in model_args:
        model_args.network = Namespace(**{f: network.get(f) for f in _NETWORK_FIELDS}) if network else None
    return network


def fill_from_model(data: Namespace, model_args: Namespace, network: Mapping) -> None:
    """Set the data options of :data:`FROM_MODEL` left unset to the model network's (preset + ``network``)."""
    if "preset" not in model_args or all(data.get(key) is not None for key in FROM_MODEL):
        return
    try:
        config = get_config(model_args["preset"], **network)
    except (ValueError, TypeError):
        return  # check_config names the bad value
    if data.get("image_size") is None:
        data.image_size = config.image_size
    if data.get("num_classes") is None:
        if not config.num_classes:
            raise ConfigError(
                "data.num_classes", "is not set and the network is unconditional: set it to the classes in the shards"
            )
        data.num_classes = config.num_classes


def default_max_steps(trainer: Namespace, model_args: Namespace) -> None:
    """``trainer.max_steps`` defaults to the model's ``total_steps`` (the schedule's length, given once); a config may
    still set it lower to stop a run early, which a link (a target no config may set) would forbid."""
    total = model_args.get("total_steps")
    if not total:
        return
    if trainer.get("max_steps") in (None, -1) and trainer.get("max_epochs") is None:
        trainer.max_steps = total
    elif trainer.get("max_steps", -1) > total:
        rank_zero_warn(
            f"trainer.max_steps {trainer.max_steps} runs past model.init_args.total_steps {total}, where the LR "
            "schedule ends: to train longer, raise total_steps instead (trainer.max_steps follows it)"
        )


def check_config(model_args: Mapping, data: Mapping, subcommand: str | None = None, resuming: bool = False) -> None:
    """Fail fast, naming the option, on a bad preset/network, image size or class count, missing shards or stage-1
    file (not needed when ``resuming``). Without a ``subcommand`` the data is not checked against model or disk."""
    if "preset" in model_args:
        network = network_dict(model_args.get("network"))
        try:
            config = get_config(model_args["preset"], **network)
        except (ValueError, TypeError) as err:
            raise ConfigError(_network_option(str(err), network), str(err)) from None
        described = f"the model ({model_args['preset']}, network overrides {network or None})"
        size, classes = data.get("image_size"), data.get("num_classes")
        if subcommand and size is not None and size != config.image_size:
            raise ConfigError(
                "data.image_size",
                f"{size} px, but {described} takes {config.image_size} px; set data.image_size: {config.image_size} "
                f"(or leave it out) or model.init_args.network.image_size: {size}",
            )
        if (
            subcommand
            and "init_from" in model_args
            and config.num_classes
            and classes not in (None, config.num_classes)
        ):
            raise ConfigError(
                "data.num_classes",
                f"{classes}, but {described} has {config.num_classes} classes (its CFG null label is the class "
                f"count); set data.num_classes: {config.num_classes} (or leave it out) or "
                f"model.init_args.network.num_classes: {classes}",
            )
    init_from = model_args.get("init_from")
    if init_from and not resuming and not is_remote(str(init_from)) and not os.path.exists(init_from):
        raise ConfigError(
            "model.init_args.init_from",
            f"stage-1 checkpoint {init_from} does not exist; train stage 1 first (epg fit -c configs/pretrain/...) "
            "or point it at an RCM file",
        )
    if subcommand in (None, "predict"):  # predict samples from noise: it reads no shards
        return
    if subcommand == "fit" and data and not data.get("train_shards"):
        raise ConfigError("data.train_shards", "is not set; pass shards such as data/train/train-{000000..000004}.tar")
    for name in ("train_shards", "val_shards"):
        if data.get(name):
            try:
                expand_shards(str(data[name]))
            except (FileNotFoundError, ValueError) as err:
                raise ConfigError(f"data.{name}", str(err)) from None


def _network_option(message: str, network: Mapping) -> str:
    if message.startswith("unknown preset"):
        return "model.init_args.preset"
    named = [key for key in network if re.search(rf"\b{re.escape(key)}\b", message)]
    return (
        f"model.init_args.network.{named[0]}"
        if named
        else "model.init_args.network"
        if network
        else "model.init_args.preset"
    )


def config_error(err: BaseException, config: Mapping, sections: tuple[str, ...]) -> ConfigError:
    """``err``, raised while building or setting up the ``sections`` ("model", "data", "trainer") of ``config``, as
    a :class:`ConfigError` naming the option that its message names first (none: the message alone); jsonargparse's
    errors that quote the constructor's (their ``__cause__``) stand aside for it."""
    options = []
    for section in sections:
        values, prefix = config.get(section) or {}, section
        if section == "model":
            values, prefix = values.get("init_args") or {}, "model.init_args"
            loss = values.get("loss") if isinstance(values.get("loss"), Mapping) else {}
            options += [f"{prefix}.loss.init_args.{key}" for key in loss.get("init_args") or {}]
        options += [f"{prefix}.{key}" for key in values]
    while err.__cause__ is not None and not isinstance(err, ConfigError | CheckpointMismatchError):
        if str(err.__cause__) not in str(err):  # not a wrapper that quotes its cause
            break
        err = err.__cause__
    if isinstance(err, ConfigError):
        return err
    if isinstance(err, CheckpointMismatchError):
        return ConfigError("model.init_args.init_from", str(err))
    message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    named = [(m.start(), o) for o in options if (m := re.search(rf"(?<![\w.]){o.rpartition('.')[2]}\b", message))]
    return ConfigError(min(named)[1] if named else "", message)


def _dotted(tree: Any, prefix: str = "") -> list[str]:
    """The dotted keys of a nested mapping (a YAML config), inner nodes included."""
    if not isinstance(tree, Mapping):
        return []
    return [k for key, value in tree.items() for k in (f"{prefix}{key}", *_dotted(value, f"{prefix}{key}."))]


# ---- quiet where Lightning's notes are expected ----------------------------------------------------------------------
class _QuietLightning(logging.Filter):
    """Drops Lightning's litlogger/litmodels tips and the model summary's "0 Total Flops" line (epg counts the FLOPs
    analytically: epg.lightning.callbacks.Throughput)."""

    FLOPS = re.compile(r"\n0\s+Total Flops")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("💡 Tip"):
            return False
        if self.FLOPS.search(message):
            record.msg, record.args = self.FLOPS.sub("", message), ()
        return True


def quiet_lightning_logs() -> None:
    """Install :class:`_QuietLightning` on the Lightning loggers that print those lines (once per process)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.callbacks.model_summary"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietLightning) for f in logger.filters):
            logger.addFilter(_QuietLightning())


def eval_modules_are_frozen_copies(model: L.LightningModule) -> bool:
    """True when every module that stays in eval mode in training mode lies in a frozen top-level child (the EMA,
    target and stage-1 copies of the EPG modules), so Lightning's "module(s) in eval mode" note says nothing new."""
    was_training = model.training
    model.train()
    frozen = [f"{n}." for n, child in model.named_children() if not any(p.requires_grad for p in child.parameters())]
    expected = all(f"{name}.".startswith(tuple(frozen)) for name, m in model.named_modules() if name and not m.training)
    model.train(was_training)
    return expected

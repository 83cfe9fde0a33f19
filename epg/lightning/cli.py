"""LightningCLI entry point of `epg fit|validate|predict -c CONFIG.yaml`: run folder, resume and fault rules."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning as L
import torch
import yaml
from jsonargparse import Namespace
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from epg.checkpoint import read_checkpoint_meta, stage1_config
from epg.data.datamodule import EPGDataModule
from epg.data.shards import expand_shards, is_remote
from epg.io import recover_interrupted_swap
from epg.lightning.base import EPGModule
from epg.lightning.faults import AtomicCheckpointIO, ConfigError, LoggerVersions, SigtermCheckpoint
from epg.lightning.finetune import FinetuneModule
from epg.lightning.predict import SampleWriter
from epg.lightning.pretrain import PretrainModule
from epg.method.objectives import MOVED_KEYS, DiffusionLoss, Objective, RCMLoss, build_loss
from epg.nn.official import CheckpointMismatchError
from epg.nn.presets import ENCODER_FIELDS, NetworkOptions, get_config, with_stage1_encoder
from epg.sampling.options import SamplingOptions

# Exception types that, raised while building the model/data/trainer from a config, mean a bad config value.
CONFIG_EXCEPTIONS = (ValueError, TypeError, KeyError, FileNotFoundError, CheckpointMismatchError)
MODULES = (PretrainModule, FinetuneModule)  # selectable by name: --model FinetuneModule, --model.help FinetuneModule
CHECKPOINT_SUBCOMMANDS = ("validate", "predict")  # they use a trained checkpoint: --ckpt_path last
LINKS = {"model.init_args.normalization": "data.normalization"}  # target: source, options that must agree
# Lightning types these float-first, so that a YAML `1` became 1.0 = every batch; an int now means batches.
INT_FIRST = tuple(f"trainer.limit_{split}_batches" for split in ("train", "val", "test", "predict"))
FROM_MODEL = ("image_size", "num_classes")  # data options that default to the model's network
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


class EPGCLI(LightningCLI):
    """LightningCLI for :class:`PretrainModule` and :class:`FinetuneModule` (``--model FinetuneModule`` or a
    ``class_path``), with the run-folder, resume and fault rules of ``epg``.

    - One run folder, ``trainer.default_root_dir``: ModelCheckpoint callbacks without a ``dirpath`` save to its
      ``checkpoints/``, Lightning's default logger (no ``trainer.logger``) writes TensorBoard to its
      ``lightning_logs/``, and a relative ``export_path`` (stage 1) lies in it.
    - ``fit`` resumes by default (``--ckpt_path`` defaults to ``last``): the newest ``last*.ckpt`` of the
      ModelCheckpoint folders (or a newer SLURM ``hpc_ckpt_N.ckpt`` in the run folder), else it starts at step 0;
      ``--ckpt_path null`` starts afresh, ``--ckpt_path FILE`` picks a file. A resume compares the checkpoint's
      hyper-parameters with the config and stops, listing the differences, unless ``--accept_changed_hparams`` is
      given: the new values (lr, betas and weight decay in the optimizer too) then take effect and are logged. The
      network and the objective never change on resume. The network comes from the checkpoint, so the stage-1 file
      ``init_from`` need not exist, and the loggers continue their version (one TensorBoard run per run folder).
      Model, optimizer, scheduler, grad scaler, EMA/target weights, update counters, step-seeded noise draws and
      the data stream continue exactly (see epg/data/stream.py, tests/test_resume.py).
    - ``validate``/``test``/``predict`` use the run's last checkpoint unless ``--ckpt_path`` names one, and stop
      with a one-line error when there is none.
    - ``trainer.max_steps`` defaults to the model's ``total_steps`` (the schedule's length, given once); set it only
      to stop a run early. ``data.normalization`` is linked to the model's; ``data.image_size`` and
      ``data.num_classes`` default to the model network's and must agree with it when given. A fine-tuning network
      takes its encoder's shape from ``init_from``.
    - Checkpoints load with ``weights_only=True``; every Trainer gets :class:`AtomicCheckpointIO` (unless the config
      sets another CheckpointIO plugin), :class:`SigtermCheckpoint` (SIGTERM or Ctrl-C saves ``last.ckpt`` at the
      next batch boundary) and :class:`LoggerVersions`.
    - Bad config values, Lightning's MisconfigurationException included, raise :class:`ConfigError` naming the
      option (``epg`` prints it as one line, exit status 2).
    """

    _checkpoint: str | None = None  # the checkpoint this run loads
    _accepted: tuple[Change, ...] | list[Change] = ()  # hyper-parameter changes accepted on resume

    # ---- the parser --------------------------------------------------------------------------------------------------
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for target, source in LINKS.items():
            parser.link_arguments(source, target)
        for action in parser._actions:  # jsonargparse has no public way to retype an argument
            if action.dest in INT_FIRST:
                action._typehint = int | float | None
            elif action.dest in {f"data.{key}" for key in FROM_MODEL}:
                action._typehint = int | None
                action.help = f"{action.help} Default: the model network's; when given, it must agree with it."
        parser.set_defaults({f"data.{key}": None for key in FROM_MODEL})

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        # LightningCLI has no public hook for the defaults of subcommand (Trainer.fit) arguments; lightning is <2.7.
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        defaults = {"ckpt_path": "last"} if subcommand in ("fit", *CHECKPOINT_SUBCOMMANDS) else {}
        if subcommand == "predict":  # `epg predict`: epg sample's options as --sample.*; images go to files only
            parser.add_lightning_class_args(SampleWriter, "sample")
            defaults["return_predictions"] = False
        if "weights_only" in self._subcommand_method_arguments.get(subcommand, []):
            defaults["weights_only"] = True
        if defaults:
            parser.set_defaults(defaults)
        if subcommand == "fit":
            parser.add_argument(
                f"--{ACCEPT}",
                type=bool,
                nargs="?",
                const=True,
                default=False,
                help="resume although the config's hyper-parameters differ from the checkpoint's: the new values "
                "take effect and are logged (without it such a resume stops, listing the differences)",
            )
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        given = sys.argv[1:] if args is None else args
        refuse_link_targets(given)
        refuse_moved_keys(given)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within")
            super().parse_arguments(parser, args)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and predict: no ``test``, as there is no test split (`epg test` says what to run instead)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "test"}

    def _section(self) -> Any:
        subcommand = self.config.get("subcommand")
        return self.config[subcommand] if subcommand else self.config

    # ---- before the classes are built: the run folder, the checkpoint, the network -----------------------------------
    def before_instantiate_classes(self) -> None:
        subcommand, cfg = self.config.get("subcommand"), self._section()
        trainer = cfg.get("trainer") or Namespace()
        check_devices(trainer)
        root = trainer.get("default_root_dir")
        model = cfg.get("model")
        args = model.get("init_args") if isinstance(model, Namespace) else None
        args = args if args is not None else Namespace()
        derive_run_paths(trainer, args, root)
        self._checkpoint, self._accepted, meta = None, [], {}
        if subcommand in ("fit", *CHECKPOINT_SUBCOMMANDS):
            cfg.ckpt_path = self._checkpoint = resolve_checkpoint(cfg.get("ckpt_path"), trainer, subcommand)
            if self._checkpoint in ("last", "best", "hpc") or str(self._checkpoint).startswith("registry"):
                self._checkpoint = None  # resolved by the Trainer (last: no checkpoint folder in the config)
            if self._checkpoint and not is_remote(str(self._checkpoint)):
                meta = read_checkpoint_meta(self._checkpoint)
        explicit = network = _network_dict(args.get("network"))
        saved = dict(meta.get("hyper_parameters") or {})
        if "preset" in saved:  # the checkpoint's network: resuming never reads init_from
            kept = _pick(explicit, NETWORK_TUNABLE | RESUME_FREE["network"])
            network = {**_network_dict(saved.get("network")), **kept}
        elif args.get("init_from") and not is_remote(str(args.init_from)) and os.path.exists(args.init_from):
            with contextlib.suppress(ValueError, TypeError, KeyError):  # check_config names a bad preset or file
                stage1 = stage1_config(args.init_from, args.get("init_preset") or args.get("preset"))
                if stage1 is not None:
                    network = with_stage1_encoder(args.preset, network, stage1)
        if "network" in args:
            args.network = Namespace(**{f: network.get(f) for f in _NETWORK_FIELDS}) if network else None
        data = cfg.get("data")
        if data is not None:
            fill_from_model(data, _plain(args), network)
        if saved:
            self._compare(cfg, explicit, meta, subcommand)
        if subcommand == "fit":
            default_max_steps(trainer, args)
        check_config(_plain(args), _plain(data or {}), subcommand, resuming=self._checkpoint is not None)

    def _compare(self, cfg: Namespace, network: dict, meta: dict, subcommand: str) -> None:
        """Compare the config (``network``: its own overrides) with the checkpoint ``meta`` it resumes or loads."""
        saved, saved_data = dict(meta["hyper_parameters"]), dict(meta.get("datamodule_hyper_parameters") or {})
        args = _plain(cfg.model.get("init_args") or {})
        changes = hparam_changes(args, network, _plain(cfg.get("data") or {}), saved, saved_data)
        fixed = [c for c in changes if c.fixed]
        if fixed:
            advice = "start a new run in another trainer.default_root_dir" if subcommand == "fit" else "use its config"
            raise ConfigError(
                "ckpt_path",
                f"{self._checkpoint} holds another network or stage than the config: {'; '.join(map(str, fixed))}; "
                + advice,
            )
        if subcommand == "fit" and changes:
            if not cfg.get(ACCEPT):
                raise ConfigError(
                    "ckpt_path",
                    f"{self._checkpoint} was trained with other hyper-parameters: {'; '.join(map(str, changes))}; "
                    f"pass --{ACCEPT} to continue with the new values, or start a new run in another "
                    "trainer.default_root_dir",
                )
            self._accepted = changes
        if subcommand == "fit":
            continue_logging(cfg.trainer, meta)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (*CONFIG_EXCEPTIONS, MisconfigurationException) as err:
            converted = config_error(err, _plain(self._section()))
            if converted is None:
                raise
            raise converted from err

    def after_instantiate_classes(self) -> None:
        # Lightning logs the module's and the datamodule's hyper-parameters as one dict and stops when a key of both
        # (seed, normalization) differs: the data's go under "data/" instead (a private attribute, no public hook).
        data = self.datamodule
        if data is not None and getattr(data, "_hparams_initial", None):
            data._hparams_initial = type(data._hparams_initial)(data=dict(data._hparams_initial))

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The configured Trainer plus SigtermCheckpoint, LoggerVersions and AtomicCheckpointIO where it has none."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = _as_list(config.get("callbacks"))
        for kind in (SigtermCheckpoint, LoggerVersions):
            if not any(isinstance(cb, kind) for cb in callbacks):
                callbacks = [*callbacks, kind()]
        kwargs["callbacks"] = callbacks
        plugins = _as_list(config.get("plugins"))
        strategy_io = getattr(config.get("strategy"), "_checkpoint_io", None)
        if strategy_io is None and not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    # ---- running -----------------------------------------------------------------------------------------------------
    def before_fit(self) -> None:
        if _eval_modules_are_frozen_copies(self.model):  # EMA / target / stage-1 copies stay in eval mode by design
            warnings.filterwarnings("ignore", r"Found \d+ module\(s\) in eval mode", PossibleUserWarning)
        if self._checkpoint:  # resuming: the checkpoint folder holds this run's checkpoints
            warnings.filterwarnings("ignore", r"Checkpoint directory .* exists and is not empty")
        if self._accepted:
            text = "; ".join(map(str, self._accepted))
            rank_zero_info(f"epg fit: continuing {self._checkpoint} with changed hyper-parameters (--{ACCEPT}): {text}")
            self.trainer.callbacks.append(AcceptedChanges(text))

    def fit(self, **kwargs: Any) -> None:
        self._run(self.trainer.fit, **kwargs)

    def validate(self, **kwargs: Any) -> None:
        self._run(self.trainer.validate, **kwargs)

    def _run(self, method: Callable, **kwargs: Any) -> None:
        """Run a Trainer method; set-up errors of the data and Lightning's misconfiguration errors become
        :class:`ConfigError`, and a Ctrl-C that saved a checkpoint exits with status 130."""
        section = _plain(self._section())
        try:
            method(**kwargs)
        except SIGTERMException:
            if any(getattr(cb, "interrupted", False) for cb in self.trainer.callbacks):
                raise SystemExit(130) from None
            raise
        except MisconfigurationException as err:
            raise config_error(err, section) or ConfigError("trainer", str(err)) from err
        except (ValueError, FileNotFoundError) as err:
            converted = config_error(err, section, only=("data",), where="setup")
            if converted is None:
                raise
            raise converted from err

    def predict(self, **kwargs: Any) -> None:
        """``trainer.predict`` over the image indices that the :class:`SampleWriter` still has to write."""
        kwargs.pop("datamodule", None)  # the inputs are image indices, not data
        writer = self._get(self.config_init, "sample")
        self._run(self.trainer.predict, dataloaders=writer.dataloader(kwargs.get("ckpt_path")), **kwargs)


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
        for new, old in zip(_as_list(fresh), saved, strict=False):
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


def run_lightning_cli(args: list[str], run: bool = True) -> EPGCLI:
    """Run a Lightning subcommand with ``args`` (e.g. ``["fit", "-c", "configs/demo/pretrain.yaml"]``).

    With ``run=False`` (no subcommand in ``args``) it only parses and instantiates the trainer, model and data.
    Raises :class:`ConfigError` for a bad config value and ``NonFiniteLossError`` for a NaN/inf training loss.
    """
    quiet_lightning_logs()
    with warnings.catch_warnings():
        # `epg` passes its own argv as ``args``; LightningCLI warns whenever sys.argv holds arguments too.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
        return EPGCLI(
            model_class=EPGModule,
            subclass_mode_model=True,
            datamodule_class=EPGDataModule,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )


# ---- the run folder and the checkpoint -------------------------------------------------------------------------------
def derive_run_paths(trainer: Namespace, model_args: Namespace, root: str | None) -> None:
    """Paths given by the run folder ``root`` (``trainer.default_root_dir``): each ModelCheckpoint's ``dirpath``,
    Lightning's default logger (TensorBoard in ``root/lightning_logs``) and a relative stage-1 ``export_path``."""
    if not root:
        return
    for spec in _specs(trainer.get("callbacks")):
        if _is_subclass(spec, ModelCheckpoint) and spec.init_args.get("dirpath") is None:
            spec.init_args.dirpath = os.path.join(root, "checkpoints")
    if trainer.get("logger") in (None, True):
        init = Namespace(save_dir=root, name="lightning_logs", version=None, purge_step=None)
        trainer.logger = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger", init_args=init)
    export = model_args.get("export_path")
    if export and not is_remote(str(export)) and not os.path.isabs(export):
        model_args.export_path = os.path.join(root, export)


def find_last_checkpoint(folders: list[str], root: str | None) -> str | None:
    """The newest ``last*.ckpt`` of ``folders`` or SLURM ``hpc_ckpt_N.ckpt`` of ``root``; None when there is none.

    Lightning's own "last" ignores the hpc checkpoints of SLURM auto-requeue. A sharded ``last.ckpt`` folder that a
    crash left under its hidden ``.last.ckpt.old`` name (see :class:`~epg.lightning.faults.AtomicModelParallelStrategy`)
    is renamed back first.
    """
    last, ext = ModelCheckpoint.CHECKPOINT_NAME_LAST, ModelCheckpoint.FILE_EXTENSION
    for folder in folders:
        recover_interrupted_swap(os.path.join(folder, last + ext))
    found = _files(folders, lambda f: f.startswith(last) and f.endswith(ext))
    if root:
        found += _files([root], lambda f: re.fullmatch(r"hpc_ckpt_\d+\.ckpt", f) is not None)
    return max(found, key=os.path.getmtime) if found else None


def resolve_checkpoint(ckpt_path: str | None, trainer: Namespace, subcommand: str) -> str | None:
    """The checkpoint a subcommand loads: ``last`` becomes the run's last checkpoint (``fit``: None when there is
    none, so that it starts at step 0; ``validate``/``test``/``predict``: a :class:`ConfigError`)."""
    if ckpt_path is None or str(ckpt_path) in ("best", "hpc") or str(ckpt_path).startswith("registry"):
        return ckpt_path  # Lightning's own choices, resolved by the Trainer
    if ckpt_path != "last":
        if not is_remote(str(ckpt_path)) and not os.path.exists(ckpt_path):
            raise ConfigError("ckpt_path", f"{ckpt_path} does not exist")
        return ckpt_path
    folders = [spec.init_args.get("dirpath") for spec in _specs(trainer.get("callbacks")) if _is_ckpt(spec)]
    if not folders or None in folders:
        if subcommand == "fit":
            return "last"  # a folder Lightning resolves later: let it search
        raise ConfigError(
            "ckpt_path", "the config has no ModelCheckpoint folder to find the last checkpoint in: pass a file"
        )
    folders = [str(f) for f in folders]
    found = find_last_checkpoint(folders, trainer.get("default_root_dir"))
    if subcommand == "fit":
        if found:
            rank_zero_info(f"epg fit: resuming from {found} (--ckpt_path last)")
        else:
            rank_zero_info(f"epg fit: no last checkpoint in {', '.join(folders)}: starting at step 0")
        return found
    if not found:
        raise ConfigError(
            "ckpt_path",
            f"no checkpoint of this run in {', '.join(folders)}: train it first (epg fit with the same config) or pass "
            "--ckpt_path FILE",
        )
    rank_zero_info(f"epg {subcommand}: {found} (--ckpt_path last)")
    return found


def continue_logging(trainer: Namespace, meta: dict) -> None:
    """Point the config's loggers at the version that wrote the checkpoint ``meta`` (TensorBoard: also hide what
    that version logged after the checkpoint's step, ``purge_step``), so that a resume continues one run."""
    versions = list(meta.get(LoggerVersions.KEY) or [])
    for i, spec in enumerate(_specs(trainer.get("logger"))):
        init = spec.get("init_args")
        if init is None or "version" not in init or init.get("version") is not None:
            continue
        version = versions[i] if i < len(versions) else _newest_version(init)
        if version is None:
            continue
        init.version = version
        if "purge_step" in init and init.get("purge_step") is None:
            init.purge_step = int(meta.get("global_step", 0))


def _newest_version(init: Namespace) -> int | None:
    """The highest ``version_N`` in a logger's ``save_dir/name`` (for checkpoints that do not record it)."""
    folder = os.path.join(str(init.get("save_dir") or ""), str(init.get("name") or ""))
    found = [int(m.group(1)) for f in _listdir(folder) if (m := re.fullmatch(r"version_(\d+)", f))]
    return max(found) if found else None


def default_max_steps(trainer: Namespace, model_args: Namespace) -> None:
    """``trainer.max_steps`` defaults to the model's ``total_steps``: the schedule's length is given once."""
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


def hparam_changes(
    model: Mapping, network: Mapping, data: Mapping, saved: Mapping, saved_data: Mapping
) -> list[Change]:
    """How the config (model init args, its network overrides and data args) differs from a checkpoint's saved
    hyper-parameters, leaving out what a resume may change freely (:data:`RESUME_FREE`)."""
    if ("init_from" in model) != ("init_from" in saved):  # only stage 2 starts from a stage-1 file
        stage = {True: "stage 2 (FinetuneModule)", False: "stage 1 (PretrainModule)"}
        return [Change("model.class_path", stage["init_from" in saved], stage["init_from" in model], fixed=True)]
    changes = _loss_changes(model, saved) if "loss" in model and "loss" in saved else []
    sampling_keys = {"sampling"}
    if "init_from" in saved:
        changes += _sampling_changes(model, saved)
    for key in sorted(set(model) & set(saved) - RESUME_FREE["model"] - {"network", "loss"} - sampling_keys):
        old, new = _norm(saved[key]), _norm(model[key])
        if key == "ema_rates" and len(old or []) != len(new or []):
            changes.append(Change(f"model.init_args.{key}", old, new, fixed=True))
        elif old != new:
            changes.append(Change(f"model.init_args.{key}", old, new, fixed=key in ARCHITECTURE["model"]))
    if "preset" in saved and saved.get("preset") == model.get("preset"):
        changes += _network_changes(saved["preset"], _network_dict(saved.get("network")), dict(network))
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
    args = "model.init_args.loss.init_args"
    old_args, new_args = _norm(old["init_args"]), _norm(new["init_args"])
    return [Change(f"{args}.{k}", old_args[k], new_args[k]) for k in sorted(old_args) if old_args[k] != new_args[k]]


def _sampling_changes(model: Mapping, saved: Mapping) -> list[Change]:
    """How the config's grid sampling options differ from the checkpoint's, compared field by field."""

    def options(values: Mapping) -> dict | None:
        try:
            return SamplingOptions.of(_plain(values.get("sampling"))).as_dict()
        except (ValueError, TypeError):
            return None  # the module's constructor names the bad value

    old, new = options(saved), options(model)
    if old is None or new is None:
        return []
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


# ---- config checks ---------------------------------------------------------------------------------------------------
def refuse_link_targets(args: Any) -> None:
    """A :class:`ConfigError` when ``args`` (or a config file they name) set an option that follows another
    (:data:`LINKS`): jsonargparse would silently replace the value."""
    if not isinstance(args, list | tuple):
        return
    args = [str(a) for a in args]
    files = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-c", "--config")]
    files += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    for target, source in LINKS.items():
        names = {target, target.replace(".init_args", "")}
        given = [a for a in args if a.split("=", 1)[0].lstrip("-") in names]
        for path in files:
            with contextlib.suppress(OSError, yaml.YAMLError):
                with open(path) as f:
                    loaded = yaml.safe_load(f)
                if any(_lookup(loaded, name) is not None for name in names):
                    given.append(path)
        if given:
            raise ConfigError(
                target, f"follows {source} (they must agree), so set {source} instead (given in {given[0]})"
            )


def refuse_moved_keys(args: Any) -> None:
    """A :class:`ConfigError` naming the new key when ``args``, or a config file they name, set a key of the releases
    before the loss and sampling objects (:data:`~epg.method.objectives.MOVED_KEYS`, e.g. ``model.init_args.p_mean``:
    now ``model.init_args.loss.init_args.p_mean``)."""
    if not isinstance(args, list | tuple):
        return
    args = [str(a) for a in args]
    for arg in args:
        name = arg.split("=", 1)[0].lstrip("-")
        old = name if name in MOVED_KEYS else name.replace("model.", "model.init_args.", 1)
        if arg.startswith("--") and old in MOVED_KEYS:
            raise ConfigError(old, f"moved: set {MOVED_KEYS[old]} instead")
    files = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-c", "--config")]
    files += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    for path in files:
        with contextlib.suppress(OSError, yaml.YAMLError):
            with open(path) as f:
                loaded = yaml.safe_load(f)
            model = loaded.get("model") if isinstance(loaded, Mapping) else None
            if not isinstance(model, Mapping):
                continue
            init = model.get("init_args") if isinstance(model.get("init_args"), Mapping) else model
            for key in init:
                if f"model.init_args.{key}" in MOVED_KEYS:
                    new = MOVED_KEYS[f"model.init_args.{key}"]
                    raise ConfigError(f"model.init_args.{key}", f"moved: set {new} instead (in {path})")


def check_devices(trainer: Namespace) -> None:
    """A :class:`ConfigError` when the config asks for GPUs that this machine does not have."""
    accelerator = trainer.get("accelerator")
    if not isinstance(accelerator, str) or accelerator not in ("gpu", "cuda"):
        return
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices = trainer.get("devices")
    wanted = devices if isinstance(devices, int) and devices > 0 else 1
    if available < wanted:
        raise ConfigError(
            "trainer.accelerator",
            f"{accelerator} with {devices} device(s), but this machine has {available} CUDA GPU(s); on the CPU run "
            "with --trainer.accelerator cpu --trainer.devices 1 --trainer.strategy auto --trainer.precision 32-true"
            if available == 0
            else f"{accelerator} with {devices} device(s), but this machine has {available}; set trainer.devices",
        )


def fill_from_model(data: Namespace, model_args: Mapping, network: Mapping) -> None:
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


def check_config(model_args: Mapping, data: Mapping, subcommand: str | None = None, resuming: bool = False) -> None:
    """Fail fast, naming the option, on a bad preset/network, image size or class count, missing shards or stage-1
    file (not needed when ``resuming``).

    Without a ``subcommand`` (parse-only use, e.g. config tests) the data is not checked against the model or disk.
    """
    if "preset" in model_args:
        network = _network_dict(model_args.get("network"))
        try:
            config = get_config(model_args["preset"], **network)
        except (ValueError, TypeError) as err:
            raise ConfigError(_network_option(str(err), network), str(err)) from None
        described = f"the model ({model_args['preset']}, network overrides {network or None})"
        size = data.get("image_size")
        if subcommand and size is not None and size != config.image_size:
            raise ConfigError(
                "data.image_size",
                f"{size} px, but {described} takes {config.image_size} px; set data.image_size: {config.image_size} "
                f"(or leave it out) or model.init_args.network.image_size: {size}",
            )
        classes = data.get("num_classes")
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
        spec = data.get(name)
        if spec:
            try:
                expand_shards(str(spec))
            except (FileNotFoundError, ValueError) as err:
                raise ConfigError(f"data.{name}", str(err)) from None


def _network_option(message: str, network: Mapping) -> str:
    if message.startswith("unknown preset"):
        return "model.init_args.preset"
    for key in network:
        if re.search(rf"\b{re.escape(key)}\b", message):
            return f"model.init_args.network.{key}"
    return "model.init_args.network" if network else "model.init_args.preset"


def config_error(
    err: BaseException, section: Mapping, only: tuple[str, ...] = ("model", "data", "trainer"), where: str = ""
) -> ConfigError | None:
    """A :class:`ConfigError` for ``err`` if it was raised while building (or, with ``where``, in a hook of) a
    config section in ``only``; the option is the section's argument that the message names, if any."""
    chain = [err]
    while chain[-1].__cause__ is not None:  # jsonargparse re-raises the constructor's error as its __cause__
        chain.append(chain[-1].__cause__)
    if isinstance(chain[-1], ConfigError):
        return chain[-1]
    root, section_name = next(((e, s) for e in chain if (s := _raising_section(e, where))), (err, None))
    if section_name not in only:
        return None
    args = section.get(section_name) or {}
    prefix = section_name
    if section_name == "model" and "init_args" in args:
        args, prefix = args["init_args"] or {}, "model.init_args"
    if isinstance(root, CheckpointMismatchError) and "init_from" in args:
        return ConfigError(f"{prefix}.init_from", str(root))
    message = str(root.args[0]) if isinstance(root, KeyError) and root.args else str(root)
    keys = list(args)
    loss = args.get("loss") if isinstance(args, Mapping) else None
    if isinstance(loss, Mapping) and isinstance(loss.get("init_args"), Mapping):  # the loss object's own options
        keys = [f"loss.init_args.{key}" for key in loss["init_args"]] + keys
    hits = [
        (m.start(), key)
        for key in keys
        if (m := re.search(rf"(?<![\w.]){re.escape(key.rpartition('.')[2])}\b", message))
    ]
    return ConfigError(f"{prefix}.{min(hits)[1]}" if hits else prefix, message)


def _raising_section(err: BaseException, where: str) -> str | None:
    """ "model", "data" or "trainer": the outermost frame of ``err`` that runs in such an object (in ``where``)."""
    for frame, _ in traceback.walk_tb(err.__traceback__):
        owner = frame.f_locals.get("self")
        if where and frame.f_code.co_name != where:
            continue
        if isinstance(owner, L.LightningModule | Objective):
            return "model"
        if isinstance(owner, L.LightningDataModule):
            return "data"
        if isinstance(owner, L.Trainer | Callback):
            return "trainer"
    return None


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


def _eval_modules_are_frozen_copies(model: L.LightningModule) -> bool:
    """True when every module that stays in eval mode in training mode lies in a frozen top-level child (the EMA,
    target and stage-1 copies of the EPG modules), so Lightning's "module(s) in eval mode" note says nothing new."""
    was_training = model.training
    model.train()
    frozen = [
        f"{name}." for name, child in model.named_children() if not any(p.requires_grad for p in child.parameters())
    ]
    expected = all(f"{name}.".startswith(tuple(frozen)) for name, m in model.named_modules() if name and not m.training)
    model.train(was_training)
    return expected


# ---- small helpers ---------------------------------------------------------------------------------------------------
_NETWORK_FIELDS = [f.name for f in dataclasses.fields(NetworkOptions)]


def _network_dict(network: Any) -> dict:
    """A config's ``network`` (a Namespace of NetworkOptions fields, a dict or None) as the fields it sets."""
    network = _plain(network) or {}
    return {k: v for k, v in dict(network).items() if v is not None}


def _pick(mapping: Mapping, keys: set[str]) -> dict:
    return {k: v for k, v in mapping.items() if k in keys}


def _specs(value: Any) -> Iterator[Namespace]:
    """The ``class_path`` specs in a config value (one, or a list)."""
    for item in _as_list(value):
        if isinstance(item, Namespace) and item.get("class_path"):
            yield item


def _is_subclass(spec: Namespace, base: type) -> bool:
    module, _, name = str(spec.class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, base)


def _is_ckpt(spec: Namespace) -> bool:
    return _is_subclass(spec, ModelCheckpoint)


def _lookup(tree: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(tree, Mapping):
            return None
        tree = tree.get(key)
    return tree


def _norm(value: Any) -> Any:
    """Namespaces and mappings as dicts and tuples as lists, recursively, to compare saved with parsed values."""
    value = _plain(value)
    if isinstance(value, Mapping):
        return {k: _norm(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_norm(v) for v in value]
    return value


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _plain(value: Any) -> Any:
    """A jsonargparse Namespace (nested) as plain dicts."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return value


def _listdir(folder: str) -> list[str]:
    return os.listdir(folder) if os.path.isdir(folder) else []


def _files(folders: list, keep: Callable[[str], bool]) -> list[str]:
    """Paths of the entries of ``folders`` (those that exist) whose names ``keep`` accepts."""
    return [os.path.join(d, f) for d in folders for f in _listdir(d) if keep(f)]


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]

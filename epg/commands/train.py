"""The front end of `epg fit|validate|predict -c CONFIG.yaml`: LightningCLI with the run folder, resume and one-line
errors of ``epg`` (its config checks and defaults: :mod:`epg.commands.config_checks`)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from epg.checkpoint import read_checkpoint_meta
from epg.commands.config_checks import (
    FROM_MODEL,
    LINK,
    check_config,
    check_devices,
    config_error,
    config_network,
    default_max_steps,
    derive_run_paths,
    eval_modules_are_frozen_copies,
    fill_from_model,
    quiet_lightning_logs,
    refuse_given,
)
from epg.data.datamodule import EPGDataModule
from epg.data.shards import is_remote
from epg.lightning import resume
from epg.lightning.base import EPGModule
from epg.lightning.faults import AtomicCheckpointIO, ConfigError, LoggerVersions, SigtermCheckpoint
from epg.lightning.finetune import FinetuneModule  # noqa: F401  (--model FinetuneModule)
from epg.lightning.predict import SampleWriter
from epg.lightning.pretrain import PretrainModule  # noqa: F401  (--model PretrainModule)
from epg.lightning.resume import ACCEPT, as_list, network_dict, resolve_checkpoint

BUILD_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, MisconfigurationException)
_Batches = int | float | None  # an int is batches, a float a fraction (Lightning types these float-first)


class EPGTrainer(L.Trainer):
    """Lightning's Trainer with the defaults of the `epg` subcommands: ``fit``, ``validate`` and ``predict`` use the
    run's last checkpoint (``ckpt_path="last"``, see :class:`EPGCLI`) and load it ``weights_only``; a YAML
    ``limit_val_batches: 1`` is one batch (an int), ``1.0`` every batch."""

    def __init__(
        self,
        *args: Any,
        limit_train_batches: _Batches = None,
        limit_val_batches: _Batches = None,
        limit_test_batches: _Batches = None,
        limit_predict_batches: _Batches = None,
        **kwargs: Any,
    ) -> None:
        limits = dict(limit_train_batches=limit_train_batches, limit_val_batches=limit_val_batches)
        limits |= dict(limit_test_batches=limit_test_batches, limit_predict_batches=limit_predict_batches)
        super().__init__(*args, **limits, **kwargs)

    def fit(self, model, train_dataloaders=None, val_dataloaders=None, datamodule=None, ckpt_path: str | None = "last",
            weights_only: bool | None = True) -> None:  # fmt: skip
        """Trainer.fit; ``ckpt_path`` "last" resumes the run's last checkpoint if there is one (null: start afresh)."""
        super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path, weights_only)

    def validate(self, model=None, dataloaders=None, ckpt_path: str | None = "last", verbose: bool = True,
                 datamodule=None, weights_only: bool | None = True) -> Any:  # fmt: skip
        """Trainer.validate of the run's last checkpoint (``ckpt_path`` "last") or another."""
        return super().validate(model, dataloaders, ckpt_path, verbose, datamodule, weights_only)

    def predict(self, model=None, dataloaders=None, datamodule=None, return_predictions: bool | None = False,
                ckpt_path: str | None = "last", weights_only: bool | None = True, sample: SampleWriter | None = None,
                ) -> Any:  # fmt: skip
        """Trainer.predict; ``sample``: `epg sample`'s options (``--sample.*``, listed by ``--sample.help
        SampleWriter``); the images go to files only."""
        return super().predict(model, dataloaders, datamodule, return_predictions, ckpt_path, weights_only)


class EPGCLI(LightningCLI):
    """LightningCLI for :class:`PretrainModule` and :class:`FinetuneModule` (``--model FinetuneModule`` or a
    ``class_path``), with the run-folder, resume and fault rules of ``epg``.

    - One run folder, ``trainer.default_root_dir``: ModelCheckpoint callbacks without a ``dirpath`` save to its
      ``checkpoints/``, Lightning's default logger writes TensorBoard to its ``lightning_logs/``, and a relative
      ``export_path`` (stage 1) lies in it.
    - ``fit`` resumes by default (``--ckpt_path last``): ``last.ckpt`` of the (first saving) ModelCheckpoint folder,
      else it starts at step 0; ``--ckpt_path null`` starts afresh, ``--ckpt_path FILE`` picks a file. A resume
      compares the checkpoint's hyper-parameters with the config (:mod:`epg.lightning.resume`), takes the network
      from the checkpoint (the stage-1 file ``init_from`` need not exist) and continues the logger versions that the
      checkpoint records (:class:`LoggerVersions`): one TensorBoard run per run folder.
    - ``validate``/``predict`` use the run's last checkpoint unless ``--ckpt_path`` names one.
    - ``trainer.max_steps`` defaults to the model's ``total_steps``; ``data.normalization`` is linked to the model's;
      ``data.image_size`` and ``data.num_classes`` default to the model network's and must agree with it.
    - Every Trainer gets :class:`AtomicCheckpointIO` (unless the config sets a CheckpointIO),
      :class:`SigtermCheckpoint` and :class:`LoggerVersions`.
    - Bad config values raise :class:`ConfigError` naming the option (``epg`` prints one line, exit status 2).
    """

    checkpoint: str | None = None  # the checkpoint file this run resumes or loads
    accepted: list | tuple = ()  # hyper-parameter changes accepted on resume

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments(*LINK)
        parser.add_argument(
            f"--{ACCEPT}",
            type=bool,
            nargs="?",
            const=True,
            default=False,
            help="fit: resume although the config's hyper-parameters differ from the checkpoint's: the new values "
            "take effect and are logged (without it such a resume stops, listing the differences)",
        )
        parser.set_defaults({f"data.{key}": None for key in FROM_MODEL})

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        refuse_given(args)
        super().parse_arguments(parser, args)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and predict: no ``test``, as there is no test split (`epg test` says what to run instead)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "test"}

    def _section(self) -> Namespace:
        subcommand = self.config.get("subcommand")
        return self.config[subcommand] if subcommand else self.config

    def before_instantiate_classes(self) -> None:
        subcommand, cfg = self.config.get("subcommand"), self._section()
        trainer, data = cfg.trainer, cfg.get("data")
        args = cfg.model.get("init_args") or Namespace()
        check_devices(trainer)
        derive_run_paths(trainer, args)
        self.checkpoint, self.accepted, meta = None, [], {}
        if subcommand:
            cfg.ckpt_path = path = resolve_checkpoint(cfg.get("ckpt_path"), trainer, subcommand)
            if path and (is_remote(str(path)) or os.path.exists(path)):  # not a name that Lightning resolves
                self.checkpoint, meta = str(path), {} if is_remote(str(path)) else read_checkpoint_meta(path)
        explicit, saved = network_dict(args.get("network")), dict(meta.get("hyper_parameters") or {})
        network = config_network(args, explicit, saved)
        if data is not None:
            fill_from_model(data, args, network)
        plain_args, plain_data = args.as_dict(), data.as_dict() if data is not None else {}
        if saved:
            saved_data = meta.get("datamodule_hyper_parameters") or {}
            changes = resume.hparam_changes(plain_args, explicit, plain_data, saved, saved_data)
            self.accepted = resume.check_resume(self.checkpoint, changes, subcommand == "fit", bool(cfg.get(ACCEPT)))
        if subcommand == "fit":
            resume.continue_logging(trainer, meta)
            default_max_steps(trainer, args)
        check_config(plain_args, plain_data, subcommand, resuming=self.checkpoint is not None)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except BUILD_ERRORS as err:
            raise config_error(err, self._section().as_dict(), ("model", "data", "trainer")) from err

    def after_instantiate_classes(self) -> None:
        # Lightning logs the module's and the datamodule's hyper-parameters as one dict and stops when a key of both
        # (seed, normalization) differs: the data's go under "data/" instead (a private attribute, no public hook).
        data = self.datamodule
        if data is not None and getattr(data, "_hparams_initial", None):
            data._hparams_initial = type(data._hparams_initial)(data=dict(data._hparams_initial))

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The configured Trainer plus SigtermCheckpoint, LoggerVersions and AtomicCheckpointIO where it has none."""
        init = self.config_init
        config = (init[init.subcommand] if init.get("subcommand") else init).get("trainer") or {}
        callbacks = as_list(config.get("callbacks"))
        callbacks += [kind() for kind in (SigtermCheckpoint, LoggerVersions) if not _has(callbacks, kind)]
        kwargs["callbacks"] = [*callbacks, _DataReady()]
        plugins = as_list(config.get("plugins"))
        if getattr(config.get("strategy"), "_checkpoint_io", None) is None and not _has(plugins, CheckpointIO):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        if eval_modules_are_frozen_copies(self.model):  # EMA / target / stage-1 copies stay in eval mode by design
            warnings.filterwarnings("ignore", r"Found \d+ module\(s\) in eval mode", PossibleUserWarning)
        if self.checkpoint:  # resuming: the checkpoint folder holds this run's checkpoints
            warnings.filterwarnings("ignore", r"Checkpoint directory .* exists and is not empty")
        if self.accepted:
            self.trainer.callbacks.append(resume.AcceptedChanges(resume.changes_text(self.accepted)))

    def fit(self, **kwargs: Any) -> None:
        self._run(self.trainer.fit, **kwargs)

    def validate(self, **kwargs: Any) -> None:
        self._run(self.trainer.validate, **kwargs)

    def predict(self, sample: SampleWriter | None = None, **kwargs: Any) -> None:
        """``trainer.predict`` over the image indices that the :class:`SampleWriter` still has to write."""
        kwargs.pop("datamodule", None)  # the inputs are image indices, not data
        writer = sample or SampleWriter()
        self.trainer.callbacks.append(writer)
        self._run(self.trainer.predict, dataloaders=writer.dataloader(kwargs.get("ckpt_path")), **kwargs)

    def _run(self, method: Callable, **kwargs: Any) -> None:
        """Run a Trainer method: a Ctrl-C that saved a checkpoint exits with status 130; Lightning's
        misconfiguration errors and the errors of the data's set-up become :class:`ConfigError`."""
        try:
            method(**kwargs)
        except SIGTERMException:
            if any(getattr(cb, "interrupted", False) for cb in self.trainer.callbacks):
                raise SystemExit(130) from None
            raise
        except MisconfigurationException as err:
            raise config_error(err, self._section().as_dict(), ("trainer",)) from err
        except (ValueError, FileNotFoundError) as err:
            if isinstance(err, ConfigError) or any(getattr(cb, "ready", False) for cb in self.trainer.callbacks):
                raise
            raise config_error(err, self._section().as_dict(), ("data",)) from err


class _DataReady(Callback):
    """Its ``setup`` runs right after the datamodule's: later errors are no data set-up errors."""

    ready = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.ready = True


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
            trainer_class=EPGTrainer,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )


def _has(items: list, kind: type) -> bool:
    return any(isinstance(item, kind) for item in items)

"""LightningCLI entry point for `epg fit|validate|predict -c CONFIG.yaml`, with resume and fault defaults."""

from __future__ import annotations

import os
import re
import traceback
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from epg.data.datamodule import EPGDataModule
from epg.data.shards import expand_shards, is_remote
from epg.lightning.faults import AtomicCheckpointIO, ConfigError, SigtermCheckpoint, recover_interrupted_swap
from epg.lightning.predict import SampleWriter
from epg.nn.official import CheckpointMismatchError
from epg.nn.presets import get_config

# Exception types that, raised while building the model/data/trainer from a config, mean a bad config value.
CONFIG_EXCEPTIONS = (ValueError, TypeError, KeyError, FileNotFoundError, CheckpointMismatchError)


class EPGCLI(LightningCLI):
    """LightningCLI with any LightningModule (PretrainModule, FinetuneModule) by ``class_path``, plus fault defaults.

    - ``fit`` resumes by default (``--ckpt_path`` defaults to ``last``): rerunning the same command after a crash,
      ``kill -9`` or pre-emption continues from the newest ``last*.ckpt`` in the ModelCheckpoint ``dirpath`` (or a
      newer SLURM ``hpc_ckpt_N.ckpt`` in ``default_root_dir``), and starts from step 0 when there is none. Set a
      ``dirpath``: without one Lightning writes to a new ``version_N`` folder per run, where a rerun does not look.
      ``--ckpt_path null`` always starts afresh; ``--ckpt_path FILE`` picks a file.
      Model, optimizer, scheduler, grad scaler, EMA/target weights, update counters and the step-seeded noise draws
      continue exactly; the data order continues exactly for loaders that are deterministic per epoch and a
      checkpoint on an epoch boundary, or that resume mid-epoch themselves, as :class:`EPGDataModule`'s WebDataset
      stream does (it starts at the Trainer's restored batch count; see epg/data/stream.py, tests/test_resume.py).
    - Checkpoints load with ``weights_only=True`` (plain tensors and Python types only).
    - Every Trainer gets :class:`AtomicCheckpointIO` (unless the config sets another CheckpointIO plugin) and
      :class:`SigtermCheckpoint` (SIGTERM saves ``last.ckpt`` at the next batch boundary and exits with status 0).
    - Bad config values raise :class:`ConfigError` naming the option (``epg`` prints it as one line, exit status 2).
    """

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        # LightningCLI has no public hook for the defaults of subcommand (Trainer.fit) arguments; lightning is <2.7.
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        defaults = {"ckpt_path": "last"} if subcommand == "fit" else {}
        if subcommand == "predict":  # `epg predict`: epg sample's options as --sample.*; images go to files only
            parser.add_lightning_class_args(SampleWriter, "sample")
            defaults["return_predictions"] = False
        if "weights_only" in self._subcommand_method_arguments.get(subcommand, []):
            defaults["weights_only"] = True
        if defaults:
            parser.set_defaults(defaults)
        return parser

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and predict: no ``test``, as there is no test split (`epg test` says what to run instead)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "test"}

    def _section(self) -> Any:
        subcommand = self.config.get("subcommand")
        return self.config[subcommand] if subcommand else self.config

    def before_instantiate_classes(self) -> None:
        cfg = self._section()
        model = cfg.get("model")
        args = (model.get("init_args") if model is not None and hasattr(model, "get") else None) or {}
        check_config(_plain(args), _plain(cfg.get("data") or {}), self.config.get("subcommand"))

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except CONFIG_EXCEPTIONS as err:
            converted = config_error(err, _plain(self._section()))
            if converted is None:
                raise
            raise converted from err

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The configured Trainer plus SigtermCheckpoint and AtomicCheckpointIO where the config has none."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = _as_list(config.get("callbacks"))
        if not any(isinstance(cb, SigtermCheckpoint) for cb in callbacks):
            kwargs["callbacks"] = [*callbacks, SigtermCheckpoint()]
        plugins = _as_list(config.get("plugins"))
        strategy_io = getattr(config.get("strategy"), "_checkpoint_io", None)
        if strategy_io is None and not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        """Resolve ``ckpt_path: last`` to the newest last*.ckpt (or SLURM hpc_ckpt_*.ckpt) file, or start afresh.

        Lightning's own "last" ignores the hpc checkpoints of SLURM auto-requeue, and warns when there is none.
        A sharded ``last.ckpt`` folder that a crash left under its hidden ``.last.ckpt.old`` name (see
        :class:`~epg.lightning.faults.AtomicModelParallelStrategy`) is renamed back first.
        """
        init = self.config_init["fit"]
        if init.get("ckpt_path") != "last":
            return
        callbacks = [cb for cb in self.trainer.callbacks if isinstance(cb, ModelCheckpoint)]
        folders = [cb.dirpath for cb in callbacks]
        if not folders or None in folders:
            return  # a folder Lightning resolves later: let it search
        for cb in callbacks:
            recover_interrupted_swap(os.path.join(cb.dirpath, cb.CHECKPOINT_NAME_LAST + cb.FILE_EXTENSION))
        last = ModelCheckpoint.CHECKPOINT_NAME_LAST
        found = _files(folders, lambda f: f.startswith(last) and f.endswith(ModelCheckpoint.FILE_EXTENSION))
        found += _files([self.trainer.default_root_dir], lambda f: re.fullmatch(r"hpc_ckpt_\d+\.ckpt", f) is not None)
        if found:
            init["ckpt_path"] = max(found, key=os.path.getmtime)
            rank_zero_info(f"epg fit: resuming from {init['ckpt_path']} (--ckpt_path last)")
        else:
            rank_zero_info(f"epg fit: no last checkpoint in {', '.join(map(str, folders))}: starting at step 0")
            init["ckpt_path"] = None

    def fit(self, **kwargs: Any) -> None:
        """``trainer.fit``, turning the DataModule's set-up checks into :class:`ConfigError`."""
        try:
            self.trainer.fit(**kwargs)
        except (ValueError, FileNotFoundError) as err:
            converted = config_error(err, _plain(self._section()), only=("data",), where="setup")
            if converted is None:
                raise
            raise converted from err

    def predict(self, **kwargs: Any) -> None:
        """``trainer.predict`` over the image indices that the :class:`SampleWriter` still has to write."""
        kwargs.pop("datamodule", None)  # the inputs are image indices, not data
        writer = self._get(self.config_init, "sample")
        self.trainer.predict(dataloaders=writer.dataloader(kwargs.get("ckpt_path")), **kwargs)


def run_lightning_cli(args: list[str], run: bool = True) -> EPGCLI:
    """Run a Lightning subcommand with ``args`` (e.g. ``["fit", "-c", "configs/demo/pretrain.yaml"]``).

    With ``run=False`` (no subcommand in ``args``) it only parses and instantiates the trainer, model and data.
    Raises :class:`ConfigError` for a bad config value and ``NonFiniteLossError`` for a NaN/inf training loss.
    """
    with warnings.catch_warnings():
        # `epg` passes its own argv as ``args``; LightningCLI warns whenever sys.argv holds arguments too.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
        return EPGCLI(
            model_class=L.LightningModule,
            subclass_mode_model=True,
            datamodule_class=EPGDataModule,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )


# ---- config checks -----------------------------------------------------------------------------------------------
def check_config(model_args: Mapping, data: Mapping, subcommand: str | None = None) -> None:
    """Fail fast, naming the option, on a bad preset/network, image size, missing shards or stage-1 file.

    Without a ``subcommand`` (parse-only use, e.g. config tests) the data is not checked against the model or disk.
    """
    if "preset" in model_args:
        network = dict(model_args.get("network") or {})
        try:
            config = get_config(model_args["preset"], **network)
        except (ValueError, TypeError) as err:
            raise ConfigError(_network_option(str(err), network), str(err)) from None
        size = data.get("image_size")
        if subcommand and size is not None and size != config.image_size:
            raise ConfigError(
                "data.image_size",
                f"{size} px, but the model ({model_args['preset']}, network overrides {network or None}) takes "
                f"{config.image_size} px; set data.image_size: {config.image_size} or model.init_args.network: "
                f"{{image_size: {size}}}",
            )
    init_from = model_args.get("init_from")
    if init_from and not is_remote(str(init_from)) and not os.path.exists(init_from):
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
    hits = [(m.start(), key) for key in args if (m := re.search(rf"(?<![\w.]){re.escape(key)}\b", message))]
    return ConfigError(f"{prefix}.{min(hits)[1]}" if hits else prefix, message)


def _raising_section(err: BaseException, where: str) -> str | None:
    """ "model", "data" or "trainer": the outermost frame of ``err`` that runs in such an object (in ``where``)."""
    for frame, _ in traceback.walk_tb(err.__traceback__):
        owner = frame.f_locals.get("self")
        if where and frame.f_code.co_name != where:
            continue
        if isinstance(owner, L.LightningModule):
            return "model"
        if isinstance(owner, L.LightningDataModule):
            return "data"
        if isinstance(owner, L.Trainer | Callback):
            return "trainer"
    return None


def _plain(value: Any) -> Any:
    """A jsonargparse Namespace (nested) as plain dicts."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return value


def _files(folders: list, keep: Callable[[str], bool]) -> list[str]:
    """Paths of the entries of ``folders`` (those that exist) whose names ``keep`` accepts."""
    return [os.path.join(d, f) for d in folders if os.path.isdir(d) for f in os.listdir(d) if keep(f)]


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]

"""LightningCLI entry point for `epg fit|validate|test|predict -c CONFIG.yaml`."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI

from epg.data.datamodule import EPGDataModule


class EPGCLI(LightningCLI):
    """LightningCLI with any LightningModule (PretrainModule, FinetuneModule) by ``class_path``."""


def run_lightning_cli(args: list[str], run: bool = True) -> EPGCLI:
    """Run a Lightning subcommand with ``args`` (e.g. ``["fit", "-c", "configs/demo/pretrain.yaml"]``).

    With ``run=False`` (no subcommand in ``args``) it only parses and instantiates the trainer, model and data.
    """
    return EPGCLI(
        model_class=L.LightningModule,
        subclass_mode_model=True,
        datamodule_class=EPGDataModule,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )

"""The stage-1 hand-over into stage 2 (method.md §2.3, §3.9): the encoder's shape from the stage-1 file's
hyper-parameters at construction, its weights in a hook, so that a checkpoint never needs the file again."""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from epg.checkpoint import load_stage1_representation, stage1_config
from epg.lightning.base import EPGModule
from epg.nn.network import build_network, build_representation
from epg.nn.official import CheckpointMismatchError, load_into
from epg.nn.presets import with_stage1_encoder


def stage1_network(preset: str, network: dict[str, Any], init_from: str | None, init_preset: str | None) -> dict:
    """``network`` overrides completed with the encoder shape of the stage-1 file ``init_from`` (read from its
    hyper-parameters only, no weights) where they do not set it; as given when there is no such file (a checkpoint's
    ``network`` already records what was taken). A shape that cannot take the file's encoder fails here, naming the
    tensors (:func:`encoder_mismatch`), before any weights are read."""
    if not init_from or not os.path.exists(init_from):
        return network
    stage1 = stage1_config(init_from, init_preset or preset)
    if stage1 is None:
        return network
    network = with_stage1_encoder(preset, network, stage1)
    with torch.device("meta"), torch.random.fork_rng(devices=[]):  # shapes only: no memory, no random draws
        ours, theirs = build_network(preset, **network).encoder, build_representation(stage1).encoder
    try:
        load_into(ours, theirs.state_dict())
    except CheckpointMismatchError as err:
        raise encoder_mismatch(init_from, preset, network, err) from err
    return network


def encoder_mismatch(path: str, preset: str, network: dict | None, err: Exception) -> CheckpointMismatchError:
    """The error of a stage-1 encoder that does not fit the stage-2 network."""
    return CheckpointMismatchError(
        f"the stage-1 encoder in {path} does not fit preset {preset} (network overrides {network}): {err}"
    )


class Stage1Weights(EPGModule):
    """Loads the stage-1 weights of ``hparams.init_from`` into ``net.encoder`` (and the whole stage-1 network into
    ``aux_net`` when there is one) before the Trainer shards the networks, unless a checkpoint was loaded into the
    module; ``weights_from`` says where the weights came from ("init_from", "checkpoint", "random" or None yet)."""

    weights_from: str | None = None

    def load_stage1(self) -> None:
        """Copy the stage-1 online encoder of ``init_from`` into ``net.encoder`` and the whole stage-1 network into
        the CM's ``aux_net``, then restart the EMA, post-hoc EMA and target copies from the online weights
        (method.md §2.3).

        The Trainer calls it from ``configure_model`` on a fresh run; call it to use the module without a Trainer.
        """
        path, hp = self.hparams.init_from, self.hparams
        with torch.random.fork_rng(devices=[]):  # reading weights draws nothing from the run's random stream
            representation = load_stage1_representation(path, preset=hp.init_preset or hp.preset)
        try:
            # Strict on the encoder: the projector is ignored and decoder/class-table keys are absent by design.
            load_into(self.net.encoder, representation.encoder.state_dict())
        except CheckpointMismatchError as err:
            raise encoder_mismatch(path, hp.preset, hp.network, err) from err
        if self.aux_net is not None:
            self.aux_net.load_state_dict(representation.state_dict())
        for copy in self.net_copies():  # EMA, post-hoc EMA (method.md §13) and CM target
            copy.load_state_dict(self.net.state_dict())
        self.weights_from = "init_from"
        rank_zero_info(
            f"FinetuneModule: encoder initialised from {path}; decoder, class table and output layer are fresh "
            "(method.md §2.3)"
        )

    def configure_model(self) -> None:
        """Read ``init_from`` (when there and no checkpoint was loaded into this module), then shard and compile.

        Lightning restores a ``ckpt_path`` only after this hook, so a resume reads the file when it is still there
        and then overwrites those weights; without it, :meth:`check_weights` tells a resume from a missing file.
        """
        init_from = self.hparams.init_from
        if self.weights_from is None and init_from and os.path.exists(init_from):
            self.load_stage1()
        super().configure_model()

    def check_weights(self) -> None:
        """After any checkpoint was restored: the weights came from init_from, a checkpoint, or (no init_from) are
        random, the 'from scratch' ablation of method.md §9.6."""
        if self.weights_from is not None:
            return
        if self.hparams.init_from:
            raise FileNotFoundError(
                f"stage-1 checkpoint {self.hparams.init_from} does not exist (model.init_args.init_from); train stage "
                "1 first or point it at an RCM file"
            )
        rank_zero_warn(
            "FinetuneModule: no init_from given, so the encoder starts from random weights "
            "(the 'from scratch' ablation of method.md §9.6)"
        )
        self.weights_from = "random"

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.check_weights()

    def on_validation_start(self) -> None:
        self.check_weights()

    def on_predict_start(self) -> None:
        self.check_weights()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.weights_from = "checkpoint"

"""Stage 1: representation-consistency pre-training of the encoder + projector (method.md §3).

Hand-over to stage 2 (method.md §3.9): every checkpoint of this module (e.g. ``<run>/checkpoints/last.ckpt``) keeps
the online network under ``online.`` and the architecture in the ``preset``/``network`` hyper-parameters, which is
what :func:`epg.checkpoint.load_stage1_representation` reads. ``export_path`` additionally writes a slim file with
only those parts at the end of ``fit`` (or call :meth:`PretrainModule.export_stage1`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from typing import Literal

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torchvision.utils import make_grid

from epg.eval.knn import bank_accuracy, cls_features, encoder_features, eval_loader, gather_queries
from epg.lightning.base import EPGModule, param_groups, write_stage1_file
from epg.method.ema import ema_update_
from epg.method.lr import warmup_cosine
from epg.method.noise import resolution_shift
from epg.method.normalization import denormalize
from epg.method.objectives import RCMLoss, build_loss, seeded_generator
from epg.nn.network import EPGRepresentation, build_representation
from epg.nn.presets import NetworkOptions, network_overrides


class PretrainModule(EPGModule):
    """Online encoder + projector trained by contrastive + representation-consistency InfoNCE (method.md §3).

    The loss, with its temperatures and curriculum, is ``loss`` (:class:`~epg.method.objectives.RCMLoss`); this
    module holds the networks, the optimizer, the target EMA, the seeds, logging and the k-NN check.

    Args:
        preset: architecture (e.g. "RCM-B/16", "RCM-L/16", "RCM-B/32", or a CPU preset such as "EPG-T/4").
        network: EPGConfig fields overriding the preset's, one by one, e.g. ``{"proj_out": 768}`` (method.md §10.1).
        loss: the stage-1 loss (default: ``RCMLoss()``, the released config's values); in a config
            ``{class_path: epg.method.objectives.RCMLoss, init_args: {...}}``.
        lr: peak AdamW learning rate; 6e-4 [script], the config's 2e-4 is the alternative (method.md §10.1).
        weight_decay, betas: AdamW, decay on all parameters (method.md §3.7).
        warmup_steps, total_steps: linear warmup then cosine to 0; total_steps is also the curriculum's K and, under
            EPGCLI, the run's length (``trainer.max_steps`` defaults to it).
        target_momentum: EMA momentum of the target network, constant (method.md §3.5).
        target_bn_train_mode: run the target in train mode (MoCo-v3 batch statistics) instead of eval (method.md §10.2).
        knn_k, knn_temperature, knn_bank_size: the k-NN check of ``validate`` (:mod:`epg.eval.knn`): the val
            images are the queries, the memory bank holds about ``knn_bank_size`` training images (a fixed subset of
            whole shards, seeded by ``seed``; None: the whole train split, the DINO protocol).
        normalization: pixel normalization of the data (stored for reference; method.md §1.1).
        seed: seeds the pair index (per step) and the noise (per batch and rank), so a resumed run continues exactly.
        paper_grad_scaler: under "16-mixed", use the paper's GradScaler settings instead of Lightning's.
        max_consecutive_skips: under "16-mixed", stop with an error naming the steps once the grad scaler has skipped
            more than this many steps in a row (a loss that stays NaN/inf); 0 disables the limit.
        export_path: where to write the stage-1 hand-over file at the end of ``fit`` (None: don't); under EPGCLI a
            relative path is inside the run folder (``trainer.default_root_dir``).
        compile: ``torch.compile`` the online and target networks in place (state-dict keys unchanged).
        optimizer_impl: AdamW implementation, "fused" or "foreach" (see ``EPGModule.make_adamw``).
    """

    def __init__(
        self,
        preset: str = "RCM-B/16",
        network: NetworkOptions | dict | None = None,
        loss: RCMLoss | None = None,
        lr: float = 6e-4,
        weight_decay: float = 0.03,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 10_000,
        total_steps: int = 600_000,
        target_momentum: float = 0.99,
        target_bn_train_mode: bool = False,
        knn_k: int = 20,
        knn_temperature: float = 0.07,
        knn_bank_size: int | None = 50_000,
        normalization: str = "imagenet",
        seed: int = 1234,
        paper_grad_scaler: bool = True,
        max_consecutive_skips: int = 100,
        export_path: str | None = None,
        compile: bool = False,
        optimizer_impl: Literal["fused", "foreach"] = "fused",
    ) -> None:
        super().__init__()
        self.loss = build_loss(loss, RCMLoss, RCMLoss)
        if not 0.0 <= target_momentum < 1.0:
            raise ValueError(f"target_momentum must be in [0, 1), got {target_momentum}")
        if total_steps <= 0 or warmup_steps < 0:
            raise ValueError(f"need total_steps > 0 and warmup_steps >= 0, got {total_steps} and {warmup_steps}")
        network = network_overrides(network) or None
        self.save_hyperparameters(ignore=["loss"])
        self.hparams.network = network  # plain EPGConfig overrides (LightningCLI saves its parsed value)
        self.hparams.loss = self.loss.spec()  # plain class_path + init_args (LightningCLI saves its parsed value)
        self.online: EPGRepresentation = build_representation(preset, **(network or {}))
        self.target: EPGRepresentation = copy.deepcopy(self.online).requires_grad_(False)
        self.target.train(target_bn_train_mode)
        self.shift = resolution_shift(self.online.config.image_size)
        self._val_feats: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []
        self._warned_no_bank = False
        self.batches_seen = 0  # training batches so far (checkpointed): keys the noise of each micro-batch

    # ---- modes, schedules, draws ----
    def train(self, mode: bool = True) -> PretrainModule:
        """Like nn.Module.train, but the target stays in eval mode unless ``target_bn_train_mode`` (method.md §3.5)."""
        super().train(mode)
        if not self.hparams.target_bn_train_mode:
            self.target.eval()
        return self

    flops_stage = "pretrain"

    def sharded_networks(self) -> list[torch.nn.Module]:
        return [self.online, self.target]

    def lr_multiplier(self, updates: int) -> float:
        return warmup_cosine(updates, self.hparams.warmup_steps, self.hparams.total_steps)

    def noise_generator(self, device: torch.device, micro_batch: int = 0) -> torch.Generator:
        """The generator of ε, seeded by (seed, batch, rank) with the training batches seen so far: one draw per sample
        for all four noisy inputs (method.md §3.4), continued exactly by a resumed run."""
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return seeded_generator(self.hparams.seed, self.batches_seen, 1, rank, device=device)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.batches_seen += 1
        if self.global_step == 0 and batch_idx == 0:  # once per run: the first crops x0 and their two views
            self.log_view_grid(batch[0], batch[1], batch[2])
        return loss

    def log_view_grid(self, x0: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor, count: int = 8) -> None:
        """An image grid of the first ``count`` crops x0 and their two augmented views, for loggers that take images
        (TensorBoard: ``train/views``), on rank 0. Rows: x0 (the consistency branch's clean crop), view 1, view 2
        (the contrastive branch's inputs before noise, method.md §3.4, §7)."""
        experiment = getattr(self.logger, "experiment", None) if self.trainer.is_global_zero else None
        if not hasattr(experiment, "add_image"):
            return
        rows = [denormalize(x[:count].detach().float(), self.hparams.normalization) for x in (x0, v1, v2)]
        grid = make_grid(torch.cat(rows).clamp(0, 1).cpu(), nrow=min(count, x0.shape[0]), padding=1)
        experiment.add_image("train/views", grid, self.trainer.global_step)

    # ---- hooks ----
    def configure_optimizers(self) -> dict:
        hp = self.hparams
        optimizer = self.make_adamw(param_groups(self.online, hp.weight_decay), hp.lr, tuple(hp.betas))
        return {"optimizer": optimizer, "lr_scheduler": self.make_scheduler(optimizer)}

    def on_applied_update(self) -> None:
        ema_update_(self.target, self.online, self.hparams.target_momentum)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["epg_batches_seen"] = self.batches_seen

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.batches_seen = int(checkpoint.get("epg_batches_seen", 0))

    def on_train_end(self) -> None:
        super().on_train_end()  # raises on a NaN/inf loss, before the hand-over file is written
        if self.hparams.export_path and self.trainer.is_global_zero:
            self.export_stage1(self.hparams.export_path)

    def export_stage1(self, path: str | os.PathLike) -> None:
        """Write the hand-over file (hyper-parameters + ``online.*`` weights) for stage 2 (method.md §3.9)."""
        write_stage1_file(path, dict(self.hparams), self.state_dict(), self.updates)

    # ---- validation: k-NN accuracy of CLS features ----
    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._val_feats, self._val_labels = [], []

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        x, y = batch[0], batch[-1]
        self._val_feats.append(cls_features(self.online.encoder, x))
        self._val_labels.append(y)

    def knn_bank_loader(self) -> Iterable | None:
        """This rank's ``(x, y)`` batches of the k-NN memory bank: a seeded subset of the datamodule's training shards.

        None without a datamodule that has ``train_shards`` (then no ``val/knn_acc``); override to use another bank.
        """
        data = self.trainer.datamodule
        if getattr(data, "train_shards", None) is None:
            return None
        return eval_loader(
            data.train_shards,
            image_size=data.image_size,
            normalization=data.normalization,
            batch_size=data.val_batch_size or data.per_device_batch_size,
            subset=self.hparams.knn_bank_size,
            seed=self.hparams.seed,
            num_workers=data.num_workers,
            rank=self.global_rank,
            world_size=self.trainer.world_size,
        )

    def on_validation_epoch_end(self) -> None:
        """Log ``val/knn_acc``: the val images of all ranks as queries against the bank of training images."""
        encoder = self.online.encoder
        queries, labels = gather_queries(self._val_feats, self._val_labels, encoder.dim, self.device)
        self._val_feats, self._val_labels = [], []
        if queries.shape[0] == 0:
            return
        bank = self.knn_bank_loader()
        if bank is None:
            if not self._warned_no_bank:
                rank_zero_warn(
                    "PretrainModule: no val/knn_acc: its memory bank holds training images, and there is no datamodule "
                    "with train_shards (pass one, e.g. EPGDataModule, or override knn_bank_loader)"
                )
                self._warned_no_bank = True
            return
        with self.trainer.precision_plugin.val_step_context():  # the precision of the query features
            bank_feats, bank_labels = encoder_features(encoder, bank, self.device)
        acc = bank_accuracy(bank_feats, bank_labels, queries, labels, self.hparams.knn_k, self.hparams.knn_temperature)
        self.log("val/knn_acc", acc, prog_bar=True, sync_dist=True)  # same value on every rank
        if not self.trainer.sanity_checking:
            self.log_hp_metric(acc)  # stage 1's headline number

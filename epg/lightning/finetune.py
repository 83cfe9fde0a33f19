"""Stage-2 LightningModule: end-to-end fine-tuning as a diffusion or a consistency model (method.md §2.3, §4, §5)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from epg.checkpoint import OBJECTIVE_SAMPLERS, load_stage1_representation
from epg.lightning.base import (
    EPGModule,
    frozen_copy,
    is_restoring,
    log_sigma_buckets,
    param_groups,
    restoring_checkpoint,
    seeded_generator,
)
from epg.lightning.faults import nonfinite_span
from epg.lightning.phema import SNAPSHOT_FOLDER, PhemaOptions, PowerEMAs
from epg.method.denoiser import Denoiser
from epg.method.ema import ema_update_
from epg.method.lr import warmup_cosine, warmup_steps_schedule
from epg.method.normalization import NORMALIZATIONS
from epg.method.objectives import OBJECTIVE_LOSSES, FinetuneLoss, denoising_mse, legacy_loss
from epg.nn.network import EPGNetwork, EPGRepresentation, build_network, build_representation
from epg.nn.official import CheckpointMismatchError, load_into
from epg.nn.presets import NetworkOptions, network_overrides, with_stage1_encoder
from epg.sampling.generate import generate
from epg.sampling.grid import GUIDANCE_INTERVAL
from epg.sampling.options import FINETUNE_LEGACY_KEYS, SamplingOptions, fold_legacy, legacy_values, select_network

if TYPE_CHECKING:
    from epg.lightning.predict import SampleBatch

OBJECTIVES = ("diffusion", "consistency")
LR_SCHEDULES = ("cosine", "steps")
NO_DECAY = ("pos_embed", "cls_token")  # method.md §4, §5.5
# Submodules not checkpointed: the CM target is rebuilt as a copy of the online network on loading.
UNSAVED = ("target_net.",)


class FinetuneModule(EPGModule):
    """Fine-tune a stage-1 encoder plus a fresh decoder as a DM (x0, §4) or an ECT consistency model (edm, §5).

    The loss, with its noise draws, weights and ECT schedule, is ``loss`` (:mod:`epg.method.objectives`); this
    module holds the networks, the optimizer and LR schedule, the EMA copies, the seeds, logging and checkpoints.
    Per-objective optimizer defaults (None picks them) follow the paper: DM betas (0.9, 0.999), weight decay 0.01,
    warmup + cosine LR, grad clip 0.5 after warmup; CM betas (0.9, 0.99), weight decay 0.03, warmup + LR steps (×0.3
    after update 400K, ×0.08 after 500K), no clipping. ``grad_clip=0`` turns clipping off.

    Checkpoints hold the online network (``net.``), one EMA copy per rate (``ema_nets.<i>.``), the CM's frozen
    stage-1 network (``aux_net.``), the applied-update count and everything Lightning keeps (optimizer, scaler,
    scheduler). The CM's stop-gradient target is not saved: it is a copy of ``net``. So a run resumes (and
    :meth:`load_from_checkpoint` loads) without ``init_from`` (see :func:`restoring_checkpoint`).

    Args:
        preset: network preset (method.md §2.4), e.g. "EPG-XL/16"; ``network`` overrides EPGConfig fields one by one.
            The encoder's shape (image and patch size, width, depth, heads; the decoder depth follows) comes from
            ``init_from`` unless ``network`` sets it; the hyper-parameter ``network`` records what was taken.
        objective: "diffusion" (method.md §4) or "consistency" (§5).
        loss: the objective's loss, e.g. ``{class_path: epg.method.objectives.ConsistencyLoss, init_args: {...}}``
            in a config (default: the objective's :class:`~epg.method.objectives.DiffusionLoss` or
            :class:`~epg.method.objectives.ConsistencyLoss` with the paper's values); it must fit ``objective``.
        init_from: stage-1 checkpoint (PretrainModule .ckpt or official RCM file) whose online encoder initialises
            ours (§2.3); None trains from scratch (an ablation, §9.6; the CM needs it for its auxiliary loss).
        init_preset: preset of an official RCM file (default: ``preset``).
        lr, betas, weight_decay: AdamW; pos_embed and CLS have no weight decay.
        warmup_steps, total_steps: linear warmup, then cosine to 0 at ``total_steps`` ("cosine") or LR steps at
            ``lr_milestones`` by ``lr_factors`` ("steps"); ``lr_schedule`` None picks the objective's schedule.
            Under EPGCLI ``total_steps`` is also the run's length (``trainer.max_steps`` defaults to it).
        grad_clip: global-norm clip applied once ``warmup_steps`` updates are done.
        ema_rates: sampling EMA rates, each updated after every applied update from the start (no EMA warm-up).
        phema: post-hoc EMA (method.md §13): :class:`~epg.lightning.phema.PhemaOptions` (σ_rels, snapshot_every,
            snapshot_dtype); power-function copies under ``phema.nets.<i>.``, snapshots in ``<run folder>/phema``.
        normalization: pixel normalisation of the data (§1.1), kept for samplers reading the checkpoint.
        seed: seeds the training noise draws per (seed, step, micro-batch, rank): ranks and accumulated micro-batches
            draw independently (method.md §4), and a resumed run continues with the draws it would have made.
        paper_grad_scaler: under "16-mixed", use the paper's GradScaler settings (method.md §4, §3.7).
        max_consecutive_skips: under "16-mixed", stop with an error naming the steps once the grad scaler has skipped
            more than this many steps in a row (a loss that stays NaN/inf); 0 disables the limit.
        val_sigmas, val_seed: unshifted noise levels and seed of the validation denoising MSE.
        sample_every_n_val: log a sample grid of ``grid_size`` images every n-th validation (0: never).
        sampling: :class:`~epg.sampling.options.SamplingOptions` of the grid (sampler (None: the objective's, "heun"
            32 steps for the DM, "consistency" 1 step for the CM), steps, CFG scale ``cfg``, guidance ``interval``
            (unshifted, applied as (lo·s_H, hi·s_H]; default the paper's (0.19, 1.61], method.md §6.2; None: every
            level), labels, seed (fixes the grid's noise)); sampled with the first EMA copy.
        sample_sampler, sample_steps, sample_guidance, sample_guidance_interval, grid_seed: deprecated flat keys of
            ``sampling.sampler/steps/cfg/interval/seed``, accepted with a deprecation warning (checkpoints written
            before ``sampling`` carry them).
        compile: ``torch.compile`` the online network (and the CM target) in place (state-dict keys unchanged).
        optimizer_impl: AdamW implementation, "fused" or "foreach" (see ``EPGModule.make_adamw``).
        **legacy: the flat loss keys of older configs and checkpoints (``p_mean``, ``ect_d0``, ``huber_c``,
            ``loss_weighting``, ...), moved into ``loss`` with a deprecation warning.
    """

    def __init__(
        self,
        preset: str = "EPG-XL/16",
        network: NetworkOptions | dict | None = None,
        objective: Literal["diffusion", "consistency"] = "diffusion",
        loss: FinetuneLoss | None = None,
        init_from: str | None = None,
        init_preset: str | None = None,
        lr: float = 1e-4,
        betas: tuple[float, float] | None = None,
        weight_decay: float | None = None,
        warmup_steps: int = 10_000,
        total_steps: int = 1_000_000,
        lr_schedule: Literal["cosine", "steps"] | None = None,
        lr_milestones: tuple[int, ...] = (400_000, 500_000),
        lr_factors: tuple[float, ...] = (0.3, 0.08),
        grad_clip: float | None = None,
        ema_rates: tuple[float, ...] = (0.9999,),
        phema: PhemaOptions | dict | None = None,
        normalization: Literal["imagenet", "simple"] = "imagenet",
        seed: int = 1234,
        paper_grad_scaler: bool = True,
        max_consecutive_skips: int = 100,
        val_sigmas: tuple[float, ...] = (0.02, 0.1, 0.5, 1.0, 2.0, 10.0),
        val_seed: int = 0,
        sample_every_n_val: int = 1,
        grid_size: int = 16,
        sampling: SamplingOptions | dict | None = None,
        grid_seed: int = 0,
        sample_sampler: str | None = None,
        sample_steps: int | None = None,
        sample_guidance: float | None = None,
        sample_guidance_interval: tuple[float, float] | str | None = GUIDANCE_INTERVAL,
        compile: bool = False,
        optimizer_impl: Literal["fused", "foreach"] = "fused",
        **legacy: Any,
    ) -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        self.loss = legacy_loss(loss, legacy, objective, FinetuneLoss, OBJECTIVE_LOSSES[objective])
        if self.loss.objective != objective:
            raise ValueError(
                f"loss {type(self.loss).__name__} trains the {self.loss.objective} objective, but objective is "
                f"{objective!r}: set objective: {self.loss.objective} or a {OBJECTIVE_LOSSES[objective].__name__}"
            )
        restoring = is_restoring()
        network = network_overrides(network)
        representation = None
        if init_from and not restoring:
            representation = load_stage1_representation(init_from, preset=init_preset or preset)
            network = with_stage1_encoder(preset, network, representation.config)
        self.save_hyperparameters(ignore=["loss", "legacy", *legacy])
        self.hparams.network = network or None  # plain EPGConfig overrides (LightningCLI saves its parsed value)
        self.hparams.loss = self.loss.spec()  # plain class_path + init_args (LightningCLI saves its parsed value)
        for name, value, choices in (
            ("normalization", normalization, NORMALIZATIONS),
            ("lr_schedule", lr_schedule, (*LR_SCHEDULES, None)),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if len(lr_milestones) != len(lr_factors):
            raise ValueError(f"lr_milestones {lr_milestones} and lr_factors {lr_factors} must have the same length")
        cm = objective == "consistency"
        self.objective = objective
        self.parameterization = self.loss.parameterization  # method.md §1.5
        self.betas = tuple(betas) if betas is not None else ((0.9, 0.99) if cm else (0.9, 0.999))
        self.weight_decay = weight_decay if weight_decay is not None else (0.03 if cm else 0.01)
        self.lr_schedule = lr_schedule or ("steps" if cm else "cosine")
        self.grad_clip = (None if cm else 0.5) if grad_clip is None else (grad_clip or None)
        # The grid's sampling options, the deprecated flat keys folded in; a bad option fails here, not at a grid.
        self.sampling = fold_legacy(sampling, legacy_values(FINETUNE_LEGACY_KEYS, locals()), "FinetuneModule")
        self.hparams.sampling = self.sampling.as_dict()  # saved as plain fields, without the flat keys
        phema_options = PhemaOptions.of(phema)
        self.hparams.phema = phema_options.as_dict() if phema_options is not None else None
        for key in FINETUNE_LEGACY_KEYS:
            self.hparams.pop(key, None)
        self.sample_sampler = self.sampling.resolved_sampler(OBJECTIVE_SAMPLERS[objective])

        self.net: EPGNetwork = build_network(preset, **(network or {}))
        if representation is not None:
            self._init_encoder(init_from, representation)
        elif not restoring:
            if cm:
                raise ValueError(
                    "the consistency objective needs init_from: its auxiliary loss runs the frozen stage-1 network "
                    "(method.md §5.4); pass a PretrainModule checkpoint or an RCM file"
                )
            rank_zero_warn(
                "FinetuneModule: no init_from given, so the encoder starts from random weights "
                "(the 'from scratch' ablation of method.md §9.6)"
            )
        # Sampling EMA copies start equal to the online weights after loading (method.md §4).
        self.ema_nets = nn.ModuleList([frozen_copy(self.net) for _ in ema_rates])
        self.phema = PowerEMAs(self.net, phema_options) if phema_options is not None else None
        # CM: stop-gradient target (EMA rate 0, train mode for dropout, §5.2) and the frozen stage-1 network (§5.4).
        self.target_net = frozen_copy(self.net, train=True) if cm else None
        self.aux_net = None
        if cm:  # restored from the checkpoint when it was not read from init_from
            aux = representation if representation is not None else build_representation(self.net.config)
            self.aux_net = aux.requires_grad_(False).eval()
        self._aux_in_checkpoint = representation is None
        self._val_count = 0
        self._hp_source: torch.Tensor | None = None  # the val/fid value last logged as hp_metric

    @classmethod
    def load_from_checkpoint(cls, *args: Any, **kwargs: Any) -> FinetuneModule:
        """Lightning's ``load_from_checkpoint``, without reading ``init_from`` (see :func:`restoring_checkpoint`)."""
        with restoring_checkpoint():
            return super().load_from_checkpoint(*args, **kwargs)

    # ---- construction ------------------------------------------------------------------------------------------
    def _init_encoder(self, path: str, representation: EPGRepresentation) -> None:
        """Copy the stage-1 online encoder of ``representation`` (read from ``path``) into ``self.net.encoder``."""
        try:
            # Strict on the encoder: the projector is ignored and decoder/class-table keys are absent by design.
            load_into(self.net.encoder, representation.encoder.state_dict())
        except CheckpointMismatchError as err:
            raise CheckpointMismatchError(
                f"the stage-1 encoder in {path} does not fit preset {self.hparams.preset} "
                f"(network overrides {self.hparams.network}): {err}"
            ) from err
        rank_zero_info(
            f"FinetuneModule: encoder initialised from {path}; decoder, class table and output layer are fresh "
            "(method.md §2.3)"
        )

    def denoiser(self, net: nn.Module | None = None) -> Denoiser:
        """The preconditioned D(x, σ′, y) around ``net`` (default: the online network) with this objective's output."""
        return Denoiser(self.net if net is None else net, self.parameterization)

    def sharded_networks(self) -> list[nn.Module]:
        nets = [self.net, *self.ema_nets, *(self.phema.nets if self.phema is not None else ())]
        return nets if self.target_net is None else [*nets, self.target_net]

    def compiled_networks(self) -> list[nn.Module]:
        return [self.net] if self.target_net is None else [self.net, self.target_net]

    def train(self, mode: bool = True) -> FinetuneModule:
        """Switch modes, but keep EMA copies and the auxiliary network in eval mode (the CM target follows)."""
        super().train(mode)
        self.ema_nets.eval()
        if self.aux_net is not None:
            self.aux_net.eval()
        return self

    # ---- optimisation ------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict:
        groups = param_groups(self.net, self.weight_decay, no_decay=NO_DECAY)
        optimizer = self.make_adamw(groups, self.hparams.lr, self.betas)
        return {"optimizer": optimizer, "lr_scheduler": self.make_scheduler(optimizer)}

    def lr_multiplier(self, updates: int) -> float:
        hp = self.hparams
        if self.lr_schedule == "cosine":
            return warmup_cosine(updates, hp.warmup_steps, hp.total_steps)
        return warmup_steps_schedule(updates, hp.warmup_steps, hp.lr_milestones, hp.lr_factors)

    def grad_clip_value(self) -> float | None:
        """Clip by global norm only once warm-up is over (method.md §4)."""
        return self.grad_clip if self.grad_clip and self.updates >= self.hparams.warmup_steps else None

    def on_applied_update(self) -> None:
        for ema, rate in zip(self.ema_nets, self.hparams.ema_rates, strict=True):
            ema_update_(ema, self.net, rate)
        if self.target_net is not None:
            ema_update_(self.target_net, self.net, 0.0)
        if self.phema is not None:
            self.phema.update_(self.net, self.updates)
            if self._trainer is not None and self.phema.due(self.updates):
                folder = os.path.join(self.trainer.default_root_dir, SNAPSHOT_FOLDER)
                self.phema.write_snapshot(folder, self.updates, write=self.trainer.is_global_zero)

    # ---- training ----------------------------------------------------------------------------------------------
    def noise_generator(self, device: torch.device, micro_batch: int = 0) -> torch.Generator:
        """Generator of a batch's noise draws, seeded by (seed, step, micro-batch, rank): independent per rank (§4)."""
        step = self.trainer.global_step if self._trainer is not None else self.updates  # skipped steps get new draws
        return seeded_generator(self.hparams.seed, step, micro_batch, 2, self.global_rank, device=device)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        y = y if self.net.class_embed is not None else None
        generator = self.noise_generator(x.device, self._micro_batch(batch_idx))
        log = dict(on_step=True, on_epoch=False, batch_size=x.shape[0])
        denoiser = self.denoiser()
        if self.objective == "diffusion":
            terms = self.loss(denoiser, x, y, generator=generator)
            if self._trainer is not None:  # the NaN/inf record (also kept under a grad scaler: skip limit)
                self.watch_loss(terms.loss, *nonfinite_span(terms.weighted, denoiser.shift * terms.sigma))
            if self._logging_step():
                log_sigma_buckets(self, terms.sigma, terms.weighted.detach())
                self.log("train/x0_mse", terms.mse.mean(), **log)
        else:
            stage = self.loss.stage(self.updates)
            terms = self.loss(denoiser, self.denoiser(self.target_net), self.aux_net, x, y, stage, generator=generator)
            if self._trainer is not None:
                self.watch_loss(terms.loss, *nonfinite_span(terms.per_sample, denoiser.shift * terms.t), label="t'")
            self.log("train/ect_stage", float(stage), **log)
            self.log("train/consistency", terms.consistency.detach().mean(), **log)
            self.log("train/aux", terms.aux.detach().mean(), **log)
        self.log("train/loss", terms.loss.detach(), prog_bar=True, **log)
        return terms.loss

    def _micro_batch(self, batch_idx: int) -> int:
        """Index of this batch among the accumulated micro-batches of one optimizer step (0 without accumulation)."""
        return batch_idx % self.trainer.accumulate_grad_batches if self._trainer is not None else 0

    def _logging_step(self) -> bool:
        return self._trainer is None or self.trainer.global_step % max(1, self.trainer.log_every_n_steps) == 0

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        # Stage 2's headline number: the in-loop FID (callbacks run before this hook) also becomes hp_metric.
        fid = self.trainer.callback_metrics.get("val/fid")
        if fid is not None and fid is not self._hp_source:
            self._hp_source = fid
            self.log_hp_metric(fid)

    # ---- validation --------------------------------------------------------------------------------------------
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Denoising MSE at fixed unshifted σ levels with fixed noise: online per level, EMA averaged over levels."""
        x, y = batch[0], batch[1]
        y = y if self.net.class_embed is not None else None
        generator = torch.Generator().manual_seed(self.hparams.val_seed * 1_000_003 + batch_idx)
        noise = torch.randn(x.shape, generator=generator).to(x)
        log = dict(on_step=False, on_epoch=True, sync_dist=True, batch_size=x.shape[0])
        online = self.denoiser()
        ema = self.denoiser(self.ema_nets[0]) if len(self.ema_nets) else None
        losses, ema_losses = [], []
        for sigma in self.hparams.val_sigmas:
            mse = denoising_mse(online, x, y, sigma, noise).mean()
            self.log(f"val/mse_sigma_{sigma:g}", mse, **log)
            losses.append(mse)
            if ema is not None:
                ema_losses.append(denoising_mse(ema, x, y, sigma, noise).mean())
        self.log("val/loss", torch.stack(losses).mean(), prog_bar=True, **log)
        if ema_losses:
            self.log("val/ema_loss", torch.stack(ema_losses).mean(), **log)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self._val_count += 1
        every = self.hparams.sample_every_n_val
        if every <= 0 or (self._val_count - 1) % every or not self.trainer.is_global_zero:
            return
        experiment = getattr(self.logger, "experiment", None) if self.logger is not None else None
        if not hasattr(experiment, "add_image"):
            return
        grid = self.sample_grid()
        if grid is not None:
            experiment.add_image(f"samples/{self.sample_sampler}", grid, self.global_step)

    @torch.no_grad()
    def sample_grid(self, ema: bool = True) -> torch.Tensor | None:
        """A (3, H, W) image grid in [0, 1] of ``grid_size`` samples, image i from noise fixed by (sampling.seed, i)
        and label i mod C (``epg.sampling.image_grid``; EMA weights unless ``ema`` is False)."""
        from epg.sampling.image_grid import sample_grid

        net = select_network(self, 0 if ema and len(self.ema_nets) else None, "FinetuneModule")
        was_training = net.training
        net.eval()
        try:
            settings = self.sampling.settings(self.sample_sampler)
            return sample_grid(self.denoiser(net), settings, self.hparams.grid_size, self.hparams.normalization)
        finally:
            net.train(was_training)

    # ---- prediction (`epg predict`) ----------------------------------------------------------------------------
    def predict_step(self, batch: SampleBatch, batch_idx: int = 0) -> torch.Tensor:
        """uint8 images (B, H, W, 3) of a batch of image indices (`epg predict`, :mod:`epg.lightning.predict`).

        Sampled by the one generate loop, :func:`epg.sampling.generate`, with the batch's settings and EMA copy, in
        fp32 whatever the Trainer's precision unless the settings ask for autocast (method.md §8).
        """
        net = self.net if batch.ema is None else self.ema_nets[batch.ema]
        with torch.autocast(self.device.type, enabled=False):
            return generate(self.denoiser(net), batch.indices, batch.num, batch.settings, self.hparams.normalization)

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(UNSAVED)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Re-create the target from the saved online weights; a checkpoint written before the aux net was saved
        takes it from ``init_from``, which must then have been read."""
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("state_dict")
        if state is None:
            return
        if self.target_net is not None:
            for key in self.target_net.state_dict():
                if f"net.{key}" in state:
                    state.setdefault(f"target_net.{key}", state[f"net.{key}"])
        if self.aux_net is not None:
            for key, value in self.aux_net.state_dict().items():
                if f"aux_net.{key}" not in state:
                    if self._aux_in_checkpoint:
                        raise ValueError(
                            "this checkpoint has no frozen stage-1 network (aux_net.*: written before checkpoints "
                            "kept it); load it with the stage-1 file init_from in place, outside restoring_checkpoint"
                        )
                    state[f"aux_net.{key}"] = value

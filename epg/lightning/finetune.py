"""Stage-2 LightningModule: end-to-end fine-tuning as a diffusion or a consistency model (method.md §2.3, §4, §5)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from epg.lightning.base import frozen_copy, param_groups
from epg.lightning.evaluation import DenoiserEvaluation
from epg.lightning.phema import PhemaOptions, PowerEMAs
from epg.lightning.stage1 import Stage1Weights, stage1_network
from epg.method.denoiser import Denoiser
from epg.method.ema import ema_update_
from epg.method.lr import warmup_cosine, warmup_steps_schedule
from epg.method.normalization import NORMALIZATIONS
from epg.method.objectives import DiffusionLoss, FinetuneLoss, build_loss, seeded_generator
from epg.nn.network import EPGNetwork, build_network, build_representation
from epg.nn.presets import NetworkOptions, get_config, network_overrides
from epg.sampling.options import SamplingOptions

LR_SCHEDULES = ("cosine", "steps")
NO_DECAY = ("pos_embed", "cls_token")  # method.md §4, §5.5
# Submodules not checkpointed: the CM target is rebuilt as a copy of the online network on loading.
UNSAVED = ("target_net.",)


class FinetuneModule(Stage1Weights, DenoiserEvaluation):
    """Fine-tune a stage-1 encoder plus a fresh decoder with a stage-2 ``loss`` (method.md §2.3, §4, §5).

    The loss object is the objective (:mod:`epg.method.objectives`): it owns its noise draws, weights and schedules
    and says what it needs around it (parameterization, default sampler, a CM target and frozen stage-1 network, the
    paper's optimizer defaults: DM betas (0.9, 0.999), weight decay 0.01, warmup + cosine LR, grad clip 0.5 after
    warmup; CM betas (0.9, 0.99), weight decay 0.03, warmup + LR steps, no clipping; None arguments pick them). This
    module holds the networks, the optimizer and LR schedule, the EMA copies, the seeds, logging and checkpoints.

    Weights: the constructor builds the networks only (reading nothing but the hyper-parameters of ``init_from``,
    for the encoder's shape, when that file is there). :meth:`load_stage1` copies the stage-1 weights in; the Trainer
    calls it from ``configure_model`` (before sharding), and a checkpoint restored afterwards (a resume,
    ``ckpt_path``) replaces them. A module used without a Trainer calls :meth:`load_stage1` itself. Checkpoints hold
    the online network (``net.``), one EMA copy per rate (``ema_nets.<i>.``), the CM's frozen stage-1 network
    (``aux_net.``), the post-hoc EMA copies (``phema.nets.<i>.``), the update count and Lightning's state; the CM's
    stop-gradient target is a copy of ``net``. So a
    run resumes, and :meth:`load_from_checkpoint` loads, without the ``init_from`` file.

    Args:
        preset: network preset (method.md §2.4), e.g. "EPG-XL/16"; ``network`` overrides EPGConfig fields one by one.
            The encoder's shape (image and patch size, width, depth, heads; the decoder depth follows) comes from
            ``init_from`` unless ``network`` sets it; the hyper-parameter ``network`` records what was taken, so a
            checkpoint never needs the file again.
        loss: the stage-2 loss, e.g. ``{class_path: epg.method.objectives.ConsistencyLoss, init_args: {...}}`` in a
            config (default: :class:`~epg.method.objectives.DiffusionLoss` with the paper's values).
        init_from: stage-1 checkpoint (PretrainModule .ckpt or official RCM file) whose online encoder initialises
            ours (§2.3); None trains from scratch (an ablation, §9.6; the CM needs it for its auxiliary loss).
        init_preset: preset of an official RCM file (default: ``preset``).
        lr, betas, weight_decay: AdamW; pos_embed and CLS have no weight decay.
        warmup_steps, total_steps: linear warmup, then cosine to 0 at ``total_steps`` ("cosine") or LR steps at
            ``lr_milestones`` by ``lr_factors`` ("steps"); ``lr_schedule`` None picks the loss's schedule.
            Under EPGCLI ``total_steps`` is also the run's length (``trainer.max_steps`` defaults to it).
        grad_clip: global-norm clip applied once ``warmup_steps`` updates are done; 0 turns it off.
        ema_rates: sampling EMA rates, each updated after every applied update from the start (no EMA warm-up).
        phema: post-hoc EMA (method.md §13): :class:`~epg.lightning.phema.PhemaOptions` (σ_rels, snapshot_every,
            snapshot_unit, snapshot_dtype); power-function copies under ``phema.nets.<i>.``, snapshots in
            ``<run folder>/phema``.
        normalization: pixel normalisation of the data (§1.1), kept for samplers reading the checkpoint.
        seed: seeds the training noise draws per (seed, step, micro-batch, rank): ranks and accumulated micro-batches
            draw independently (method.md §4), and a resumed run continues with the draws it would have made.
        paper_grad_scaler: under "16-mixed", use the paper's GradScaler settings (method.md §4, §3.7).
        max_consecutive_skips: under "16-mixed", stop with an error naming the steps once the grad scaler has skipped
            more than this many steps in a row (a loss that stays NaN/inf); 0 disables the limit.
        val_sigmas, val_seed: unshifted noise levels and seed of the validation denoising MSE.
        sample_every_n_val: log a sample grid of ``grid_size`` images every n-th validation (0: never).
        sampling: :class:`~epg.sampling.options.SamplingOptions` of the grid (sampler (None: the loss's, "heun"
            32 steps for the DM, "consistency" 1 step for the CM), steps, CFG scale ``cfg``, guidance ``interval``
            (unshifted, applied as (lo·s_H, hi·s_H]; default the paper's (0.19, 1.61], method.md §6.2; None: every
            level), labels, seed (fixes the grid's noise)); sampled with the first EMA copy.
        compile: ``torch.compile`` the online network (and the CM target) in place (state-dict keys unchanged).
        optimizer_impl: AdamW implementation, "fused" or "foreach" (see ``EPGModule.make_adamw``).
    """

    loss_on_progress_bar = True

    def __init__(
        self,
        preset: str = "EPG-XL/16",
        network: NetworkOptions | dict | None = None,
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
        compile: bool = False,
        optimizer_impl: Literal["fused", "foreach"] = "fused",
    ) -> None:
        super().__init__()
        self.loss = loss = build_loss(loss, FinetuneLoss, DiffusionLoss)
        if loss.needs_aux and not init_from:
            raise ValueError(
                f"{type(loss).__name__} needs init_from: its auxiliary loss runs the frozen stage-1 network "
                "(method.md §5.4); pass a PretrainModule checkpoint or an RCM file"
            )
        network = stage1_network(preset, network_overrides(network), init_from, init_preset)
        self.save_hyperparameters(ignore=["loss"])
        self.hparams.network = network or None  # plain EPGConfig overrides (LightningCLI saves its parsed value)
        self.hparams.loss = loss.spec()  # plain class_path + init_args (LightningCLI saves its parsed value)
        for name, value, choices in (
            ("normalization", normalization, NORMALIZATIONS),
            ("lr_schedule", lr_schedule, (*LR_SCHEDULES, None)),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if len(lr_milestones) != len(lr_factors):
            raise ValueError(f"lr_milestones {lr_milestones} and lr_factors {lr_factors} must have the same length")
        self.betas = tuple(betas) if betas is not None else loss.betas
        self.weight_decay = weight_decay if weight_decay is not None else loss.weight_decay
        self.lr_schedule = lr_schedule or loss.lr_schedule
        self.grad_clip = loss.grad_clip if grad_clip is None else (grad_clip or None)
        self.sampling = SamplingOptions.of(sampling)  # a bad option fails here, not at the first grid
        self.hparams.sampling = self.sampling.as_dict()
        phema = PhemaOptions.of(phema)  # a bad σ_rel fails here
        self.hparams.phema = phema.as_dict() if phema is not None else None
        self.sample_sampler = self.sampling.resolved_sampler(loss.sampler)

        # The CM's frozen stage-1 network (§5.4; weights from load_stage1 or a checkpoint), then the online network.
        config = get_config(preset, **(network or {}))
        self.aux_net = build_representation(config).requires_grad_(False).eval() if loss.needs_aux else None
        self.net: EPGNetwork = build_network(preset, **(network or {}))
        # Sampling EMA copies start equal to the online weights (method.md §4); load_stage1 restarts them.
        self.ema_nets = nn.ModuleList([frozen_copy(self.net) for _ in ema_rates])
        self.phema = PowerEMAs(self.net, phema) if phema is not None else None  # power-function copies (§13)
        # CM: stop-gradient target (EMA rate 0, train mode for dropout, §5.2).
        self.target_net = frozen_copy(self.net, train=True) if loss.needs_target else None

    # ---- networks ----------------------------------------------------------------------------------------------
    def denoiser(self, net: nn.Module | None = None) -> Denoiser:
        """The preconditioned D(x, σ′, y) around ``net`` (default: the online network) with this objective's output."""
        return Denoiser(self.net if net is None else net, self.loss.parameterization)

    def net_copies(self) -> list[nn.Module]:
        """The copies of ``net`` that :meth:`load_stage1` restarts: EMA, post-hoc EMA and the CM target."""
        phema, target = self.phema.nets if self.phema is not None else (), self.target_net
        return [*self.ema_nets, *phema, *([target] if target is not None else [])]

    def sharded_networks(self) -> list[nn.Module]:
        return [self.net, *self.net_copies()]

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
        if self.phema is not None:  # t = applied updates; a due snapshot goes to <run folder>/phema
            self.phema.after_update(self.net, self.updates, self._trainer, self.images_per_update)

    # ---- training ----------------------------------------------------------------------------------------------
    def noise_generator(self, device: torch.device, micro_batch: int = 0) -> torch.Generator:
        """Generator of a batch's noise draws, seeded by (seed, step, micro-batch, rank): independent per rank (§4)."""
        step = self.trainer.global_step if self._trainer is not None else self.updates  # skipped steps get new draws
        return seeded_generator(self.hparams.seed, step, micro_batch, 2, self.global_rank, device=device)

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(UNSAVED)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Re-create the CM target from the saved online weights."""
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("state_dict")
        if state is not None and self.target_net is not None:
            for key in self.target_net.state_dict():
                if f"net.{key}" in state:
                    state.setdefault(f"target_net.{key}", state[f"net.{key}"])

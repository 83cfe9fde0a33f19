"""Glue shared by the two LightningModules: applied-update counting, skip-aware hooks, schedules, logging."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable

import lightning as L
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from epg.io import save_torch
from epg.lightning.faults import ConfigError, NonFiniteLossError, NonFiniteWatch
from epg.method.objectives import Objective, Terms
from epg.nn.flops import train_flops_per_image

# The paper's fp16 GradScaler (method.md §3.7): init 2^14, growth 2^(1/1000) every step, backoff 0.5.
DEFAULT_MAX_SKIPS = 100  # skipped fp16 steps in a row before a stop (the scale has then halved 100 times)
OPTIMIZER_IMPLS = ("fused", "foreach")  # AdamW implementations (EPGModule.make_adamw)
PAPER_SCALER = {"init_scale": 2.0**14, "growth_factor": 2.0 ** (1 / 1000), "backoff_factor": 0.5, "growth_interval": 1}


def frozen_copy(net: nn.Module, train: bool = False) -> nn.Module:
    """A gradient-free deep copy of ``net`` in train or eval mode."""
    clone = copy.deepcopy(net)
    clone.requires_grad_(False)
    return clone.train(train)


def write_stage1_file(path: str | os.PathLike, hparams: dict, state: dict, updates: int) -> None:
    """Write a stage-1 hand-over file: hyper-parameters and the ``online.*`` weights of ``state`` (method.md §3.9),
    in the Lightning layout that :func:`epg.checkpoint.load_stage1_representation` reads (atomically)."""
    import lightning

    payload = {
        "pytorch-lightning_version": lightning.__version__,  # marks the Lightning layout for the loader
        "hyper_parameters": hparams,
        "state_dict": {k: v.detach().cpu() for k, v in state.items() if k.startswith("online.")},
        "epg_updates": updates,
    }
    save_torch(payload, path)


def param_groups(module: nn.Module, weight_decay: float, no_decay: Iterable[str] = ()) -> list[dict]:
    """Two AdamW groups: parameters whose name ends with one of ``no_decay`` get weight decay 0 (method.md §4)."""
    no_decay = tuple(no_decay)
    decay, plain = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (plain if no_decay and name.endswith(no_decay) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    return groups


class EPGModule(L.LightningModule):
    """Base module: trains ``self.loss`` (an :class:`~epg.method.objectives.Objective`) and counts applied
    (non-skipped) optimizer updates, which drive curricula, LR and EMA.

    The training step is the same for both stages: ``loss(self, batch, updates, generator)`` gives
    :class:`~epg.method.objectives.Terms`, logged and watched by :meth:`log_terms`. Under "16-mixed" a GradScaler may
    skip a step on inf/NaN gradients (method.md §3.7); such a step does not advance ``self.updates``, the LR schedule,
    the curricula or any EMA (method.md §11). Subclasses implement :meth:`noise_generator`,
    :meth:`on_applied_update` and :meth:`lr_multiplier`.

    Without a grad scaler (32-true, bf16-mixed) a NaN/inf loss is an error instead: each step's loss and noise
    levels go to :meth:`watch_loss`, and :class:`epg.lightning.faults.NonFiniteLossError` names the step and
    σ' (checked on logging steps and before every checkpoint save, see :class:`~epg.lightning.faults.NonFiniteWatch`).
    With a grad scaler, more than ``max_consecutive_skips`` skipped steps in a row (a loss that stays NaN/inf, which
    the scaler would otherwise skip forever) raise the same error, naming the steps and the first bad σ'.
    """

    def __init__(self) -> None:
        super().__init__()
        self.updates = 0  # applied optimizer updates; checkpointed
        self.skipped_updates = 0
        self._skips_in_a_row = 0
        self._loss_watch = NonFiniteWatch()
        self._grads_unscaled = False  # set once this step's gradients are unscaled (see unscale_gradients)
        self.clipped_updates = 0  # optimizer steps whose gradients went through the clip (this process)

    loss: Objective  # the training objective (epg.method.objectives), set by subclasses

    # ---- the training step: the loss object's terms, logged and watched ----
    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        generator = self.noise_generator(batch[0].device, self.micro_batch(batch_idx))
        terms = self.loss(self, batch, self.updates, generator)
        self.log_terms(terms, batch[0].shape[0])
        return terms.loss

    def noise_generator(self, device: torch.device, micro_batch: int = 0) -> torch.Generator:
        """Generator of this batch's noise draws, given its index among the micro-batches of one optimizer step
        (subclasses seed it so that a resumed run continues with the draws it would have made)."""
        raise NotImplementedError

    # Whether train/loss goes on the progress bar (which syncs with the device every step).
    loss_on_progress_bar: bool = False

    def log_terms(self, terms: Terms, batch_size: int) -> None:
        """Record ``terms`` for the NaN/inf check and log ``train/loss``, its ``logs`` and, on logging steps, the
        loss's ``details``."""
        self.watch_loss(terms.loss, *terms.span, label=terms.label)
        log = dict(on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("train/loss", terms.loss.detach(), prog_bar=self.loss_on_progress_bar, **log)
        for name, value in terms.logs.items():
            if isinstance(value, torch.Tensor):
                self.log(f"train/{name}", value, **log)
            else:  # the same number on every rank
                self.log(f"train/{name}", float(value), rank_zero_only=True, **log)
        if self.logging_step():
            for name, (value, count) in self.loss.details(terms).items():
                self.log(f"train/{name}", value, on_step=True, on_epoch=False, batch_size=count)

    def logging_step(self) -> bool:
        """True on the steps the Trainer logs (and outside a Trainer)."""
        return self._trainer is None or self.trainer.global_step % max(1, self.trainer.log_every_n_steps) == 0

    def micro_batch(self, batch_idx: int) -> int:
        """Index of this batch among the accumulated micro-batches of one optimizer step (0 without accumulation)."""
        return batch_idx % self.trainer.accumulate_grad_batches if self._trainer is not None else 0

    # ---- hooks for subclasses ----
    def on_applied_update(self) -> None:
        """Called once after every optimizer update that the grad scaler did not skip."""

    def lr_multiplier(self, updates: int) -> float:
        """LR factor for the update that follows ``updates`` applied ones."""
        return 1.0

    # Stage name for the analytic FLOP count ("pretrain" | "finetune"); subclasses set it.
    flops_stage: str = "finetune"

    @property
    def flops_per_batch(self) -> float | None:
        """Training FLOPs of this device's last batch (analytic, epg.nn.flops), read by the Throughput callback."""
        size = getattr(self, "_flops_batch_size", 0)
        if not size:
            return None
        return size * train_flops_per_image(self.flops_stage, self.hparams.preset, **(self.hparams.network or {}))

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._flops_batch_size = int(batch[0].shape[0])

    @property
    def images_per_update(self) -> int:
        """Images per applied update: this device's last batch × devices × accumulated micro-batches (0 before the
        first batch)."""
        size = getattr(self, "_flops_batch_size", 0)
        if not size or self._trainer is None:
            return size
        return size * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def sharded_networks(self) -> list[nn.Module]:
        """Networks to shard under FSDP2 (``ModelParallelStrategy``): the trained one first, then its copies."""
        return []

    # ---- Lightning plumbing ----
    def setup(self, stage: str) -> None:
        """Under "16-mixed", swap in the paper's GradScaler when the module's ``paper_grad_scaler`` is set."""
        plugin = self.trainer.precision_plugin
        if stage == "fit" and self.hparams.get("paper_grad_scaler") and getattr(plugin, "scaler", None) is not None:
            plugin.scaler = torch.amp.GradScaler(getattr(plugin, "device", "cuda"), **PAPER_SCALER)

    def configure_model(self) -> None:
        """Shard with FSDP2 under ``ModelParallelStrategy``, then ``torch.compile`` when the module's ``compile``.

        Every transformer block and each network is ``fully_shard``-ed; EMA/target copies are sharded the same way
        as the online network, so their foreach updates stay local to each rank's shard.
        """
        self._shard()
        if self.hparams.get("compile"):
            for net in self.compiled_networks():
                net.compile()  # in place: state-dict keys keep their names

    def compiled_networks(self) -> list[nn.Module]:
        """Networks that ``compile=True`` compiles: those the training step runs (subclasses narrow it)."""
        return self.sharded_networks()

    def _shard(self) -> None:
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        from epg.nn.decoder import DecoderBlock
        from epg.nn.layers import Block

        names = mesh.mesh_dim_names or ()
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise ConfigError(
                "trainer.strategy",
                f"the device mesh has a tensor-parallel axis of size {mesh['tensor_parallel'].size()} (Lightning's "
                "ModelParallelStrategy default: the devices of a node), but EPG shards with FSDP2 over data-parallel "
                "ranks only, so those ranks would train unsynchronised copies on the same batches; use "
                "epg.lightning.faults.AtomicModelParallelStrategy (pure FSDP2) or set tensor_parallel_size: 1 and "
                "data_parallel_size: devices x nodes",
            )
        if "data_parallel" in names:
            mesh = mesh["data_parallel"]
        for net in self.sharded_networks():
            if isinstance(net, FSDPModule):
                continue  # already sharded (configure_model may run more than once)
            for module in net.modules():
                if isinstance(module, Block | DecoderBlock):
                    fully_shard(module, mesh=mesh)
            fully_shard(net, mesh=mesh)

    def reshard_networks(self) -> None:
        """Put every FSDP2-sharded network back into its sharded state (a no-op without FSDP2).

        FSDP2 leaves a root module's parameters unsharded after a forward pass, expecting the backward to reshard
        them; a no-grad pass (validation, sample grids, k-NN features) has no backward, so the online and EMA/target
        copies would hold plain tensors while the others hold DTensor shards, and the next EMA update fails.
        """
        from torch.distributed.fsdp import FSDPModule

        for net in self.sharded_networks():
            for module in net.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    def on_validation_end(self) -> None:
        self.reshard_networks()

    def make_scheduler(self, optimizer: torch.optim.Optimizer) -> dict:
        """A per-step LambdaLR that reads the applied-update count, so a skipped step keeps its LR.

        Its name makes LearningRateMonitor (the one source of the LR curve) log ``train/lr`` (one parameter group)
        or ``train/lr/pg1``, ``train/lr/pg2``, … (several).
        """
        fn: Callable[[int], float] = lambda _: self.lr_multiplier(self.updates)  # noqa: E731
        return {"scheduler": LambdaLR(optimizer, fn), "interval": "step", "frequency": 1, "name": "train/lr"}

    def make_adamw(self, groups: list[dict], lr: float, betas: tuple[float, float], eps: float = 1e-8):
        """AdamW as ``optimizer_impl`` says: "fused" (default) or "foreach", on every device and precision.

        Fused was chosen on measurement (benchmarks/optimizer_step.py: faster per step on CPU, see
        benchmarks/results/optimizer_step_cpu.json; the GPU numbers come from benchmarks/gpu_check.sh). Gradient
        clipping and the logged grad norm work with both (:meth:`configure_gradient_clipping`).
        """
        impl = self.hparams.get("optimizer_impl", "fused")
        if impl not in OPTIMIZER_IMPLS:
            raise ValueError(f"optimizer_impl must be one of {OPTIMIZER_IMPLS}, got {impl!r}")
        fused = impl == "fused"
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused, foreach=not fused)

    def on_train_start(self) -> None:
        """Keep this run's ``optimizer_impl`` after a resume: a restored optimizer state brings the flags of the run
        that saved it (torch copies ``fused``/``foreach`` from the saved param groups), which would silently switch."""
        fused = self.hparams.get("optimizer_impl", "fused") == "fused"
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group["fused"], group["foreach"] = fused, not fused
                if fused:  # the fused kernel wants float32 step counters on the parameters' device
                    for p in group["params"]:
                        state = optimizer.state.get(p, {})
                        if torch.is_tensor(state.get("step")):
                            state["step"] = state["step"].to(device=p.device, dtype=torch.float32)

    # ---- gradient clipping (any optimizer, any precision) ----
    def grad_clip_value(self) -> float | None:
        """Global-norm clip for the coming update, or None (subclasses: e.g. only after warm-up, method.md §4)."""
        return None

    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Make ``p.grad`` hold the true (unscaled) gradients of this step, once; a no-op without a grad scaler.

        Under "16-mixed" Lightning unscales a foreach optimizer's gradients itself before the hooks run, but leaves a
        fused one's scaled (it unscales inside its step). Here the scaler unscales them instead; its ``step`` then
        hands the fused kernel no scale, only the inf flag, so a step with inf/NaN gradients is still skipped.
        """
        scaler = self._grad_scaler()
        if scaler is None or self._grads_unscaled:
            return
        raw = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch optimizer
        if getattr(raw, "_step_supports_amp_scaling", False):
            scaler.unscale_(raw)
        self._grads_unscaled = True

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip the unscaled gradients by global norm when :meth:`grad_clip_value` says so.

        Done here rather than by Lightning's precision plugin, which refuses to clip for an optimizer that unscales
        internally (fused AdamW) under mixed precision. The Trainer's ``gradient_clip_val`` is not used.
        """
        clip = self.grad_clip_value()
        if not clip:
            return
        self.unscale_gradients(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        self.clipped_updates += 1

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        scaler = self._grad_scaler()
        before = scaler.get_scale() if scaler is not None else None
        self._grads_unscaled = False
        optimizer.step(closure=optimizer_closure)
        if scaler is not None and scaler.get_scale() < before:
            self.skipped_updates += 1
            self._skips_in_a_row += 1
            self.log("train/skipped_updates", float(self.skipped_updates), rank_zero_only=True)
            self._check_skips(scaler.get_scale())
            return
        self._skips_in_a_row = 0
        self.updates += 1
        self.on_applied_update()

    def _check_skips(self, scale: float) -> None:
        """Stop once the grad scaler has skipped more than ``max_consecutive_skips`` steps in a row."""
        limit = self.hparams.get("max_consecutive_skips", DEFAULT_MAX_SKIPS)
        if not limit or self._skips_in_a_row <= limit:
            return
        step = self.trainer.global_step
        first = self._loss_watch.describe()
        raise NonFiniteLossError(
            f"the grad scaler skipped {self._skips_in_a_row} steps in a row (steps {step - self._skips_in_a_row + 1}"
            f"-{step}, loss scale now {scale:.3g}; first non-finite loss: {first}): the loss or its gradients stay "
            "NaN/inf; resume from the last checkpoint with a lower lr, or raise model.init_args.max_consecutive_skips"
        )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log ``train/grad_norm``: the global norm of the unscaled gradients before clipping (what the clip sees)."""
        if self.trainer.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self.unscale_gradients(optimizer)
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            if grads:
                norm = torch.nn.utils.get_total_norm(grads, foreach=True)
                self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    # ---- non-finite loss guard ----
    def _grad_scaler(self) -> torch.amp.GradScaler | None:
        return getattr(self.trainer.precision_plugin, "scaler", None)

    @property
    def watching_loss(self) -> bool:
        """True under a Trainer without a grad scaler ("16-mixed" skips inf/NaN steps itself, method.md §3.7)."""
        return self._trainer is not None and self._grad_scaler() is None

    def watch_loss(
        self, loss: torch.Tensor, lo: torch.Tensor | float, hi: torch.Tensor | float, label: str = "σ'"
    ) -> None:
        """Record this step's loss and its noise-level span [lo, hi] for the NaN/inf check (no host sync).

        Also recorded under a grad scaler (which skips such steps instead of stopping): the skip limit names it.
        """
        if self._trainer is None:
            return
        self._loss_watch.label = label
        self._loss_watch.record(loss, self.trainer.global_step, lo, hi)

    def check_finite_loss(self) -> None:
        """Raise NonFiniteLossError if a watched loss was NaN/inf (syncs with the device; collective under DDP)."""
        if self.watching_loss:
            self._loss_watch.check(self, self.trainer.global_step)

    def on_fit_start(self) -> None:
        self._loss_watch.reset()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # Throughput (samples/s, TFLOP/s, MFU) is epg.lightning.callbacks.Throughput's, the LR LearningRateMonitor's.
        self.log("train/updates", float(self.updates), on_step=True, on_epoch=False, rank_zero_only=True)
        if self.trainer.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self.check_finite_loss()

    def on_train_end(self) -> None:
        self.check_finite_loss()

    def log_hp_metric(self, value: float | torch.Tensor) -> None:
        """Log ``value`` as TensorBoard's ``hp_metric`` (the HPARAMS tab; -1 until the first value) at this step."""
        if not self.trainer.is_global_zero:
            return
        for logger in self.trainer.loggers:
            logger.log_metrics({"hp_metric": float(value)}, step=self.trainer.global_step)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite_loss()  # before anything is written: a checkpoint never holds weights after a NaN step
        checkpoint["epg_updates"] = self.updates
        checkpoint["epg_skipped_updates"] = self.skipped_updates

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.updates = int(checkpoint.get("epg_updates", 0))
        self.skipped_updates = int(checkpoint.get("epg_skipped_updates", 0))

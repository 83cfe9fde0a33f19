"""In-loop FID: a Lightning callback that samples with the EMA weights every M steps and logs `val/fid` (method.md §8).

The paper's sampling script computes a quick in-loop FID for ablations only (method.md §8); this is ours. It runs
every ``every_n_steps`` optimizer steps (in ``on_train_batch_end``, so it needs no validation loader and its
cadence does not depend on ``val_check_interval``). Each rank samples the images i ≡ rank (mod world) of 0…K−1, each
fixed by (seed, i), so the set does not depend on the number of devices, and feeds them to a torchmetrics FID
(:class:`~epg.eval.reference_fid.ReferenceFID`) whose ``compute()`` sums the ranks' feature statistics and scores
them against the cached reference statistics, the same value on every rank. The Inception is `epg fid calc`'s
(torch-fidelity's TF-compatible Inception-v3, offline weights), and so is the FID up to round-off (≲ 1e-3).

YAML (LightningCLI), the demo's settings (configs/demo/finetune_dm.yaml; no reference: the val split)::

    trainer:
      callbacks:
        - class_path: epg.eval.callback.InLoopFID
          init_args:
            every_n_steps: 500
            num_samples: 50
            sampling: {steps: 16, cfg: 3.0, interval: null}  # epg.sampling.options.SamplingOptions

``val/fid`` goes straight to the loggers at ``trainer.global_step`` (as LearningRateMonitor does, so it is never
dropped by ``log_every_n_steps``) and into ``trainer.callback_metrics`` (for ModelCheckpoint/EarlyStopping
``monitor: val/fid``). FID of K ≪ 50K samples is biased upwards: compare runs at the same K only.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from epg.data.shards import read_class_counts
from epg.eval.errors import EvalInputError
from epg.eval.inception import InceptionFeatures, ieee_convolutions
from epg.eval.inception_weights import ensure_inception_weights
from epg.eval.reference import ReferenceStats, cached_reference
from epg.eval.reference_fid import ReferenceFID
from epg.eval.sweep import rank_indices, sample_images
from epg.sampling.image_grid import pick_grid
from epg.sampling.options import SamplingOptions, select_network

METRIC = "val/fid"


class InLoopFID(Callback):
    """Log FID of ``num_samples`` EMA samples against a reference every ``every_n_steps`` training steps.

    Args:
        every_n_steps: evaluate when ``trainer.global_step`` is a positive multiple of this.
        num_samples: K images per evaluation (e.g. 100 for the demo, 10K-50K for a real run), split over ranks.
        reference: a reference .npz from `epg fid ref`, or a source to compute one from once (WebDataset shards,
            an image folder, an ADM reference .npz), cached in ``cache_dir``; None: the datamodule's ``val_shards``.
            Larger images are ADM-center-cropped to the training resolution first (as the DataModule does), and
            nothing is computed when ``trainer.max_steps`` ends the run before the first evaluation.
        sampling: :class:`~epg.sampling.options.SamplingOptions` (sampler, steps, CFG scale ``cfg``, guidance
            ``interval`` (default the paper's, §6.2; None: every level), labels, seed); the sampler defaults to heun.
        ema_index: which of ``pl_module.ema_nets`` to sample (None: the online ``pl_module.net``).
        batch_size: images per sampling and Inception batch on each rank.
        log_grid: also log up to ``grid_size`` of rank 0's samples as an image, when the logger can.
        sampling.labels: "balanced" (K/C per class, method.md §6.4) or "random" (from the class frequencies in the
            dataset.json of the datamodule's ``train_shards``; uniform, with a note, when there is none).
        cache_dir: where a computed reference is cached (default: ``trainer.default_root_dir``).
    """

    def __init__(
        self,
        every_n_steps: int,
        num_samples: int,
        reference: str | None = None,
        sampling: SamplingOptions | dict | None = None,
        ema_index: int | None = 0,
        batch_size: int = 100,
        log_grid: bool = True,
        cache_dir: str | None = None,
        grid_size: int = 16,
    ) -> None:
        super().__init__()
        self.sampling = SamplingOptions.of(sampling)
        if every_n_steps < 1 or num_samples < 2 or batch_size < 1:
            raise ValueError(
                f"InLoopFID: every_n_steps ({every_n_steps}) and batch_size ({batch_size}) must be ≥ 1 and "
                f"num_samples ({num_samples}) ≥ 2"
            )
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.reference_source = None if reference is None else str(reference)
        self.ema_index = ema_index
        self.batch_size = batch_size
        self.log_grid = log_grid
        self.cache_dir = cache_dir
        self.grid_size = grid_size
        self.reference: ReferenceStats | None = None
        self.class_counts: list[int] | None = None
        self.metric: ReferenceFID | None = None
        self._last_step = -1

    # ---- setup -------------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._network(pl_module)  # fail now, not after the first M steps, on a module that does not fit
        if "normalization" not in pl_module.hparams:
            raise ValueError(f"InLoopFID: {type(pl_module).__name__}.hparams has no 'normalization' (imagenet|simple)")
        if self.sampling.labels == "random":
            self.class_counts = self._training_class_counts(trainer)
        if 0 <= trainer.max_steps < self.every_n_steps:
            return  # no evaluation in this run: no reference, no Inception
        source = self.reference_source or getattr(trainer.datamodule, "val_shards", None)
        if source is None:
            raise ValueError(
                "InLoopFID: no reference given and the datamodule has no val_shards; pass reference: a reference .npz "
                "(`epg fid ref`), WebDataset shards or an image folder"
            )
        if trainer.local_rank == 0:
            ensure_inception_weights()  # offline conversion, once per machine
        trainer.strategy.barrier("InLoopFID.weights")
        self.metric = ReferenceFID().to(trainer.strategy.root_device)  # the module is not moved there yet
        if trainer.is_global_zero:  # the metric's sync gives the reference to the other ranks
            inception = InceptionFeatures(device=trainer.strategy.root_device)
            cache_dir = self.cache_dir or trainer.default_root_dir
            size = pl_module.denoiser(self._network(pl_module)).image_size
            self.reference = cached_reference(
                str(source), cache_dir, inception, self.batch_size, crop_to=size, log=rank_zero_info
            )
            resolution = self.reference.resolution
            if resolution is not None and tuple(resolution) != (size, size):
                raise EvalInputError(
                    f"InLoopFID: the reference {source} is at {resolution[0]}x{resolution[1]} but "
                    f"the network makes {size}x{size} images; use a reference at the training resolution"
                )
            self.metric.set_reference(self.reference.mu, self.reference.sigma, self.reference.count)

    @staticmethod
    def _training_class_counts(trainer: L.Trainer) -> list[int] | None:
        """The training shards' class counts for random labels (method.md §6.4); None (uniform) without them."""
        shards = getattr(trainer.datamodule, "train_shards", None)
        try:
            counts = read_class_counts(shards) if shards else None
        except (FileNotFoundError, ValueError):
            counts = None
        if counts is None:
            rank_zero_info(f"InLoopFID: no class counts for training shards {shards}; random labels are uniform")
        return counts

    def _network(self, pl_module: L.LightningModule) -> torch.nn.Module:
        if not hasattr(pl_module, "denoiser"):
            raise TypeError(f"InLoopFID needs a module with .denoiser(net) (FinetuneModule), got {type(pl_module)}")
        return select_network(pl_module, self.ema_index, "InLoopFID", "ema_index")

    # ---- evaluation --------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step == self._last_step:  # accumulation: once per step
            return
        self._last_step = step
        self.evaluate(trainer, pl_module)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """Sample this rank's share, score all ranks' samples, log and return the FID (the same on every rank)."""
        start = time.time()
        rank, world = trainer.global_rank, trainer.world_size
        indices = rank_indices(self.num_samples, rank, world)
        net = self._network(pl_module)
        was_training = net.training
        net.eval()
        try:
            settings = self.sampling.settings(class_counts=self.class_counts)
            images = sample_images(
                pl_module.denoiser(net),
                indices,
                self.num_samples,
                settings,
                normalization=pl_module.hparams.normalization,
                batch_size=self.batch_size,
            )
        finally:
            net.train(was_training)
            if hasattr(pl_module, "reshard_networks"):  # FSDP2: a no-grad pass leaves the root unsharded
                pl_module.reshard_networks()
        metric = self.metric.to(pl_module.device)
        with ieee_convolutions(metric.device):
            for first in range(0, len(images), self.batch_size):
                batch = images[first : first + self.batch_size].permute(0, 3, 1, 2)
                metric.update(batch.to(metric.device), real=False)
        fid = float(metric.compute())  # a collective: every rank calls it, even one without images
        metric.reset()
        self._log(trainer, fid, time.time() - start, images)
        return fid

    def _log(self, trainer: L.Trainer, fid: float, seconds: float, images: torch.Tensor) -> None:
        trainer.callback_metrics[METRIC] = torch.tensor(fid)
        if not trainer.is_global_zero:
            return
        metrics = {METRIC: fid, f"{METRIC}_seconds": seconds}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            experiment = getattr(logger, "experiment", None)
            if self.log_grid and len(images) and hasattr(experiment, "add_image"):
                experiment.add_image(f"{METRIC}_samples", pick_grid(images, self.grid_size), trainer.global_step)
        rank_zero_info(f"InLoopFID: step {trainer.global_step}: FID {fid:.3f} of {self.num_samples} ({seconds:.1f} s)")

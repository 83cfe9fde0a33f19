"""What a stage-2 module does with its denoiser besides training: the validation denoising MSE, sample grids,
`epg predict` batches, and the in-loop FID as TensorBoard's ``hp_metric`` (method.md §6, §8)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from epg.lightning.base import EPGModule
from epg.method.objectives import denoising_mse
from epg.sampling.generate import generate
from epg.sampling.options import select_network

if TYPE_CHECKING:
    from epg.lightning.predict import SampleBatch


class DenoiserEvaluation(EPGModule):
    """Validation, grids and prediction of a module with ``denoiser(net)``, ``net``, ``ema_nets``, ``sampling``,
    ``sample_sampler`` and the hyper-parameters ``val_sigmas``, ``val_seed``, ``sample_every_n_val``, ``grid_size``
    and ``normalization`` (:class:`~epg.lightning.finetune.FinetuneModule`)."""

    _val_count = 0  # validations run so far (not sanity checks)
    _hp_source: torch.Tensor | None = None  # the val/fid value last logged as hp_metric

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

"""`epg predict`: `epg sample` as a Lightning prediction run (method.md §6, §8).

``epg predict -c CONFIG --ckpt_path CKPT [--sample.num 50000 --sample.cfg 2.5 ...]`` builds the config's Trainer and
FinetuneModule, restores the checkpoint and runs ``trainer.predict`` over the image indices still missing from the
output folder: :meth:`FinetuneModule.predict_step` turns each batch of indices into images through the one generate
loop (:func:`epg.sampling.generate`) and :class:`SampleWriter` writes them as PNGs, then ``<out>.npz`` (ADM layout).
The options are `epg sample`'s, and the folder is guarded by the same settings record, so the images equal those of
``epg sample CKPT`` with the same options (the writer prints that command), and either command resumes the other's
folder. Several devices (``trainer.devices``, DDP) split the indices; image i depends only on (seed, i).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from epg.checkpoint import read_global_step
from epg.lightning.faults import ConfigError
from epg.sampling.generate import SampleSettings
from epg.sampling.grid import GUIDANCE_INTERVAL
from epg.sampling.options import SamplingOptions, SamplingOptionsError, select_network
from epg.sampling.run import SampleRun, SampleRunError

PROG = "epg predict"
PROGRESS_EVERY_S = 30.0  # seconds between progress lines (the first batch always reports, with an estimate)


class SampleBatch:
    """Image indices for :meth:`FinetuneModule.predict_step`, with the settings and the weights that decide them.

    A plain object (no ``.to``, not a dataclass), so Lightning hands it to ``predict_step`` as it is.
    """

    def __init__(self, indices: list[int], num: int, settings: SampleSettings, ema: int | None) -> None:
        self.indices = indices
        self.num = num
        self.settings = settings
        self.ema = ema

    def __len__(self) -> int:
        return len(self.indices)


class _Missing(Dataset):
    """The indices a writer still has to write, read when Lightning builds its sampler (after the writer's setup)."""

    def __init__(self, writer: SampleWriter) -> None:
        self.writer = writer

    def __len__(self) -> int:
        return len(self.writer.todo)

    def __getitem__(self, position: int) -> int:
        return self.writer.todo[position]


class SampleWriter(BasePredictionWriter):
    """Write the predictions of `epg predict` like `epg sample`: PNGs, ``<out>.npz``, resumable, split over ranks.

    The folder is an :class:`epg.sampling.run.SampleRun` with these options, so it equals `epg sample`'s.

    Args:
        out: folder of 000000.png …; the npz goes next to it as ``<out>.npz``. Default:
            ``<trainer.default_root_dir>/samples/<checkpoint>-step<N>_<settings>``.
        num: number of images; default 50000 (FID-50K, the paper's protocol: hours on a CPU, so pass e.g.
            ``--sample.num 500`` for the demo). Progress lines with an estimate of the time left are printed after the
            first batch and then every 30 s, whatever ``trainer.enable_progress_bar`` says; SIGTERM (``timeout``,
            ``kill``) stops after the current batch, and a rerun continues with the missing images.
        ema: EMA copy index, or None for the online weights.
        sampler, steps: None picks the checkpoint objective's sampler (heun for a DM, consistency for a CM) and that
            sampler's step count (heun 32, consistency 1).
        cfg: classifier-free guidance scale w (None or 1: none); interval: its σ interval (unshifted; None: all).
        labels: "balanced" (num/C per class in class order) or "random" (training frequencies, method.md §6.4).
        label_counts: class frequencies of random labels: "auto" (the training shards the checkpoint records),
            training shards or their dataset.json, or "uniform".
        seed: image i depends only on (seed, i).
        batch: images per device batch (100 as in the paper).
        autocast: "none" (fp32 sampling, §8), "bf16" or "fp16".
        npz: also write ``<out>.npz`` once every PNG exists.
    """

    def __init__(
        self,
        out: str | None = None,
        num: int = 50_000,
        ema: int | None = 0,
        sampler: Literal["heun", "euler", "stochastic", "consistency"] | None = None,
        steps: int | None = None,
        cfg: float | None = None,
        interval: tuple[float, float] | None = GUIDANCE_INTERVAL,
        labels: Literal["balanced", "random"] = "balanced",
        label_counts: str = "auto",
        seed: int = 0,
        batch: int = 100,
        autocast: Literal["none", "bf16", "fp16"] = "none",
        npz: bool = True,
    ) -> None:
        super().__init__(write_interval="batch")
        try:  # the one parse and check of the sampling options (epg.sampling.options)
            self.sampling = SamplingOptions(sampler, steps, cfg, interval, labels, seed)
        except SamplingOptionsError as err:
            raise ValueError(f"SampleWriter: {err}") from None
        self.out, self.num, self.ema, self.label_counts = out, num, ema, label_counts
        self.batch, self.autocast, self.npz = batch, autocast, npz
        self.checkpoint: str | os.PathLike | None = None
        self.run: SampleRun | None = None
        self.todo: list[int] = []
        self._ema = ema
        self._done = 0  # images written by this run (this rank)
        self._start = self._last_report = 0.0

    # ---- the `epg sample` run this writer stands for -----------------------------------------------------------
    def sample_run(self, checkpoint: str, default_sampler: str, out: str | os.PathLike) -> SampleRun:
        """The :class:`SampleRun` of these options: the images of `epg sample` with the same options, same folder
        (``default_sampler``: the loss's, when none is named)."""
        sampler = self.sampling.resolved_sampler(default_sampler)
        options = dataclasses.replace(self.sampling, sampler=sampler)
        return SampleRun(
            checkpoint,
            Path(out),
            self.num,
            options,
            ema=self.ema,
            batch=self.batch,
            autocast=self.autocast,
            label_counts=self.label_counts,
            npz=self.npz,
            prog=PROG,
        )

    def default_out(self, trainer: L.Trainer, checkpoint: str, run: SampleRun) -> str:
        """``<default_root_dir>/samples/<checkpoint>-step<N>_<ema>_<sampler><steps>_cfg<w>_<labels>_seed<s>_n<num>``."""
        options = run.options
        weights = "online" if self.ema is None else f"ema{self.ema}"
        cfg = 1.0 if options.cfg is None else options.cfg
        name = f"{Path(checkpoint).stem}-step{read_global_step(checkpoint)}_{weights}_{options.sampler}{options.steps}"
        name += f"_cfg{cfg:g}_{options.labels}_seed{options.seed}_n{self.num}"
        return os.path.join(trainer.default_root_dir, "samples", name)

    # ---- Lightning hooks ---------------------------------------------------------------------------------------
    def dataloader(self, checkpoint: str | os.PathLike | None) -> DataLoader:
        """Batches of the missing image indices of ``checkpoint``'s samples as :class:`SampleBatch`es.

        The indices are listed in :meth:`setup`, before any rank writes, and Lightning splits them over the ranks.
        """
        self.checkpoint = checkpoint
        return DataLoader(_Missing(self), batch_size=self.batch, shuffle=False, collate_fn=self._batch)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the options against the module and the folder; list the missing images."""
        if stage != "predict":
            return
        if not hasattr(pl_module, "denoiser"):
            raise ConfigError(
                "model",
                f"epg predict samples a stage-2 FinetuneModule, not {type(pl_module).__name__}; stage 1 makes no "
                "images (`epg validate` reports its val/knn_acc)",
            )
        checkpoint = self._checkpoint_file(trainer)
        copies = len(pl_module.ema_nets)
        if self.ema is not None and copies and not 0 <= self.ema < copies:
            raise ConfigError("sample.ema", f"{self.ema}, but the checkpoint keeps {copies} EMA copies (None: online)")
        self._ema = self.ema if copies else None  # no EMA kept: the online weights, as `epg sample` does
        net = select_network(pl_module, self._ema, PROG)
        try:
            run = self.sample_run(checkpoint, pl_module.loss.sampler, self.out or ".")
            if not self.out:  # the default folder is named after the resolved sampler and steps
                run = dataclasses.replace(run, out=Path(self.default_out(trainer, checkpoint, run)))
            self.run = run.open(pl_module.denoiser(net), trainer.global_rank)
        except SampleRunError as err:  # `epg sample`'s one-line messages
            raise ConfigError("sample", str(err)) from None
        self.todo = self.run.missing()
        self._done, self._start = 0, time.monotonic()
        self._last_report = self._start
        rank_zero_info(
            f"{PROG}: {len(self.todo)} of {self.num} images to write into {self.run.out} "
            f"(the images of `{self.run.command_line()}`)"
        )

    def _checkpoint_file(self, trainer: L.Trainer) -> str:
        checkpoint = None if self.checkpoint is None else str(self.checkpoint)
        if checkpoint == "last" and trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
            checkpoint = os.path.join(trainer.checkpoint_callback.dirpath, "last.ckpt")
        if not checkpoint or not os.path.exists(checkpoint):
            found = f"{checkpoint} does not exist" if checkpoint else "no checkpoint given"
            raise ConfigError("ckpt_path", f"{found}: epg predict samples a trained checkpoint, pass --ckpt_path FILE")
        return checkpoint

    def _batch(self, indices: list[int]) -> SampleBatch:
        return SampleBatch(list(indices), self.num, self.run.settings, self._ema)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        self.run.write(batch.indices, prediction)
        self._done += len(batch.indices)
        self._report(trainer)
        if trainer.received_sigterm and self._done < self._share(trainer):
            # Lightning's predict loop never looks at its SIGTERM flag: without this, `timeout`/`kill` were ignored
            # until all images were written. The PNGs so far are complete files; a rerun writes the missing ones.
            rank_zero_info(
                f"{PROG}: SIGTERM: stopped after {self._done} new images in {self.run.out}; rerun the same command to "
                "continue"
            )
            raise SIGTERMException

    def _share(self, trainer: L.Trainer) -> int:
        """This rank's number of images (Lightning's sampler pads the ranks to equal shares)."""
        return -(-len(self.todo) // trainer.world_size)

    def _report(self, trainer: L.Trainer) -> None:
        """A progress line after the first batch and then every PROGRESS_EVERY_S seconds (rank 0's count)."""
        now = time.monotonic()
        first = self._done <= self.batch
        if not first and now - self._last_report < PROGRESS_EVERY_S:
            return
        self._last_report = now
        todo = max(1, self._share(trainer))
        rate = self._done / max(now - self._start, 1e-9)
        left = (todo - self._done) / rate if rate > 0 else float("inf")
        rank_zero_info(
            f"{PROG}: {self._done}/{todo} images ({100 * self._done / todo:.1f}%), {rate:.1f} img/s, "
            f"~{_duration(left)} left" + (" (--sample.num N for fewer)" if first and left > 600 else "")
        )

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.barrier("SampleWriter.npz")
        if not trainer.is_global_zero:
            return
        try:
            self.run.finish(pl_module.denoiser())
        except SampleRunError as err:
            raise ConfigError("sample", str(err)) from None


def _duration(seconds: float) -> str:
    """The duration as 1 h 05 min, 3 min 20 s or 12 s."""
    if seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"

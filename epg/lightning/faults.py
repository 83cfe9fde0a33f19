"""Fault handling of long runs: atomic checkpoint files and folders, save-and-exit on SIGTERM and Ctrl-C, logger
versions kept across resumes, non-finite losses."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from epg.io import fsync_tree, remove, save_torch, swap_in_folder, swap_names

MAX_MESSAGE = 400  # characters of a ConfigError message (long key lists are cut)


class ConfigError(ValueError):
    """A bad configuration value; ``option`` is its dotted name in the config (e.g. ``model.init_args.preset``)."""

    def __init__(self, option: str, message: str) -> None:
        message = " ".join(message.split())  # one line
        self.option = option
        self.message = message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 1] + "…"
        super().__init__(f"{option}: {self.message}" if option else self.message)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN/inf (without a grad scaler that would skip the step)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a hidden ``.<name>.tmp-PID`` sibling, fsync, then ``os.replace`` onto ``path``
    (:func:`epg.io.save_torch` with ``fsync``): a killed save never corrupts the checkpoint.

    The rename is atomic on POSIX file systems, so ``path`` always holds either the previous or the new complete
    checkpoint. Remote paths (``s3://`` ...) fall back to Lightning's transactional write. EPGCLI installs this plugin
    by default; in a config: ``trainer.plugins: [{class_path: epg.lightning.faults.AtomicCheckpointIO}]``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_torch(checkpoint, path, fsync=True)  # fsyncs the file and, after the rename, its folder


# ---- atomic sharded checkpoint folders ---------------------------------------------------------------------------
# The folder swap itself (swap_names, swap_in_folder, recover_interrupted_swap) lives in epg.io, free of Lightning,
# so that epg.checkpoint can recover an interrupted swap without importing this module.


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2) whose sharded checkpoint folders are replaced atomically.

    The parent writes a sharded checkpoint (torch.distributed.checkpoint shard files and ``.metadata``, then rank 0's
    ``meta.pt``) in place, so a run killed while overwriting ``last.ckpt/`` leaves a mix of old and new shards. Here
    all ranks write into the hidden sibling ``.<name>.tmp`` (rank 0 deletes a stale one first), and once every rank
    is done rank 0 fsyncs it and swaps it in with :func:`epg.io.swap_in_folder`: at any instant the old or the new
    complete folder exists under the name or, for the moment between two renames, under ``.<name>.old``, which ``epg
    fit --ckpt_path last`` and :func:`epg.checkpoint.read_checkpoint` rename back
    (:func:`epg.io.recover_interrupted_swap`).
    The folder must be on a file system all ranks share. Full (``save_distributed_checkpoint=False``) checkpoints
    keep the parent's single-file save through the CheckpointIO (:class:`AtomicCheckpointIO` under EPGCLI).
    In a config: ``trainer.strategy: {class_path: epg.lightning.faults.AtomicModelParallelStrategy}``.

    The device mesh is pure FSDP2 by default: ``data_parallel_size`` = every rank (devices × nodes),
    ``tensor_parallel_size`` 1. Lightning's own default ("auto" for both) puts the devices of a node on a
    tensor-parallel axis, which the EPG modules do not implement (they shard over the data-parallel axis only): the
    ranks of a node would then read the same batches and train unsynchronised copies, and a sharded checkpoint would
    hold a mix of them (:meth:`epg.lightning.base.EPGModule.configure_model` refuses such a mesh).
    """

    def __init__(self, data_parallel_size: int | str = "auto", tensor_parallel_size: int | str = 1, **kwargs) -> None:
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size, **kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto" and self._tensor_parallel_size == 1:
            self._data_parallel_size = self.num_nodes * self.num_processes  # every rank shards the same networks
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint or storage_options is not None:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(os.fspath(filepath))).absolute()  # rank 0's path, as the parent does
        tmp = swap_names(path)[0]
        if self.global_rank == 0:
            remove(tmp)  # a half-written folder of a killed save
        self.barrier("epg_atomic_save_start")
        super().save_checkpoint(checkpoint, tmp)
        self.barrier("epg_atomic_save_written")
        if self.global_rank == 0:
            fsync_tree(tmp)  # the shard files are fsynced by torch.distributed.checkpoint, meta.pt is not
            swap_in_folder(tmp, path)
        self.barrier("epg_atomic_save_done")


def last_checkpoint_path(trainer: L.Trainer) -> str:
    """Where ``ckpt_path="last"`` looks: ``<dirpath>/last.ckpt`` of the first ModelCheckpoint that saves one.

    Falls back to the first ModelCheckpoint's folder, then to ``<default_root_dir>/checkpoints``.
    """
    callbacks = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
    saving = [cb for cb in callbacks if cb.save_last] or callbacks
    if saving:
        cb = saving[0]
        return os.path.join(cb.dirpath, cb.CHECKPOINT_NAME_LAST + cb.FILE_EXTENSION)
    return os.path.join(trainer.default_root_dir, "checkpoints", "last.ckpt")


class SigtermCheckpoint(Callback):
    """On SIGTERM (SLURM pre-emption, ``scancel``, ``kill``) or Ctrl-C (SIGINT) save ``last.ckpt`` and stop.

    Lightning (>=2.5) already installs a SIGTERM handler that only sets ``trainer.received_sigterm``; its loops then
    raise ``SIGTERMException`` (a ``SystemExit`` with status 0) at the next batch boundary, after the batch's
    optimizer step, LR step and callbacks, and call ``on_exception``. This callback saves the checkpoint there, to the
    path that ``--ckpt_path last`` (EPGCLI's default for ``fit``) picks up, so rerunning the same command continues.
    Under DDP Lightning broadcasts the flag from rank 0 so all ranks stop at the same step. DataLoader workers must
    survive the signal too when it goes to the whole process group (SLURM): EPGDataModule's loaders give them
    :func:`epg.data.pipeline.ignore_sigterm`.

    While training, a first Ctrl-C is handled as a SIGTERM (same batch boundary, same save; ``interrupted`` is then
    True and ``epg fit`` exits with status 130); a second one stops at once without saving. A Ctrl-C before
    training starts (set-up, checkpoint restore, sanity check) stops there: nothing is saved, a message says so and
    ``epg fit`` exits with status 130 too. Only ``fit`` saves: a signal during ``validate``/``predict`` writes no
    checkpoint.

    Args:
        path: checkpoint file to write (default: :func:`last_checkpoint_path`).
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.interrupted = False  # by Ctrl-C
        self._previous_sigint: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning's SIGTERM handler is in place from here on (it is registered just before the loops run).
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        on_sigterm = signal.getsignal(signal.SIGTERM)
        if self.interrupted or not callable(on_sigterm):
            raise KeyboardInterrupt
        self.interrupted = True
        rank_zero_info("Ctrl-C: saving last.ckpt after this step, then stopping (Ctrl-C again: stop now, no save)")
        on_sigterm(signal.SIGTERM, frame)

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_sigint()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if trainer.state.fn != TrainerFn.FITTING:  # validate/predict stopped by a signal: no training state to save
            return
        if isinstance(exception, KeyboardInterrupt):
            # Ctrl-C before on_train_start (set-up, restore, sanity check): Lightning's own handler is still in
            # place; it tears down and exits with status 1, which `epg fit` turns into 130 (epg.cli). Nothing is
            # written: a checkpoint at that point would hold no more than the one the run started from.
            if self.interrupted:  # the second Ctrl-C of _on_sigint
                rank_zero_info("Ctrl-C again: stopped at once, no checkpoint written")
            else:
                rank_zero_info(
                    f"Ctrl-C before training started (step {trainer.global_step}): stopped, no checkpoint written; "
                    "rerun the same `epg fit` command to start"
                )
            self.interrupted = True
            return
        if not isinstance(exception, SIGTERMException):
            return
        path = self.path or last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        signal_name = "Ctrl-C" if self.interrupted else "SIGTERM"
        rank_zero_info(
            f"{signal_name}: saved {path} at step {trainer.global_step}; rerun the same `epg fit` command to continue"
        )


class LoggerVersions(Callback):
    """Keeps each logger's version (e.g. TensorBoard's ``version_N``) in the checkpoints, under ``KEY``, so that
    EPGCLI resumes a run into the same logger folder instead of opening a new version per resume."""

    KEY = "epg_logger_versions"

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[self.KEY] = [logger.version for logger in trainer.loggers]


# ---- non-finite loss -----------------------------------------------------------------------------------------------
def _scalar(value: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """A 0-d float32 tensor on ``device``; Python numbers become a fill kernel, not a (syncing) host copy."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float32).reshape(())
    return torch.full((), float(value), device=device)


class NonFiniteWatch:
    """Remembers, on the device, the first training step whose loss was NaN/inf and the σ' span of that step.

    ``record`` runs every step with a few tiny kernels and no host sync; ``check`` syncs (and, under DDP, gathers
    the ranks' records) and raises :class:`NonFiniteLossError`. Checking every step would stall the GPU pipeline once
    per step, so the owner checks on logging steps and before every checkpoint save: detection may lag by up to
    ``log_every_n_steps`` steps, but the error names the step where the loss first went bad, and no checkpoint
    written after it is ever kept.
    """

    def __init__(self, label: str = "σ'") -> None:
        self.label = label
        self.state: torch.Tensor | None = None  # [seen, step, σ'_lo, σ'_hi]

    def reset(self) -> None:
        self.state = None

    def record(self, loss: torch.Tensor, step: int, lo: torch.Tensor | float, hi: torch.Tensor | float) -> None:
        loss = loss.detach()
        device = loss.device
        if self.state is None or self.state.device != device:
            self.state = torch.zeros(4, device=device)
        bad = ~torch.isfinite(loss).all()
        row = torch.stack([_scalar(1.0, device), _scalar(step, device), _scalar(lo, device), _scalar(hi, device)])
        self.state = torch.where(bad & (self.state[0] == 0), row, self.state)

    def describe(self) -> str:
        """This rank's first recorded non-finite loss as "step S (σ' = …)", or "none recorded" (syncs)."""
        seen, step, lo, hi = self.state.tolist() if self.state is not None else (0, 0, 0, 0)
        if not seen:
            return "none recorded (the gradients overflowed)"
        span = f"= {lo:.4g}" if lo == hi else f"in [{lo:.4g}, {hi:.4g}]"
        return f"step {int(step)} ({self.label} {span})"

    def check(self, module: L.LightningModule, now: int) -> None:
        """Raise :class:`NonFiniteLossError` if any rank recorded a non-finite loss (a collective under DDP)."""
        trainer = module._trainer
        state = self.state if self.state is not None else torch.zeros(4, device=module.device)
        if trainer is not None and trainer.world_size > 1:
            state = module.all_gather(state.to(module.device)).reshape(-1, 4)
            seen = state[state[:, 0] > 0]
            state = seen[seen[:, 1].argmin()] if len(seen) else state[0]
        seen, step, lo, hi = state.tolist()
        if seen:
            span = f"{lo:.4g}" if lo == hi else f"[{lo:.4g}, {hi:.4g}]"
            raise NonFiniteLossError(
                f"non-finite loss at step {int(step)} ({self.label} {'=' if lo == hi else 'in'} {span}; "
                f"detected at step {now}); no checkpoint after it was written: resume from the last one with a "
                "lower lr or tighter grad clipping (and --accept_changed_hparams), or train with precision 16-mixed, "
                "whose grad scaler skips such steps"
            )

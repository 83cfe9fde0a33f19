"""CPU fits of the real modules for tests/test_resume.py and tests/test_faults.py (killed, resumed, SIGTERMed).

usage: fault_fit.py {finetune,pretrain} OUT [--steps N] [--delay S] [--workers N]

Each run resumes from OUT/checkpoints/last.ckpt when it exists (``ckpt_path="last"``), so rerunning the same
command continues a killed run; at the end it writes OUT/final.pt (step counters, module and optimizer state).
The data is deterministic per epoch (an epoch-seeded sampler) with one batch per epoch, so every checkpoint lies on
an epoch boundary and the data order after a resume is exact too.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from epg.data.pipeline import ignore_sigterm
from epg.lightning.faults import AtomicCheckpointIO, SigtermCheckpoint

BATCH = 8


class Images(torch.utils.data.Dataset):
    """Deterministic 16-px images (labels 0-9); ``views`` adds the two stage-1 views."""

    def __init__(self, n: int = 64, views: bool = False) -> None:
        self.n, self.views = n, views

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        x = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(i)).clamp(-1, 1)
        y = torch.tensor(i % 10)
        return (x, x.flip(-1), x.roll(1, -1), y) if self.views else (x, y)


class EpochSampler(torch.utils.data.Sampler):
    """``size`` indices per epoch, drawn by (seed, epoch): Lightning calls ``set_epoch`` at every epoch start."""

    def __init__(self, n: int, size: int, seed: int = 0) -> None:
        self.n, self.size, self.seed, self.epoch = n, size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g)[: self.size].tolist())


class Delay(L.Callback):
    """Sleep after every training batch, so a test can kill the run between steps."""

    def __init__(self, seconds: float = 0.2) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)


class PauseAtSetup(L.Callback):
    """Inside ``trainer.fit`` but before on_train_start (no step yet): create ``marker``, then sleep, so a test can
    send Ctrl-C at that moment."""

    def __init__(self, marker: str, seconds: float = 60.0) -> None:
        self.marker, self.seconds = marker, seconds

    def setup(self, trainer, pl_module, stage) -> None:
        Path(self.marker).touch()
        time.sleep(self.seconds)


class EpochData(L.LightningDataModule):
    """One batch per epoch through :class:`EpochSampler`; workers (if any) ignore SIGTERM."""

    def __init__(self, views: bool, workers: int = 0) -> None:
        super().__init__()
        self.data, self.workers = Images(views=views), workers
        self.sampler = EpochSampler(len(self.data), BATCH)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        # On resume Lightning builds the first iterator before its set_epoch call, and a loader with workers draws
        # indices right then: set the epoch that runs next, = steps done (one batch per epoch, no accumulation).
        self.sampler.set_epoch(self.trainer.global_step)
        kwargs = dict(num_workers=self.workers, persistent_workers=True, worker_init_fn=ignore_sigterm)
        return torch.utils.data.DataLoader(self.data, BATCH, sampler=self.sampler, **(kwargs if self.workers else {}))


def build(mode: str, workers: int = 0) -> tuple[L.LightningModule, EpochData]:
    """The module of ``mode`` (EPG-Nano/4) and its one-batch-per-epoch data."""
    from epg.lightning.finetune import FinetuneModule
    from epg.lightning.pretrain import PretrainModule

    torch.manual_seed(0)
    if mode == "finetune":
        module = FinetuneModule(
            preset="EPG-Nano/4", warmup_steps=2, total_steps=20, lr=1e-3, ema_rates=(0.5, 0.9), sample_every_n_val=0
        )
    else:
        module = PretrainModule(preset="EPG-Nano/4", warmup_steps=2, total_steps=20, lr=1e-3)
    return module, EpochData(views=mode == "pretrain", workers=workers)


def final_state(trainer: L.Trainer, module: L.LightningModule) -> dict:
    """What tests compare between an interrupted and an uninterrupted run."""
    return {
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "updates": module.updates,
        "state_dict": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "optimizer": trainer.optimizers[0].state_dict(),
        "lr": trainer.optimizers[0].param_groups[0]["lr"],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["finetune", "pretrain"])
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    module, data = build(args.mode, args.workers)
    callbacks = [
        ModelCheckpoint(dirpath=os.path.join(args.out, "checkpoints"), every_n_train_steps=1, save_last=True),
        SigtermCheckpoint(),
    ]
    if args.delay:
        callbacks.append(Delay(args.delay))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=args.out,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(module, datamodule=data, ckpt_path="last", weights_only=True)
    torch.save(final_state(trainer, module), os.path.join(args.out, "final.pt"))


if __name__ == "__main__":
    main()

"""Multi-process fits for tests/test_scale.py (Lightning's launcher re-runs this file once per rank).

usage: scale_fit.py MODE OUT [--devices N] [--steps N] [--resume CKPT]
  ddp-equiv   FinetuneModule (DM) one step with σ and ε fixed per sample; rank 0 saves loss and gradients
  pretrain    PretrainModule DDP fit; saves a checkpoint
  finetune    FinetuneModule DDP fit (DM and CM); saves checkpoints
  fsdp        FinetuneModule under AtomicModelParallelStrategy (FSDP2) with save/resume; OUT/ckpts/last.ckpt is
              saved after every step, each time over a stray file that rank 0 drops into the previous one
"""

import argparse
import os
import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

import epg.method.objectives.diffusion as objectives
from epg.lightning.faults import AtomicModelParallelStrategy
from epg.lightning.finetune import FinetuneModule
from epg.lightning.pretrain import PretrainModule


class Digits(torch.utils.data.Dataset):
    """Deterministic 16-px images and labels; ``views`` adds the two stage-1 views."""

    def __init__(self, n: int = 64, views: bool = False) -> None:
        self.n, self.views = n, views

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(3, 16, 16, generator=g).clamp(-1, 1)
        y = torch.tensor(i % 10)
        if self.views:
            return x, x.flip(-1), x.roll(1, -1), y
        return x, y


def fixed_draws() -> None:
    """Make the DM σ index and noise functions of each sample, so they do not depend on how ranks split the batch."""

    def sigma_index(batch, p_mean, p_std, n, generator=None, device=None):
        return fixed_draws.index

    def noise(x, generator=None):
        fixed_draws.index = (x.flatten(1).sum(1).abs() * 1e3).long() % 1280  # used by the next σ draw
        return torch.sin(x * 37.0 + 1.0)

    objectives.dm_sigma_index = sigma_index
    objectives.gaussian_like = noise


class StrayFile(L.Callback):
    """Before each save of ``last.ckpt/`` rank 0 drops into the previous folder a shard file that no save writes.

    It stands for a shard of an earlier save (another world size) or of a save killed half-way: a folder written in
    place keeps it next to the new shards; a folder swapped in whole does not.
    """

    def __init__(self, checkpoint: ModelCheckpoint) -> None:
        self.checkpoint = checkpoint

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # runs before ModelCheckpoint's
        folder = os.path.join(self.checkpoint.dirpath, "last.ckpt")
        if trainer.global_rank == 0 and os.path.isdir(folder):
            with open(os.path.join(folder, "__7_0.distcp"), "wb") as f:
                f.write(b"stale")


def trainer(args, strategy, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_steps=args.steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=args.out,
        **kw,
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode")
    p.add_argument("out")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--resume", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    ddp = DDPStrategy(process_group_backend="gloo") if args.devices > 1 else "auto"
    global_batch = 16
    local = global_batch // args.devices
    # One batch per epoch: Lightning restarts a map-style epoch on resume, so exact-resume checks use 1-step epochs.
    n = global_batch
    if args.mode == "ddp-equiv":
        # Noise is drawn before σ in our patched order: swap the calls by drawing noise first via the patch.
        fixed_draws()
        original = objectives.DiffusionLoss.terms

        def loss_with_noise_first(self, denoiser, x0, y, *args, **kw):
            objectives.gaussian_like(x0)  # sets the per-sample σ index
            return original(self, denoiser, x0, y, *args, **kw)

        objectives.DiffusionLoss.terms = loss_with_noise_first
        module = FinetuneModule(preset="EPG-Nano/4", warmup_steps=0, total_steps=10, sample_every_n_val=0)
        for prm in module.net.parameters():  # leave the zero-init output so every parameter gets a gradient
            prm.data.add_(torch.randn_like(prm) * 0.05)
        grads = {}

        class Grab(L.Callback):
            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                grads.update({n: q.grad.detach().clone() for n, q in pl_module.net.named_parameters()})

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                grads["loss"] = trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")

        loader = torch.utils.data.DataLoader(Digits(global_batch), batch_size=local, shuffle=False)
        trainer(args, ddp, enable_checkpointing=False, callbacks=[Grab()], use_distributed_sampler=True).fit(
            module, loader
        )
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            torch.save(grads, os.path.join(args.out, f"grads_{args.devices}.pt"))
        return
    if args.mode == "pretrain":
        module = PretrainModule(preset="EPG-Nano/4", warmup_steps=1, total_steps=100)
        loader = torch.utils.data.DataLoader(Digits(n, views=True), batch_size=local, drop_last=True)
        t = trainer(args, ddp)
    elif args.mode == "finetune":
        module = FinetuneModule(preset="EPG-Nano/4", warmup_steps=1, total_steps=100, sample_every_n_val=0)
        loader = torch.utils.data.DataLoader(Digits(n), batch_size=local, drop_last=True)
        t = trainer(args, ddp)
    elif args.mode == "fsdp":
        phema = {"sigma_rels": (0.05, 0.1), "snapshot_every": 1, "snapshot_dtype": "float32"}  # method.md §13
        module = FinetuneModule(
            preset="EPG-Nano/4",
            warmup_steps=2,
            total_steps=100,
            sample_every_n_val=0,
            ema_rates=(0.9, 0.5),
            phema=phema,
        )
        loader = torch.utils.data.DataLoader(Digits(n), batch_size=local, drop_last=True)
        last = ModelCheckpoint(os.path.join(args.out, "ckpts"), save_last=True, save_top_k=0, every_n_train_steps=1)
        t = trainer(args, AtomicModelParallelStrategy(), callbacks=[StrayFile(last), last])
    else:
        sys.exit(f"unknown mode {args.mode}")
    t.fit(module, loader, ckpt_path=args.resume)
    if args.mode == "fsdp":  # parameters really are sharded across the ranks
        assert type(module.net.encoder.pos_embed).__name__ == "DTensor"
        qkv = module.net.encoder.blocks[0].attn.qkv.weight  # (96, 32): 48 rows on each of the 2 ranks
        assert tuple(qkv.shape) == (96, 32) and tuple(qkv.to_local().shape) == (48, 32), qkv.to_local().shape
        assert type(module.phema.nets[1].encoder.pos_embed).__name__ == "DTensor"  # the post-hoc EMA copies too
    path = os.path.join(args.out, f"final_{args.mode}_{args.steps}.ckpt")
    t.save_checkpoint(path)
    if t.global_rank == 0:
        print(f"RESULT updates={module.updates} global_step={t.global_step} world={t.world_size} ckpt={path}")


if __name__ == "__main__":
    main()

"""img/s, TFLOP/s and MFU of training steps (through the real LightningModules and Trainer) and of sampling: the
library of `epg bench` (:mod:`epg.commands.bench`). The numbers in README.md's performance table come from
`benchmarks/gpu_check.sh`.

FLOPs are analytic (epg.nn.flops): one multiply-add = 2 FLOPs, a training pass = forward + 2× forward for backward.
"""

from __future__ import annotations

import os
import platform
import sys
import time
import warnings

import torch

from epg.io import pick_device
from epg.nn.flops import forward_macs, train_flops_per_image
from epg.nn.presets import get_config
from epg.sampling.options import AUTOCAST


def _device() -> str:
    return pick_device().type


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class _SyntheticBatches(torch.utils.data.IterableDataset):
    """The same ready-made batch forever (data loading is benchmarked separately: benchmarks/data_loading.py)."""

    def __init__(self, batch: tuple[torch.Tensor, ...]) -> None:
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


def _make_module(stage: str, preset: str, overrides: dict, compile_network: bool, warmup_steps: int):
    """The real module with its paper settings; its LR warm-up ends with the benchmark's untimed steps."""
    if stage == "finetune":
        from epg.lightning.finetune import FinetuneModule

        return FinetuneModule(
            preset=preset, network=overrides, warmup_steps=warmup_steps, sample_every_n_val=0, compile=compile_network
        )
    from epg.lightning.pretrain import PretrainModule

    return PretrainModule(preset=preset, network=overrides, warmup_steps=warmup_steps, compile=compile_network)


def bench_train(
    stage: str,
    preset: str,
    batch: int,
    steps: int = 20,
    warmup: int = 5,
    precision: str = "bf16-mixed",
    compile_network: bool = False,
    grad_checkpointing: bool = False,
    peak_tflops: float | None = None,
    check_syncs: bool = False,
) -> dict:
    """Time ``steps`` training steps (after ``warmup``) of the real module in a Lightning Trainer on one device.

    The ``warmup`` untimed steps are also the module's LR warm-up, so the timed steps are what 99% of a real run is:
    past warm-up, with the DM's gradient clipping on (``clipped_timed_steps`` in the result says how many clipped).
    """
    import lightning as L

    device = _device()
    overrides = {"grad_checkpointing": True} if grad_checkpointing else {}
    cfg = get_config(preset, **overrides)
    module = _make_module(stage, preset, overrides, compile_network, warmup_steps=warmup)
    size = (batch, 3, cfg.image_size, cfg.image_size)
    gen = torch.Generator().manual_seed(0)
    images = [torch.randn(size, generator=gen).clamp(-1, 1) for _ in range(3 if stage == "pretrain" else 1)]
    labels = torch.randint(0, cfg.num_classes or 1, (batch,), generator=gen)
    data = (*images, labels)
    if device == "cuda":
        data = tuple(t.cuda() for t in data)
    loader = torch.utils.data.DataLoader(_SyntheticBatches(data), batch_size=None)
    times: list[float] = []
    clipped: list[int] = []  # the module's clipped-update count at the start and end of the timed window
    sync_warnings: list[str] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == warmup:
                _sync(device)
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    if check_syncs:
                        torch.cuda.set_sync_debug_mode("warn")
                times.append(time.perf_counter())
                clipped.append(pl_module.clipped_updates)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == warmup + steps - 1:
                if device == "cuda" and check_syncs:
                    torch.cuda.set_sync_debug_mode("default")
                _sync(device)
                times.append(time.perf_counter())
                clipped.append(pl_module.clipped_updates)

    trainer = L.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=10**9,  # no per-step logging work inside the timed window
        callbacks=[Timer()],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, train_dataloaders=loader)
        sync_warnings = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    seconds = times[1] - times[0]
    img_s = batch * steps / seconds
    flops = train_flops_per_image(stage, preset, **overrides)
    tflops = img_s * flops / 1e12
    result = {
        "kind": "train",
        "stage": stage,
        "preset": preset,
        "batch": batch,
        "steps": steps,
        "precision": precision,
        "compile": compile_network,
        "grad_checkpointing": grad_checkpointing,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "seconds": round(seconds, 4),
        "images_per_s": round(img_s, 2),
        "train_gflops_per_image": round(flops / 1e9, 2),
        "tflops": round(tflops, 3),
        "lr_warmup_steps": warmup,
        "clipped_timed_steps": clipped[1] - clipped[0],
    }
    if peak_tflops:
        result["mfu"] = round(tflops / peak_tflops, 4)
    if device == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if check_syncs:
        result["host_syncs_in_timed_steps"] = len(sync_warnings)
    return result


@torch.no_grad()
def bench_sample(
    preset: str,
    batch: int,
    steps: int = 32,
    guidance: float | None = 2.5,
    repeats: int = 2,
    autocast: str | None = None,
    compile_network: bool = False,
    peak_tflops: float | None = None,
) -> dict:
    """Time the sampler (Heun, interval CFG) on a randomly initialised network of ``preset``.

    TFLOP/s count 2 FLOPs per multiply-add of one forward pass per network evaluation (the NFE, CFG pairs included;
    ``epg.nn.flops.forward_macs``); ``peak_tflops`` adds the MFU.
    """
    from epg.method.denoiser import Denoiser
    from epg.nn.network import build_network
    from epg.sampling import sample

    device = _device()
    net = build_network(preset).to(device).eval()
    for p in net.parameters():  # leave the zero-init output so the work is not trivially skipped
        p.normal_(0, 0.02)
    if compile_network:
        net.compile()
    den = Denoiser(net, "x0")
    cfg = net.config
    z = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device)
    y = torch.randint(0, cfg.num_classes or 1, (batch,), device=device)
    dtype = AUTOCAST[autocast or "none"]
    run = lambda: sample(den, z, y, steps=steps, guidance=guidance, autocast=dtype, return_info=True)  # noqa: E731
    info = run()  # warm-up (and compilation)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        info = run()
    _sync(device)
    seconds = (time.perf_counter() - start) / repeats
    tflops = batch * info.nfe * 2 * forward_macs(preset).total / seconds / 1e12
    result = {
        "kind": "sample",
        "preset": preset,
        "batch": batch,
        "sampler": "heun",
        "steps": steps,
        "guidance": guidance,
        "nfe": info.nfe,
        "autocast": autocast or "fp32",
        "compile": compile_network,
        "seconds_per_batch": round(seconds, 4),
        "images_per_s": round(batch / seconds, 2),
        "tflops": round(tflops, 3),
    }
    if peak_tflops:
        result["mfu"] = round(tflops / peak_tflops, 4)
    return result


def environment() -> dict:
    """What the numbers were measured on."""
    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return env

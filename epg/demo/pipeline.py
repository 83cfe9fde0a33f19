"""`epg demo`'s steps in order, each printed with its elapsed time, and the JSON summary (OUT/summary.json).

Steps: prepare the shards (OUT/data), ensure the FID Inception weights, stage-1 pre-training (method.md §3) with
``configs/demo/pretrain.yaml``, the k-NN accuracy of its encoder and of a random-init one of the same preset (val
digits classified by their neighbours among the train digits, as ``val/knn_acc``), stage-2 fine-tuning from the
stage-1 checkpoint as a diffusion model (§4, ``finetune_dm.yaml``) or a consistency model (§5, ``finetune_cm.yaml``),
then with the first EMA copy: a 10x10 grid (row c = class c, fixed seed), N class-balanced samples scored by FID
against the val split (cached reference statistics) and by the class accuracy of a small digit classifier
(:mod:`epg.eval.digits`); when stage 2 kept post-hoc EMA snapshots, the same scores of a few reconstructed σ_rel
profiles and their plot (:mod:`epg.demo.phema`). ``device="gpu"`` uses ``configs/demo/gpu/*.yaml`` (the CPU recipe
trained longer; with ``accelerator="cpu"`` the same steps run on a CPU).
"""

from __future__ import annotations

import json
import os
import platform
import time

from epg.demo.evaluate import evaluate, stage1_knn
from epg.demo.phema import evaluate_phema, has_snapshots
from epg.demo.settings import OBJECTIVES, DemoError, DemoSettings, load_yaml, log
from epg.demo.stages import run_length, run_stage


def run_demo(settings: DemoSettings) -> dict:
    """Run the demo's steps (skipping finished stages) and write the summary; returns it. Raises DemoError."""
    start = time.perf_counter()
    out = settings.out
    pre_cfg, ft_cfg = settings.pretrain_config, settings.finetune_config
    for path in (pre_cfg, ft_cfg):
        if not path.is_file():
            raise DemoError(f"no config {path}; run from the repository root or pass --config-dir")
    pre, ft = load_yaml(pre_cfg), load_yaml(ft_cfg)
    pre_steps = settings.pretrain_steps or run_length(pre)
    ft_steps = settings.finetune_steps or run_length(ft)
    data_dir, pre_dir = out / "data", out / "pretrain"
    ft_dir = out / OBJECTIVES[settings.objective]
    timings: dict[str, float] = {}
    summary: dict = {
        "objective": settings.objective,
        "device": settings.device,
        "threads": settings.threads,
        "configs": {"pretrain": str(pre_cfg), "finetune": str(ft_cfg)},
        "pretrain_steps": pre_steps,
        "finetune_steps": ft_steps,
        "host": platform.node(),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    log(f"objective {settings.objective}, device {settings.device}, {settings.threads} threads, output {out}", start)

    def step(name: str, func) -> object:
        t0 = time.perf_counter()
        log(f"{name} ...", start)
        result = func()
        timings[name] = round(time.perf_counter() - t0, 1)
        log(f"{name}: done in {timings[name]}s" + (f" - {result}" if isinstance(result, str) else ""), start)
        return result

    if settings.fresh:
        import shutil

        for folder in (pre_dir, ft_dir):
            shutil.rmtree(folder, ignore_errors=True)

    def prepare() -> str:
        from epg.data.demo import prepare_demo

        info = prepare_demo(data_dir)
        return f"{info['train_shards']} + {info['val_shards']}"

    def inception() -> str:
        from epg.eval.inception_weights import ensure_inception_weights

        return str(ensure_inception_weights(verbose=True))

    step("prepare shards", prepare)
    step("Inception weights", inception)
    step("stage 1: pre-training", lambda: run_stage("stage 1", pre_cfg, pre_dir, data_dir, pre_steps, [], settings))
    pre_ckpt = pre_dir / "checkpoints" / "last.ckpt"
    knn = step("stage 1: k-NN check", lambda: stage1_knn(pre_ckpt, data_dir, pre, settings))
    summary["stage1_knn"] = knn
    log(
        f"stage-1 {knn['k']}-NN accuracy (val digits against the train digits): {knn['stage1']:.3f}, "
        f"random-init encoder {knn['random_init']:.3f}: a gain of {knn['gain']:+.3f}",
        start,
    )
    init = ["--model.init_args.init_from", str(pre_ckpt)]
    step(
        f"stage 2: {settings.objective} fine-tuning",
        lambda: run_stage("stage 2", ft_cfg, ft_dir, data_dir, ft_steps, init, settings),
    )
    ckpt = ft_dir / "checkpoints" / "last.ckpt"
    summary["settings"] = {"pretrain": pre["model"]["init_args"], "finetune": ft["model"]["init_args"]}
    summary.update(step("evaluation", lambda: evaluate(ckpt, data_dir, settings, ft, start)))
    if settings.sigma_rels and has_snapshots(ft_dir):  # stage 2 kept post-hoc EMA profiles (method.md §13)
        phema = lambda: evaluate_phema(ft_dir, ckpt, data_dir, settings, ft, start)  # noqa: E731
        summary["phema"] = step("post-hoc EMA", phema)
    summary["timings_s"] = timings
    summary["total_s"] = round(time.perf_counter() - start, 1)
    summary["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    summary["checkpoints"] = {"pretrain": str(pre_dir / "checkpoints"), "finetune": str(ckpt)}
    from epg.io import write_text

    text = json.dumps(summary, indent=2, default=str)
    write_text(out / "summary.json", text)
    write_text(out / f"summary_{settings.objective}.json", text)  # kept when the other objective runs next
    return summary

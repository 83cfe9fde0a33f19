"""`epg demo`: the whole pipeline on the embedded MNIST digits: data, stage 1, stage 2, grid, FID, class accuracy.

Steps (each printed with its elapsed time): prepare the shards (OUT/data), ensure the FID Inception weights, stage-1
pre-training (method.md §3) with ``configs/demo/pretrain.yaml``, the k-NN accuracy of its encoder and of a random-init
one of the same preset (val digits classified by their neighbours among the train digits, as ``val/knn_acc``),
stage-2 fine-tuning from the stage-1 checkpoint as a diffusion model (§4, ``finetune_dm.yaml``) or a consistency
model (§5, ``finetune_cm.yaml``), then with the first EMA copy: a 10x10 grid (row c = class c, fixed seed), N
class-balanced samples scored by FID against the val split (cached reference statistics) and by the class accuracy
of a small digit classifier (:mod:`epg.eval.digits`), and a JSON summary (OUT/summary.json). ``--device gpu`` uses
``configs/demo/gpu/*.yaml`` (the CPU recipe trained longer; with ``--accelerator cpu`` the same steps run on a CPU).

The Lightning fits run as subprocesses of `epg fit` (own thread settings; a finished stage is skipped and an
interrupted one resumes from its last checkpoint). Measured results of the demo configurations (2 shared CPU cores)
are in the YAML headers and the project notes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

OBJECTIVES = {"diffusion": "finetune_dm", "consistency": "finetune_cm"}
DEVICES = ("cpu", "gpu")
# Per device: stage lengths, FID sample count, reference size (the val split has 500 digits), eval batch.
DEFAULTS = {
    "cpu": {"fid_samples": 500, "fid_ref": 500, "batch": 100},
    "gpu": {"fid_samples": 2000, "fid_ref": 500, "batch": 500},
}
VAL_DIGITS = 500  # the embedded digits' val split
GRID_SEED = 0
FID_SEED = 1


class DemoError(RuntimeError):
    """A demo step failed; the message says which and what to look at."""


# ---- helpers ------------------------------------------------------------------------------------------------------
def default_config_dir() -> Path:
    """configs/demo of the source tree this package lives in, else of the working directory."""
    here = Path(__file__).resolve().parents[1] / "configs" / "demo"
    return here if here.is_dir() else Path.cwd() / "configs" / "demo"


def _log(message: str, start: float) -> None:
    print(f"[epg demo {time.perf_counter() - start:7.1f}s] {message}", flush=True)


def _load_yaml(path: Path) -> dict:
    import yaml

    with open(path) as f:
        return yaml.safe_load(f)


def checkpoint_state(path: Path) -> tuple[int, dict]:
    """The Lightning global step and hyper-parameters of a checkpoint ((-1, {}) when missing or unreadable)."""
    if not path.is_file():
        return -1, {}
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a truncated file counts as missing
        return -1, {}
    return int(ckpt.get("global_step", -1)), dict(ckpt.get("hyper_parameters") or {})


def checkpoint_step(path: Path) -> int:
    """The Lightning global step stored in a checkpoint (-1 when there is none or it cannot be read)."""
    return checkpoint_state(path)[0]


def checkpoint_every(steps: int, every: int) -> int:
    """The largest checkpoint interval ≤ ``every`` that divides ``steps`` (so the last step is always saved)."""
    return max(d for d in range(1, min(every, steps) + 1) if steps % d == 0)


def run_length(cfg: dict) -> int:
    """A config's steps: its ``trainer.max_steps``, which defaults to the model's ``total_steps``."""
    return int(cfg["trainer"].get("max_steps") or cfg["model"]["init_args"]["total_steps"])


def schedule_args(cfg: dict, steps: int) -> list[str]:
    """Overrides that rescale a config's step-valued schedule (warm-up, LR steps, ECT stages) to ``steps``."""
    init, planned = cfg["model"]["init_args"], run_length(cfg)
    loss = (init.get("loss") or {}).get("init_args") or {}  # the ECT stages are the loss object's (ConsistencyLoss)
    scale = steps / planned
    args = []
    for prefix, options, keys in (("", init, ("warmup_steps",)), ("loss.init_args.", loss, ("ect_d0", "ect_d1"))):
        for key in keys:
            if key in options and steps != planned:
                args += [f"--model.init_args.{prefix}{key}", str(max(1, round(options[key] * scale)))]
    if "lr_milestones" in init and steps != planned:
        milestones = [max(1, round(m * scale)) for m in init["lr_milestones"]]
        args += ["--model.init_args.lr_milestones", json.dumps(milestones)]
    callbacks = cfg["trainer"].get("callbacks") or []
    every = next((c["init_args"].get("every_n_train_steps") for c in callbacks if "every_n_train_steps" in str(c)), 0)
    args += ["--trainer.callbacks.init_args.every_n_train_steps", str(checkpoint_every(steps, every or steps))]
    return args


def fit_args(
    config: Path,
    run_dir: Path,
    data_dir: Path,
    steps: int,
    accelerator: str | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
) -> list[str]:
    """`epg fit` arguments that point a demo config at ``run_dir``/``data_dir`` and set its length."""
    args = ["-c", str(config), "--trainer.max_steps", str(steps), "--model.init_args.total_steps", str(steps)]
    args += schedule_args(_load_yaml(config), steps)
    args += ["--trainer.default_root_dir", str(run_dir)]  # the checkpoints and TensorBoard logs go in it
    args += ["--data.train_shards", str(data_dir / "train"), "--data.val_shards", str(data_dir / "val")]
    if batch_size is not None:
        args += ["--data.global_batch_size", str(batch_size), "--data.val_batch_size", str(batch_size)]
    if num_workers is not None:
        args += ["--data.num_workers", str(num_workers)]
    if accelerator is not None:
        args += ["--trainer.accelerator", accelerator]
        if accelerator == "cpu":
            args += ["--trainer.precision", "32-true"]
    return args


def run_fit(args: list[str], threads: int, log_file: Path) -> None:
    """Run `epg fit ARGS` in a subprocess with ``threads`` intra-op threads; raise DemoError on failure."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("PYTHONWARNINGS", "ignore")
    command = [sys.executable, "-m", "epg.cli", "fit", *args]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as log:
        done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-15:])
        raise DemoError(f"`epg fit {' '.join(args)}` failed (exit {done.returncode}); log {log_file}:\n{tail}")


def run_stage(
    name: str, config: Path, run_dir: Path, data_dir: Path, steps: int, extra: list[str], opts: argparse.Namespace
) -> str:
    """Fit one stage unless its last checkpoint is complete; resume an interrupted run. Returns what was done."""
    last = run_dir / "checkpoints" / "last.ckpt"
    done, hparams = checkpoint_state(last)
    init = _load_yaml(config)["model"]["init_args"]
    for key in ("preset", "network", "objective"):
        if done >= 0 and key in init and hparams.get(key) != init[key]:
            raise DemoError(
                f"{name}: {last} was trained with {key}={hparams.get(key)!r}, but {config} has {init[key]!r}; "
                "rerun with --fresh (or another --out) to train from the start"
            )
    if done >= steps:
        return f"skipped ({last} is complete at step {done})"
    args = fit_args(config, run_dir, data_dir, steps, opts.accelerator, opts.batch_size, opts.num_workers) + extra
    if done >= 0:
        args += ["--ckpt_path", str(last)]
    run_fit(args, opts.threads, run_dir / "fit.log")
    if checkpoint_step(last) < steps:
        raise DemoError(f"{name}: `epg fit` ended without a complete {last}; see {run_dir / 'fit.log'}")
    return f"trained {steps} steps" + (f" (resumed from step {done})" if done >= 0 else "")


# ---- evaluation ---------------------------------------------------------------------------------------------------
def save_class_grid(denoiser, path: Path, settings, norm: str) -> None:
    """A 10x10 PNG grid, row c = ten samples of class c, image i from noise fixed by (settings.seed, i)."""
    from torchvision.utils import save_image

    from epg.sampling.image_grid import sample_grid

    classes = denoiser.null_label or 10
    save_image(sample_grid(denoiser, settings, classes * 10, norm, per_class=10), path)


def reference_images(val_dir: Path, count: int, size: int):
    """The first ``count`` val digits as uint8 NHWC at ``size`` px (ADM crop when the size differs)."""
    import numpy as np
    from PIL import Image

    from epg.data.adm_crop import adm_center_crop
    from epg.eval.digits import read_shards

    images, labels = read_shards(str(val_dir))
    images, labels = images[:count], labels[:count]
    if images.shape[1] != size:
        images = np.stack([np.asarray(adm_center_crop(Image.fromarray(im), size)) for im in images])
    return images, labels


def _eval_device(opts: argparse.Namespace) -> str:
    """Where the evaluation runs: the GPU for ``--device gpu`` (unless ``--accelerator cpu``), else the CPU."""
    from epg.io import pick_device

    return str(pick_device("auto" if opts.device == "gpu" and opts.accelerator != "cpu" else "cpu"))


def stage1_knn(ckpt: Path, data_dir: Path, cfg: dict, opts: argparse.Namespace) -> dict:
    """k-NN accuracy (val digits against a bank of train digits) of the stage-1 encoder and a random-init one.

    The random-init encoder is the config's preset built after seeding with its ``seed_everything`` (the weights
    stage 1 starts from); both use the k-NN settings of the stage-1 run (``val/knn_acc``, :mod:`epg.lightning.knn`).
    The result is kept in ``knn.json`` beside the checkpoints folder for a rerun on the same checkpoint step.
    """
    import torch

    from epg.checkpoint import load_stage1_representation
    from epg.io import write_json
    from epg.lightning.knn import eval_loader, knn_accuracies
    from epg.nn.network import build_representation

    step, hp = checkpoint_state(ckpt)
    cache = ckpt.parent.parent / "knn.json"
    if cache.is_file() and json.loads(cache.read_text()).get("step") == step:
        return json.loads(cache.read_text())
    torch.set_num_threads(opts.threads)
    torch.manual_seed(int(cfg.get("seed_everything") or 0))
    encoders = {
        "random_init": build_representation(hp["preset"], **(hp.get("network") or {})).encoder,
        "stage1": load_stage1_representation(ckpt).encoder,
    }
    read = dict(
        image_size=encoders["stage1"].image_size, normalization=hp.get("normalization", "imagenet"), batch_size=500
    )
    bank = eval_loader(str(data_dir / "train"), subset=hp.get("knn_bank_size"), seed=hp.get("seed", 0), **read)
    val = eval_loader(str(data_dir / "val"), **read)
    k = hp.get("knn_k", 20)
    acc = knn_accuracies(
        encoders, bank, val, k=k, temperature=hp.get("knn_temperature", 0.07), device=_eval_device(opts)
    )
    result = {**acc, "gain": acc["stage1"] - acc["random_init"], "k": k, "step": step}
    write_json(cache, result)
    return result


def evaluate(ckpt: Path, out: Path, data_dir: Path, opts: argparse.Namespace, cfg: dict, start: float) -> dict:
    """Grid PNG, FID against the val split and class accuracy of the EMA weights of a stage-2 checkpoint."""
    import torch

    from epg.checkpoint import OBJECTIVE_SAMPLERS, load_denoiser
    from epg.eval.digits import class_accuracy, load_or_train
    from epg.eval.inception import InceptionFeatures, pool_features
    from epg.eval.metrics import fid_to_reference
    from epg.eval.reference import cached_reference, compute_reference, load_reference, reference_cache
    from epg.eval.sweep import sample_images
    from epg.sampling.generate import image_labels
    from epg.sampling.options import FINETUNE_LEGACY_KEYS, fold_legacy, legacy_values

    torch.set_num_threads(opts.threads)
    device = _eval_device(opts)
    init = cfg["model"]["init_args"]
    options = fold_legacy(init.get("sampling"), legacy_values(FINETUNE_LEGACY_KEYS, init), "epg demo")
    sampler = options.resolved_sampler(OBJECTIVE_SAMPLERS[init["objective"]])
    model = load_denoiser(ckpt, ema=0)
    denoiser = model.denoiser.to(device)
    guidance = options.guidance
    results: dict = {"sampler": sampler, "sampler_steps": options.steps, "cfg_scale": options.cfg}
    results["weights"] = model.weights
    results["cfg_interval"] = None if guidance is None or guidance.interval is None else list(guidance.interval)

    grid = out / f"samples_{opts.objective}.png"
    t0 = time.perf_counter()
    save_class_grid(denoiser, grid, options.settings(sampler, seed=GRID_SEED), model.normalization)
    results["grid"] = str(grid)
    results["grid_seconds"] = round(time.perf_counter() - t0, 1)
    _log(f"grid: {grid} (row c = class c) in {results['grid_seconds']}s", start)

    t0 = time.perf_counter()
    n = opts.fid_samples
    settings = options.settings(sampler, labels="balanced", seed=FID_SEED)
    batch = DEFAULTS[opts.device]["batch"]
    images = sample_images(denoiser, list(range(n)), n, settings, model.normalization, batch).numpy()
    labels = image_labels(denoiser, range(n), n, settings)  # the labels the generate loop gave the images
    results["sample_seconds"] = round(time.perf_counter() - t0, 1)
    _log(f"sampled {n} class-balanced images in {results['sample_seconds']}s", start)

    t0 = time.perf_counter()
    classifier = load_or_train(str(data_dir / "train"), out / "digit_classifier.pt")
    results["class_accuracy"] = class_accuracy(classifier, images, labels)
    real, real_labels = reference_images(data_dir / "val", opts.fid_ref, denoiser.image_size)
    results["classifier_val_accuracy"] = class_accuracy(classifier, real, real_labels)
    results["classifier_seconds"] = round(time.perf_counter() - t0, 1)
    _log(
        f"class accuracy of the samples: {results['class_accuracy']:.1%} (the classifier scores "
        f"{results['classifier_val_accuracy']:.1%} on real val digits)",
        start,
    )

    t0 = time.perf_counter()
    inception = InceptionFeatures(device)
    cache = out / f"fid_reference_val{opts.fid_ref}_{denoiser.image_size}px.npz"
    if opts.fid_ref >= VAL_DIGITS:  # the whole val split: the statistics the in-loop FID of stage 2 cached
        val, run_dir = str(data_dir / "val"), ckpt.parent.parent
        reference = cached_reference(val, run_dir, inception, batch, denoiser.image_size)
        cache = reference_cache(val, run_dir, denoiser.image_size)
    elif cache.is_file():
        reference = load_reference(cache)
    else:  # the first fid_ref val digits, as read above
        reference = compute_reference(real, inception, batch, name="val")
        reference.save(cache)
    fake = pool_features(images, inception, batch_size=batch)
    results["fid"] = fid_to_reference(fake, reference)
    results["fid_samples"], results["fid_reference"] = n, reference.count
    results["fid_reference_file"] = str(cache)
    results["inception_seconds"] = round(time.perf_counter() - t0, 1)
    _log(
        f"FID of {n} samples against {reference.count} val digits: {results['fid']:.2f} "
        f"(Inception {results['inception_seconds']}s; few samples bias FID upwards: compare at equal N only)",
        start,
    )
    return results


# Post-hoc EMA (method.md §13): the reconstructions the demo scores when stage 2 kept profiles, with fewer samples
# each (FID of 100 samples is biased upwards: compare these rows with each other, not with the main FID).
PHEMA_SIGMA_RELS = (0.03, 0.06, 0.10)
PHEMA_SAMPLES = 100


def evaluate_phema(run: Path, ckpt: Path, out: Path, data_dir: Path, opts: argparse.Namespace, cfg: dict, start: float):
    """FID and class accuracy of a few post-hoc EMA reconstructions of stage 2 (``evaluate`` on each), and a plot."""
    import shutil

    from epg.eval.phema import plot_sigma_rels, score_sigma_rels

    few = argparse.Namespace(**{**vars(opts), "fid_samples": min(opts.fid_samples, PHEMA_SAMPLES)})

    def score(path: Path) -> dict:
        folder = out / "phema" / path.stem
        folder.mkdir(parents=True, exist_ok=True)
        if (out / "digit_classifier.pt").is_file():  # the classifier trained once, not per σ_rel
            shutil.copy(out / "digit_classifier.pt", folder / "digit_classifier.pt")
        result = evaluate(path, folder, data_dir, few, cfg, start)
        return {key: result[key] for key in ("fid", "class_accuracy", "fid_samples", "grid")}

    # Written under the run folder, so that evaluate finds its cached val statistics (ckpt.parent.parent).
    rows = score_sigma_rels(run, PHEMA_SIGMA_RELS, score, checkpoint=ckpt, out=run / "phema_reconstructed")
    plot = out / f"phema_{opts.objective}.png"
    title = f"epg demo ({opts.objective}): post-hoc EMA, {few.fid_samples} samples per σ_rel"
    plot_sigma_rels(rows, plot, keys=("fid", "class_accuracy"), title=title)
    for row in rows:
        _log(
            f"post-hoc EMA σ_rel {row['sigma_rel']:g}: FID {row['fid']:.2f}, accuracy {row['class_accuracy']:.1%}",
            start,
        )
    return {"rows": rows, "plot": str(plot)}


# ---- the command --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The `epg demo` argument parser."""
    p = argparse.ArgumentParser(prog="epg demo", description=__doc__.splitlines()[0])
    p.add_argument("--objective", default="diffusion", choices=sorted(OBJECTIVES), help="stage-2 model (§4 or §5)")
    p.add_argument("--device", default="cpu", choices=DEVICES, help="cpu: the 15-min demo; gpu: trained longer")
    p.add_argument("--out", help="folder for data, checkpoints, logs, samples, summary.json (runs/demo, runs/demo_gpu)")
    p.add_argument("--fresh", action="store_true", help="retrain both stages even when their checkpoints exist")
    p.add_argument("--config-dir", help="folder with pretrain.yaml, finetune_dm.yaml, finetune_cm.yaml and gpu/")
    p.add_argument("--pretrain-steps", type=int, help="stage-1 steps (default: the config's total_steps)")
    p.add_argument("--finetune-steps", type=int, help="stage-2 steps (default: the config's total_steps)")
    p.add_argument("--fid-samples", type=int, help="class-balanced samples for FID and accuracy (cpu 500)")
    p.add_argument("--fid-ref", type=int, help="val digits in the FID reference (at most 500; default all)")
    p.add_argument("--threads", type=int, help="torch threads of each step (default: all cores, at most 8 on cpu)")
    p.add_argument("--batch-size", type=int, help="override the configs' global batch size")
    p.add_argument("--num-workers", type=int, help="override the configs' data-loader workers")
    p.add_argument("--accelerator", help="override the configs' accelerator (e.g. cpu to try the gpu configs)")
    return p


def _resolve(opts: argparse.Namespace) -> None:
    defaults = DEFAULTS[opts.device]
    opts.out = opts.out or ("runs/demo" if opts.device == "cpu" else "runs/demo_gpu")
    opts.fid_samples = opts.fid_samples or defaults["fid_samples"]
    opts.fid_ref = min(opts.fid_ref or defaults["fid_ref"], 500)
    if opts.fid_samples < 2 or opts.fid_ref < 2:
        raise SystemExit("epg demo: --fid-samples and --fid-ref must be at least 2 (a covariance needs 2 images)")
    cores = os.cpu_count() or 1
    opts.threads = opts.threads or (min(cores, 8) if opts.device == "cpu" else min(cores, 16))


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns 0 on success."""
    opts = build_parser().parse_args(argv)
    _resolve(opts)
    start = time.perf_counter()
    out = Path(opts.out)
    config_dir = Path(opts.config_dir) if opts.config_dir else default_config_dir()
    if opts.device == "gpu":
        config_dir = config_dir / "gpu"
    pre_cfg, ft_cfg = config_dir / "pretrain.yaml", config_dir / f"{OBJECTIVES[opts.objective]}.yaml"
    for path in (pre_cfg, ft_cfg):
        if not path.is_file():
            raise SystemExit(f"epg demo: no config {path}; run from the repository root or pass --config-dir")
    pre, ft = _load_yaml(pre_cfg), _load_yaml(ft_cfg)
    pre_steps = opts.pretrain_steps or run_length(pre)
    ft_steps = opts.finetune_steps or run_length(ft)
    data_dir, pre_dir = out / "data", out / "pretrain"
    ft_dir = out / OBJECTIVES[opts.objective]
    timings: dict[str, float] = {}
    summary: dict = {
        "objective": opts.objective,
        "device": opts.device,
        "threads": opts.threads,
        "configs": {"pretrain": str(pre_cfg), "finetune": str(ft_cfg)},
        "pretrain_steps": pre_steps,
        "finetune_steps": ft_steps,
        "host": platform.node(),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    _log(f"objective {opts.objective}, device {opts.device}, {opts.threads} threads, output {out}", start)

    def step(name: str, func) -> object:
        t0 = time.perf_counter()
        _log(f"{name} ...", start)
        result = func()
        timings[name] = round(time.perf_counter() - t0, 1)
        _log(f"{name}: done in {timings[name]}s" + (f" - {result}" if isinstance(result, str) else ""), start)
        return result

    if opts.fresh:
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

    try:
        step("prepare shards", prepare)
        step("Inception weights", inception)
        step("stage 1: pre-training", lambda: run_stage("stage 1", pre_cfg, pre_dir, data_dir, pre_steps, [], opts))
        knn = step(
            "stage 1: k-NN check", lambda: stage1_knn(pre_dir / "checkpoints" / "last.ckpt", data_dir, pre, opts)
        )
        summary["stage1_knn"] = knn
        _log(
            f"stage-1 {knn['k']}-NN accuracy (val digits against the train digits): {knn['stage1']:.3f}, "
            f"random-init encoder {knn['random_init']:.3f}: a gain of {knn['gain']:+.3f}",
            start,
        )
        init = ["--model.init_args.init_from", str(pre_dir / "checkpoints" / "last.ckpt")]
        step(
            f"stage 2: {opts.objective} fine-tuning",
            lambda: run_stage("stage 2", ft_cfg, ft_dir, data_dir, ft_steps, init, opts),
        )
        ckpt = ft_dir / "checkpoints" / "last.ckpt"
        summary["settings"] = {"pretrain": pre["model"]["init_args"], "finetune": ft["model"]["init_args"]}
        summary.update(step("evaluation", lambda: evaluate(ckpt, out, data_dir, opts, ft, start)))
        if any((ft_dir / "phema").glob("phema-*.pt")):  # stage 2 kept post-hoc EMA profiles (method.md §13)
            summary["phema"] = step(
                "post-hoc EMA", lambda: evaluate_phema(ft_dir, ckpt, out, data_dir, opts, ft, start)
            )
    except DemoError as err:
        print(f"epg demo: {err}", file=sys.stderr)
        return 1
    summary["timings_s"] = timings
    summary["total_s"] = round(time.perf_counter() - start, 1)
    summary["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    summary["checkpoints"] = {"pretrain": str(pre_dir / "checkpoints"), "finetune": str(ckpt)}
    from epg.io import write_text

    summary_path = out / "summary.json"
    text = json.dumps(summary, indent=2, default=str)
    write_text(summary_path, text)
    write_text(out / f"summary_{opts.objective}.json", text)  # kept when the other objective runs next
    print(
        f"\nepg demo ({opts.objective}) finished in {summary['total_s']:.0f}s: class accuracy "
        f"{summary['class_accuracy']:.1%}, FID {summary['fid']:.2f} ({summary['fid_samples']} samples vs "
        f"{summary['fid_reference']} val digits)\n"
        f"  stage-1 encoder: {knn['k']}-NN accuracy {knn['stage1']:.3f} vs {knn['random_init']:.3f} at random init "
        f"({knn['gain']:+.3f})\n"
        f"  samples (10x10, row c = class c): {summary['grid']}\n"
        f"  checkpoints: {pre_dir / 'checkpoints'} (stage 1), {ft_dir / 'checkpoints'} (stage 2)\n"
        f"  summary: {summary_path}\n"
        f"  TensorBoard logs: tensorboard --logdir {out}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

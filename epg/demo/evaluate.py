"""The demo's checks: the stage-1 k-NN accuracy, and the stage-2 grid, FID and class accuracy (method.md §8)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from epg.demo.settings import FID_SEED, GRID_SEED, VAL_DIGITS, DemoSettings, log
from epg.demo.stages import checkpoint_state


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


def stage1_knn(ckpt: Path, data_dir: Path, cfg: dict, demo: DemoSettings) -> dict:
    """k-NN accuracy (val digits against a bank of train digits) of the stage-1 encoder and a random-init one.

    The random-init encoder is the config's preset built after seeding with its ``seed_everything`` (the weights
    stage 1 starts from); both use the k-NN settings of the stage-1 run (``val/knn_acc``, :mod:`epg.eval.knn`).
    The result is kept in ``knn.json`` beside the checkpoints folder for a rerun on the same checkpoint step.
    """
    import torch

    from epg.checkpoint import load_stage1_representation
    from epg.eval.knn import eval_loader, knn_accuracies
    from epg.io import write_json
    from epg.nn.network import build_representation

    step, hp = checkpoint_state(ckpt)
    cache = ckpt.parent.parent / "knn.json"
    if cache.is_file() and json.loads(cache.read_text()).get("step") == step:
        return json.loads(cache.read_text())
    torch.set_num_threads(demo.threads)
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
    acc = knn_accuracies(encoders, bank, val, k=k, temperature=hp.get("knn_temperature", 0.07), device=demo.eval_device)
    result = {**acc, "gain": acc["stage1"] - acc["random_init"], "k": k, "step": step}
    write_json(cache, result)
    return result


def evaluate(ckpt: Path, data_dir: Path, demo: DemoSettings, cfg: dict, start: float) -> dict:
    """Grid PNG, FID against the val split and class accuracy of the EMA weights of a stage-2 checkpoint."""
    import torch

    from epg.checkpoint import default_sampler, load_denoiser
    from epg.eval.digits import class_accuracy, load_or_train
    from epg.eval.inception import InceptionFeatures, pool_features
    from epg.eval.metrics import fid_to_reference
    from epg.eval.reference import cached_reference, compute_reference, load_reference, reference_cache
    from epg.eval.sweep import sample_images
    from epg.sampling.generate import image_labels
    from epg.sampling.options import SamplingOptions

    torch.set_num_threads(demo.threads)
    device = demo.eval_device
    out = demo.out
    init = cfg["model"]["init_args"]
    options = SamplingOptions.of(init.get("sampling"))  # the grid's sampling block of the config
    sampler = options.resolved_sampler(default_sampler(ckpt))
    model = load_denoiser(ckpt, ema=0)
    denoiser = model.denoiser.to(device)
    guidance = options.guidance
    results: dict = {"sampler": sampler, "sampler_steps": options.steps, "cfg_scale": options.cfg}
    results["weights"] = model.weights
    results["cfg_interval"] = None if guidance is None or guidance.interval is None else list(guidance.interval)

    grid = out / f"samples_{demo.objective}.png"
    t0 = time.perf_counter()
    save_class_grid(denoiser, grid, options.settings(sampler, seed=GRID_SEED), model.normalization)
    results["grid"] = str(grid)
    results["grid_seconds"] = round(time.perf_counter() - t0, 1)
    log(f"grid: {grid} (row c = class c) in {results['grid_seconds']}s", start)

    t0 = time.perf_counter()
    n, batch = demo.fid_samples, demo.eval_batch
    settings = options.settings(sampler, labels="balanced", seed=FID_SEED)
    images = sample_images(denoiser, list(range(n)), n, settings, model.normalization, batch).numpy()
    labels = image_labels(denoiser, range(n), n, settings)  # the labels the generate loop gave the images
    results["sample_seconds"] = round(time.perf_counter() - t0, 1)
    log(f"sampled {n} class-balanced images in {results['sample_seconds']}s", start)

    t0 = time.perf_counter()
    classifier = load_or_train(str(data_dir / "train"), out / "digit_classifier.pt")
    results["class_accuracy"] = class_accuracy(classifier, images, labels)
    real, real_labels = reference_images(data_dir / "val", demo.fid_ref, denoiser.image_size)
    results["classifier_val_accuracy"] = class_accuracy(classifier, real, real_labels)
    results["classifier_seconds"] = round(time.perf_counter() - t0, 1)
    log(
        f"class accuracy of the samples: {results['class_accuracy']:.1%} (the classifier scores "
        f"{results['classifier_val_accuracy']:.1%} on real val digits)",
        start,
    )

    t0 = time.perf_counter()
    inception = InceptionFeatures(device)
    cache = out / f"fid_reference_val{demo.fid_ref}_{denoiser.image_size}px.npz"
    if demo.fid_ref >= VAL_DIGITS:  # the whole val split: the statistics the in-loop FID of stage 2 cached
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
    log(
        f"FID of {n} samples against {reference.count} val digits: {results['fid']:.2f} "
        f"(Inception {results['inception_seconds']}s; few samples bias FID upwards: compare at equal N only)",
        start,
    )
    return results

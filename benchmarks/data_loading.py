"""Data-loading throughput: decode + augment images/s of EPGDataModule for stage 1 and stage 2 (method.md §7).

    .venv/bin/python benchmarks/data_loading.py --out benchmarks/results/data_loading.json

Builds 256-px PNG shards from the real photos bundled with scikit-image (via `epg prepare`), then times the
training loader with 0, 1, 2 worker processes and extrapolates the per-worker rate to 8 workers per GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import PIL
import torch
import torchvision

TARGET_STAGE2_IMG_S_PER_GPU = 600
EXTRAPOLATE_TO_WORKERS = 8


def photo_tree(root: Path) -> int:
    """Copy the PIL-readable photos of scikit-image's data folder into an ImageFolder tree; returns their number."""
    from PIL import Image

    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise SystemExit("scikit-image is needed for its photos: pip install scikit-image (in the dev extra)")
    count = 0
    for path in sorted((Path(spec.origin).parent / "data").iterdir()):
        if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".gif", ".tif"):
            continue
        try:
            with Image.open(path) as image:
                image.load()
                if min(image.size) < 64:
                    continue
        except OSError:
            continue
        (root / path.stem).mkdir(parents=True)
        shutil.copy(path, root / path.stem / path.name)
        count += 1
    return count


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (or platform)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def measure(shards: str, stage: str, workers: int, samples: int, batch: int, size: int) -> dict:
    """Images/s of one training loader configuration, after its first batch (worker start-up excluded)."""
    from epg.data import EPGDataModule

    dm = EPGDataModule(
        train_shards=shards,
        stage=stage,
        image_size=size,
        global_batch_size=batch,
        num_workers=workers,
        samples_per_epoch=samples + batch,
        shuffle_buffer=64,
        world_size=1,
    )
    iterator = iter(dm.train_dataloader())
    next(iterator)
    start, cpu_start = time.perf_counter(), time.process_time()
    images = sum(len(b[-1]) for b in iterator)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    result = {
        "stage": stage,
        "num_workers": workers,
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 1),
    }
    if workers == 0:  # all work in this single-threaded process: CPU time is robust to other load on the machine
        result["images_per_cpu_s"] = round(images / cpu_seconds, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/data_loading.json"))
    parser.add_argument("--samples", type=int, default=384, help="images timed per configuration")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as in DataLoader workers; num_workers=0 then measures one core too

    from epg.data.prepare import prepare

    load_at_start = round(os.getloadavg()[0], 2)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        photos = photo_tree(Path(tmp) / "photos")
        prepare(
            Path(tmp) / "photos",
            Path(tmp) / "shards",
            resolution=args.image_size,
            shard_size=max(1, photos // 3),
            workers=2,
        )
        shards = str(Path(tmp) / "shards")
        for stage in ("pretrain", "finetune"):
            for workers in (int(w) for w in args.workers.split(",")):
                result = measure(shards, stage, workers, args.samples, args.batch_size, args.image_size)
                print(json.dumps(result), flush=True)
                results.append(result)

    def per_core(stage: str) -> float:
        """One core's rate: CPU-time rate of the in-process run, else the best wall-clock rate of one worker."""
        rows = [r for r in results if r["stage"] == stage]
        cpu = [r["images_per_cpu_s"] for r in rows if "images_per_cpu_s" in r]
        return cpu[0] if cpu else max(r["images_per_s"] for r in rows if r["num_workers"] <= 1)

    extrapolation = {}
    for stage in ("pretrain", "finetune"):
        extrapolation[stage] = {
            "per_core_images_per_s": per_core(stage),
            "workers": EXTRAPOLATE_TO_WORKERS,
            "images_per_s": round(per_core(stage) * EXTRAPOLATE_TO_WORKERS, 1),
        }
    extrapolation["finetune"]["target_images_per_s_per_gpu"] = TARGET_STAGE2_IMG_S_PER_GPU
    extrapolation["finetune"]["meets_target"] = extrapolation["finetune"]["images_per_s"] >= TARGET_STAGE2_IMG_S_PER_GPU
    report = {
        "what": "decode + augment throughput of EPGDataModule.train_dataloader (PNG shards, PIL decode)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "load_average_1min_at_start": load_at_start,
            "load_average_1min_at_end": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "pillow": PIL.__version__,
            "platform": platform.platform(),
        },
        "setup": {
            "photos": photos,
            "source": "skimage/data photos -> epg prepare (ADM crop, PNG)",
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "images_per_config": args.samples,
        },
        "results": results,
        "extrapolation": extrapolation,
        "note": "extrapolation = one core's rate (CPU time of the single-threaded in-process run) x 8 workers, "
        "assuming 8 free cores per GPU; wall-clock rates depend on the machine's other load (see load averages); "
        "stage 1 decodes once and makes 3 outputs per image",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(extrapolation, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

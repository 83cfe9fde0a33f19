"""Cost of resuming EPGDataModule's training stream mid-epoch: each worker's fast-forward reads, without decoding,
the samples of its stream before its first batch (epg/data/stream.py).

    .venv/bin/python benchmarks/stream_resume.py --out benchmarks/results/stream_resume.json

On one stream (num_workers=0), times the first batch of a loader started at batch 0 and at the last batch of an
epoch (the longest fast-forward), on the demo shards (32 px) and on 256-px PNG shards as `epg prepare` writes them
(PNG level 0, random pixels: ~197 KB a sample); the difference is the fast-forward. Files are in the page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from epg.data.adm_crop import encode_image
from epg.data.demo import prepare_demo
from epg.data.shards import shard_name, write_metadata, write_shard


def photo_shards(out: Path, samples: int, per_shard: int, size: int = 256) -> Path:
    """Shards of `samples` random-pixel PNGs (level 0) of `size` px, with their dataset.json."""
    from PIL import Image

    out.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def items(first: int, count: int):
        for i in range(first, first + count):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            yield f"img{i:06d}", "png", encode_image(Image.fromarray(pixels), "png"), i % 10

    names, records = [], {}
    for index, first in enumerate(range(0, samples, per_shard)):
        names.append(shard_name("train", index))
        records[names[-1]] = write_shard(out / names[-1], items(first, min(per_shard, samples - first)))
    classes = [str(c) for c in range(10)]
    counts = [samples // 10 + (c < samples % 10) for c in range(10)]
    write_metadata(out, "train", classes, {}, names, counts, size, "png", records)
    return out


def first_batch_seconds(shards: str, size: int, batch: int, samples: int, start: int) -> float:
    """Seconds from iter() to the first batch of a loader whose iteration starts `start` batches into the run."""
    from epg.data import EPGDataModule

    dm = EPGDataModule(
        train_shards=shards,
        stage="finetune",
        image_size=size,
        global_batch_size=batch,
        num_workers=0,
        samples_per_epoch=samples,
        num_classes=10,
        world_size=1,
    )
    loader = dm.train_dataloader()
    loader.start = start
    begin = time.perf_counter()
    next(iter(loader))
    return time.perf_counter() - begin


def measure(name: str, shards: Path, size: int, batch: int, repeats: int) -> dict:
    """Fast-forward over one epoch's samples but one batch, against a start at batch 0 (best of `repeats`)."""
    info = json.loads((shards / "dataset.json").read_text())
    samples = info["num_samples"]
    batches = samples // batch
    bytes_per_sample = sum(r["bytes"] for r in info["shard_records"].values()) / samples
    t0 = min(first_batch_seconds(str(shards), size, batch, samples, 0) for _ in range(repeats))
    t_end = min(first_batch_seconds(str(shards), size, batch, samples, batches - 1) for _ in range(repeats))
    skipped = (batches - 1) * batch
    forward = max(t_end - t0, 1e-9)
    return {
        "shards": name,
        "image_size": size,
        "samples_per_epoch": samples,
        "batch_size": batch,
        "bytes_per_sample": round(bytes_per_sample),
        "first_batch_at_start_s": round(t0, 3),
        "first_batch_at_last_batch_s": round(t_end, 3),
        "fast_forward_samples": skipped,
        "fast_forward_s": round(forward, 3),
        "fast_forward_samples_per_s": round(skipped / forward),
        "fast_forward_mb_per_s": round(skipped * bytes_per_sample / forward / 1e6, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/stream_resume.json"))
    parser.add_argument("--photos", type=int, default=2000, help="256-px samples (~197 KB each)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        demo = Path(prepare_demo(Path(tmp) / "demo")["root"]) / "train"
        results.append(measure("demo digits (epg prepare demo)", demo, 32, 64, args.repeats))
        print(json.dumps(results[-1]), flush=True)
        photos = photo_shards(Path(tmp) / "photos", args.photos, per_shard=500)
        results.append(measure("256-px PNG level 0", photos, 256, 32, args.repeats))
        print(json.dumps(results[-1]), flush=True)
    report = {
        "what": "resume cost of EPGDataModule's training stream: read-without-decode fast-forward of one stream",
        "note": "a resumed worker fast-forwards at most one epoch's share of its rank's samples "
        "(batches_per_epoch / num_workers x batch size); shards in the page cache, so the rate is the reader's "
        "(tar parsing and the shuffle buffer); on a cold disk the read is bounded by its bandwidth instead",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpu_count": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

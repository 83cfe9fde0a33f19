"""Shard names, atomic shard/JSON writing, and shard-spec expansion shared by `epg prepare` and the DataModule."""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import braceexpand

DATASET_JSON = "dataset.json"
CLASSES_JSON = "classes.json"
_REMOTE_PREFIXES = ("http://", "https://", "pipe:", "s3://", "gs://", "ais://", "hf://")


def shard_name(split: str, index: int) -> str:
    """File name of shard `index` of `split`, e.g. train-000003.tar."""
    return f"{split}-{index:06d}.tar"


def shard_pattern(split: str, num_shards: int) -> str:
    """Brace pattern naming all `num_shards` shards of `split`, e.g. train-{000000..000004}.tar."""
    if num_shards == 1:
        return shard_name(split, 0)
    return f"{split}-{{{0:06d}..{num_shards - 1:06d}}}.tar"


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (temporary file + rename), so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def write_shard(path: str | Path, samples: Iterable[tuple[str, str, bytes, int]]) -> int:
    """Write (key, ext, image bytes, label) samples to a tar at `path` atomically; returns the sample count.

    The tar is written under a temporary name and renamed when complete, so a final-named shard is never truncated.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    count = 0
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for key, ext, data, label in samples:
                _add_member(tar, f"{key}.{ext}", data)
                _add_member(tar, f"{key}.cls", str(int(label)).encode())
                count += 1
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return count


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def is_remote(url: str) -> bool:
    """Whether `url` is something WebDataset streams (http, pipe:, s3 ...) rather than a local path."""
    return url.startswith(_REMOTE_PREFIXES)


def expand_shards(spec: str) -> list[str]:
    """Shard URLs of `spec`: a directory (its *.tar), a local path or brace pattern, or a remote URL/pattern.

    Local shards must exist; the error names the first missing one.
    """
    if not is_remote(spec) and os.path.isdir(spec):
        urls = sorted(glob.glob(os.path.join(spec, "*.tar")))
        if not urls:
            raise FileNotFoundError(f"no *.tar shards in {spec}; create them with `epg prepare`")
        return urls
    urls = [url for part in spec.split("::") for url in braceexpand.braceexpand(part)]
    if not urls:
        raise ValueError(f"shard spec {spec!r} expands to no shards")
    for url in urls:
        if not is_remote(url) and not os.path.isfile(url):
            raise FileNotFoundError(f"shard {url} (from {spec!r}) does not exist; create shards with `epg prepare`")
    return urls


def read_dataset_info(urls: list[str]) -> dict | None:
    """The dataset.json next to the first local shard of `urls`, or None when there is none (or it is remote)."""
    if not urls or is_remote(urls[0]):
        return None
    path = Path(urls[0]).parent / DATASET_JSON
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def read_class_counts(spec: str) -> list[int] | None:
    """Samples per class in label order from the dataset.json of shards ``spec`` (a shard folder or pattern, or the
    dataset.json itself); None when there is no such file (e.g. remote shards)."""
    if spec.endswith(DATASET_JSON) and os.path.isfile(spec):
        info = json.loads(Path(spec).read_text())
    else:
        info = read_dataset_info(expand_shards(spec))
    if info is None or "class_counts" not in info:
        return None
    return [int(n) for n in info["class_counts"].values()]  # written in label order (write_metadata)


def count_samples(urls: list[str]) -> int:
    """Samples in local tar shards, counted from their .cls members (no image decoding)."""
    total = 0
    for url in urls:
        with tarfile.open(url) as tar:
            total += sum(1 for member in tar if member.name.endswith(".cls"))
    return total


def write_metadata(
    out_dir: str | Path,
    split: str,
    classes: list[str],
    names: dict[str, str],
    shards: list[str],
    class_counts: list[int],
    resolution: int,
    fmt: str,
    **extra: Any,
) -> dict:
    """Write classes.json and dataset.json for the shards of `split` in `out_dir`; returns the dataset info."""
    out_dir = Path(out_dir)
    class_info: dict[str, Any] = {"num_classes": len(classes), "classes": {c: i for i, c in enumerate(classes)}}
    if names:
        class_info["names"] = {c: names[c] for c in classes if c in names}
    write_json(out_dir / CLASSES_JSON, class_info)
    info = {
        "split": split,
        "num_samples": int(sum(class_counts)),
        "num_classes": len(classes),
        "resolution": resolution,
        "format": fmt,
        "num_shards": len(shards),
        "pattern": shard_pattern(split, len(shards)),
        "shards": shards,
        "class_counts": {c: int(n) for c, n in zip(classes, class_counts, strict=True)},
        **extra,
    }
    write_json(out_dir / DATASET_JSON, info)
    return info

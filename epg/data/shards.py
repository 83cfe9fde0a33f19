"""Shard names, atomic shard writing, per-shard records, and shard-spec expansion (`epg prepare`, DataModule).

A shard's record (in dataset.json under ``shard_records``, by file name) is its sample count, byte size and sha256.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import multiprocessing
import os
import shlex
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import braceexpand

from epg.io import atomic_path, write_json

DATASET_JSON = "dataset.json"
CLASSES_JSON = "classes.json"
RECORDS = "shard_records"
MEMBER_MTIME = 0  # fixed member times: a shard's bytes depend only on its samples, so a rewrite has the same sha256
_REMOTE_PREFIXES = ("http://", "https://", "pipe:", "s3://", "gs://", "ais://", "hf://")


def shard_name(split: str, index: int) -> str:
    """File name of shard `index` of `split`, e.g. train-000003.tar."""
    return f"{split}-{index:06d}.tar"


def shard_pattern(split: str, num_shards: int) -> str:
    """Brace pattern naming all `num_shards` shards of `split`, e.g. train-{000000..000004}.tar."""
    if num_shards == 1:
        return shard_name(split, 0)
    return f"{split}-{{{0:06d}..{num_shards - 1:06d}}}.tar"


def write_shard(path: str | Path, samples: Iterable[tuple[str, str, bytes, int]]) -> dict[str, Any]:
    """Write (key, ext, image bytes, label) samples to a tar at `path` atomically; returns the shard's record.

    The tar is written under a temporary name and renamed when complete (:func:`epg.io.atomic_path`), so a
    final-named shard is never truncated.
    """
    count = 0
    with atomic_path(path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for key, ext, data, label in samples:
                _add_member(tar, f"{key}.{ext}", data)
                _add_member(tar, f"{key}.cls", str(int(label)).encode())
                count += 1
        record = shard_record(tmp, count)
    return record


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = MEMBER_MTIME
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def shard_record(path: str | Path, samples: int) -> dict[str, Any]:
    """The record of the shard file `path` holding `samples` samples: its sample count, byte size and sha256."""
    return {"samples": int(samples), "bytes": os.path.getsize(path), "sha256": file_sha256(path)}


def record_problem(path: str | Path, record: dict[str, Any], content: bool = True) -> str | None:
    """What is wrong with the shard file `path` against its record, or None: a stat, plus its sha256 with `content`."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "missing"
    if size < record["bytes"]:
        return f"truncated to {size:,} of {record['bytes']:,} bytes"
    if size > record["bytes"]:
        return f"{size:,} bytes where {record['bytes']:,} are recorded"
    if content and file_sha256(path) != record["sha256"]:
        return "contents differ from the record (sha256)"
    return None


def map_shards(fn: Callable[[Any], Any], items: list, workers: int) -> Iterator[Any]:
    """``fn`` of each item (unordered), in up to `workers` processes; for per-shard work such as hashing."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    pool = multiprocessing.get_context().Pool(min(workers, len(items)))
    try:
        yield from pool.imap_unordered(fn, items)
    finally:
        pool.terminate()


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


def local_records(urls: list[str]) -> tuple[dict[str, dict], list[Path]]:
    """Records of the local shards of `urls` from the dataset.json beside them, by URL; and the folders whose
    dataset.json holds no records (shards of an earlier version). Remote shards and folders without one are skipped."""
    records: dict[str, dict] = {}
    unrecorded: list[Path] = []
    by_folder: dict[Path, list[str]] = {}
    for url in urls:
        if not is_remote(url):
            by_folder.setdefault(Path(url).parent, []).append(url)
    for folder, members in by_folder.items():
        path = folder / DATASET_JSON
        if not path.is_file():
            continue
        recorded = json.loads(path.read_text()).get(RECORDS)
        if recorded is None:
            unrecorded.append(folder)
            continue
        records.update((url, recorded[name]) for url in members if (name := Path(url).name) in recorded)
    return records, unrecorded


def repair_command(folder: str | Path, info: dict | None = None) -> str:
    """The `epg prepare` command that rewrites the damaged shards of `folder` (from its dataset.json)."""
    folder = Path(folder)
    if info is None:
        path = folder / DATASET_JSON
        info = json.loads(path.read_text()) if path.is_file() else {}
    template = info.get("prepare_command")
    if not template:
        return f"the `epg prepare` command that made {folder}"
    return template.replace("{out}", shlex.quote(str(folder))).replace("{root}", shlex.quote(str(folder.parent)))


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
    records: dict[str, dict],
    **extra: Any,
) -> dict:
    """Write classes.json and dataset.json for the shards of `split` in `out_dir`; returns the dataset info.

    `records` holds each shard's record by name; ``prepare_command`` in `extra` is the command that rewrites damaged
    shards, with ``{out}`` (this folder) or ``{root}`` (its parent) for the paths (see :func:`repair_command`).
    """
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
        RECORDS: {name: records[name] for name in shards},
        **extra,
    }
    write_json(out_dir / DATASET_JSON, info)
    return info

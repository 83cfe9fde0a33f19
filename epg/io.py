"""The one place for file output, device choice and seed hashing, used by every writer in the package.

- Atomic writes: :func:`atomic_path` (the primitive: write a temporary sibling, then ``os.replace``), with
  :func:`write_bytes`, :func:`write_text`, :func:`write_json` and :func:`save_torch` on top, and
  :func:`atomic_folder` for a folder that appears complete or not at all. A reader never sees half a file, and a
  killed writer leaves at most a hidden ``.NAME.tmp-PID`` behind, never a truncated ``NAME``.
- :func:`pick_device`: "auto"/None → CUDA when available, else the CPU; an explicit CUDA request without CUDA fails
  with a message instead of a late device error.
- Seeds: :func:`seed_words` (numpy's SeedSequence hash of integer keys) and :func:`seed_from` (one 63-bit seed from
  it), so draws keyed by (seed, step, rank, …) or (seed, image index) are independent and recreated on resume.

Only the standard library, numpy and torch are imported, so every floor of the package may use this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch


# ---- atomic files and folders -------------------------------------------------------------------------------------
def temporary_sibling(path: str | os.PathLike) -> Path:
    """The hidden temporary name next to ``path`` that an atomic write fills first (``.NAME.tmp-PID``)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened, e.g. on Windows)."""
    try:
        fd = os.open(os.fspath(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success rename it onto ``path``, on error delete it.

    ``fsync`` flushes the file and the rename to disk (for checkpoints: a crash right after the write keeps it).
    The parent folder is created when missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if fsync:
        fsync_folder(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, fsync) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str, fsync: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path, fsync) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 2, fsync: bool = False, **kwargs) -> None:
    """Write ``data`` as JSON (a trailing newline) to ``path`` atomically; ``kwargs`` go to :func:`json.dumps`."""
    write_text(path, json.dumps(data, indent=indent, **kwargs) + "\n", fsync)


def save_torch(obj: Any, path: str | os.PathLike, fsync: bool = False) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    with atomic_path(path, fsync) as tmp:
        torch.save(obj, tmp)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces ``path`` (an existing folder is removed first).

    On error the temporary folder is deleted and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- devices ------------------------------------------------------------------------------------------------------
def pick_device(requested: str | torch.device | None = None) -> torch.device:
    """The device to run on: ``None``/"auto" → "cuda" when available, else "cpu"; otherwise ``requested``.

    Raises ValueError for a CUDA device when torch sees none (a clear message at the start, not a late error).
    """
    if requested is None or str(requested) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} requested, but torch sees no CUDA device; use 'cpu' or 'auto'")
    return device


# ---- seeds --------------------------------------------------------------------------------------------------------
def seed_words(*key: int, count: int = 1, dtype: type = np.uint32) -> np.ndarray:
    """``count`` independent seed words hashed from the integers ``key`` (numpy's SeedSequence; negative keys wrap
    modulo 2^64)."""
    entropy = [int(k) % (1 << 64) for k in key]
    return np.random.SeedSequence(entropy).generate_state(count, dtype)


def seed_from(*key: int) -> int:
    """A 63-bit seed from the integers ``key``: independent draws per key that a resumed run recreates."""
    return int(seed_words(*key, count=1, dtype=np.uint64)[0]) >> 1

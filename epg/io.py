"""The one place for file output, device choice and seed hashing, used by every writer in the package.

- Atomic writes: :func:`atomic_path` (the primitive: write a temporary sibling, then ``os.replace``), with
  :func:`write_bytes`, :func:`write_text`, :func:`write_json` and :func:`save_torch` on top, and
  :func:`atomic_folder` for a folder that appears complete or not at all. A reader never sees half a file, and a
  killed writer leaves at most a hidden ``.NAME.tmp-PID`` behind, never a truncated ``NAME``.
- Folder swaps: :func:`swap_in_folder` puts a complete folder in place of another with two renames through the
  hidden ``.NAME.old`` twin, and :func:`recover_interrupted_swap` renames that twin back after a crash between them
  (sharded checkpoints: :class:`epg.lightning.faults.AtomicModelParallelStrategy` writes, :mod:`epg.checkpoint`
  reads).
- :func:`pick_device`: "auto"/None → CUDA when available, else the CPU; an explicit CUDA request without CUDA fails
  with a message instead of a late device error.
- Seeds: :func:`seed_words` (numpy's SeedSequence hash of integer keys) and :func:`seed_from` (one 63-bit seed from
  it), so draws keyed by (seed, step, rank, …) or (seed, image index) are independent and recreated on resume.

Only the standard library, numpy and torch are imported, so every floor of the package may use this module.
"""

from __future__ import annotations

import contextlib
import glob
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


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary siblings of ``path`` (``.NAME.tmp-PID``) whose writer no longer runs on this host.

    A killed writer (SIGKILL, a lost node) never reaches its clean-up; with a process id in the name, the next
    write would not reuse its file either, so a multi-GB half checkpoint would stay forever. A sibling whose process
    is alive (or not ours to signal) is kept. Returns the files removed.
    """
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = tmp.name.rpartition("-")[2]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # no such process: the writer is gone
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
        except PermissionError:  # alive, another user's
            pass
    return removed


def save_torch(obj: Any, path: str | os.PathLike, fsync: bool = False) -> None:
    """``torch.save(obj)`` to ``path`` atomically, first removing what killed earlier writers of ``path`` left
    (:func:`remove_stale_temporaries`: checkpoints are large and rewritten under the same name)."""
    remove_stale_temporaries(path)
    with atomic_path(path, fsync) as tmp:
        torch.save(obj, tmp)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces ``path`` through :func:`swap_in_folder` (a crash in
    the swap leaves the old folder under ``.<name>.old``, which :func:`recover_interrupted_swap` renames back).

    On error the temporary folder is deleted and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        swap_in_folder(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- folder swaps -------------------------------------------------------------------------------------------------
def swap_names(path: str | os.PathLike) -> tuple[Path, Path]:
    """The hidden siblings ``(<parent>/.<name>.tmp, <parent>/.<name>.old)`` of a folder ``path``.

    Both start with a dot, so Lightning's own ``*.ckpt`` listings never take them for a checkpoint, and ``--ckpt_path
    last`` reads only ``last.ckpt`` (after :func:`recover_interrupted_swap`). The ``.tmp`` name has no process id:
    every rank of a sharded save writes into the same folder.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")


def remove(path: str | os.PathLike) -> None:
    """Delete a file, link or folder tree; what is already gone (another rank removed it) is no error."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            raise OSError(f"could not remove {path}")
    else:
        path.unlink(missing_ok=True)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file of ``folder`` (one level deep, as torch.distributed.checkpoint writes) and the folder."""
    for entry in Path(folder).iterdir():
        if entry.is_file():
            with open(entry, "rb") as f:
                os.fsync(f.fileno())
    fsync_folder(folder)


def swap_in_folder(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Put the complete folder ``tmp`` in place of ``path`` (a folder, file or link, or nothing) with two renames.

    ``path`` is first renamed to its hidden ``.<name>.old`` twin, then ``tmp`` to ``path``, then the old one is
    deleted. A folder cannot replace a non-empty folder in one atomic rename on POSIX, but at every instant either
    the old or the new complete folder exists under ``path`` or, between the two renames, under ``.<name>.old``,
    which :func:`recover_interrupted_swap` renames back after a crash. A ``.<name>.old`` left next to an existing
    ``path`` is stale (a crash after the second rename) and is deleted first.
    """
    tmp, path = Path(tmp), Path(path)
    old = swap_names(path)[1]
    for _ in range(3):
        if os.path.lexists(path):
            if os.path.lexists(old):
                remove(old)  # ``path`` is complete, so this is the leftover of an earlier swap
            os.rename(path, old)
        try:
            os.rename(tmp, path)
            break
        except OSError:
            # A reader's recover_interrupted_swap put the old folder back between our two renames: go again.
            if not (os.path.lexists(path) and tmp.is_dir()):
                raise
    else:
        raise OSError(f"could not move {tmp} to {path}: it keeps reappearing")
    fsync_folder(path.parent)  # make the renames durable before the old folder goes
    if os.path.lexists(old):
        remove(old)


def recover_interrupted_swap(path: str | os.PathLike, cleanup: bool = True) -> bool:
    """Repair what a crash inside :func:`swap_in_folder` (or a sharded checkpoint save through it) left.

    If ``path`` is missing but its ``.<name>.old`` twin exists, the crash hit between the two renames: the old
    complete folder is renamed back (returns True). With ``cleanup`` it also deletes a half-written ``.<name>.tmp``
    and a stale ``.<name>.old`` next to an existing ``path``; only do that when no save to ``path`` can be running
    (before training starts), never from a reader that may run beside a training job.
    Safe to call from several ranks at once.
    """
    path = Path(path)
    tmp, old = swap_names(path)
    recovered = False
    if not os.path.lexists(path) and os.path.lexists(old):
        try:
            os.rename(old, path)
            recovered = True
        except FileNotFoundError:
            pass  # another rank (or process) renamed it back first
        fsync_folder(path.parent)
    if cleanup:
        remove(tmp)
        if os.path.lexists(path):
            remove(old)
    return recovered


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

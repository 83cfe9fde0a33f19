"""Pipeline stages of the DataModule: data-health counters, rank splitting, per-sample decoding, collation."""

from __future__ import annotations

import multiprocessing
import signal
import warnings
import zlib
from collections.abc import Callable, Iterator

import torch

from epg.data.samples import decode_sample, shard_samples
from epg.data.transforms import PretrainViews


class DataHealth:
    """Counts, over all worker processes, corrupt samples skipped and samples lost to damaged shards, and warns.

    Its :meth:`skip` is a WebDataset handler (skip the failing sample, count it, warn); :meth:`damaged` receives the
    damage that :func:`epg.data.samples.shard_samples` finds and warns once per shard, over all workers and epochs
    (a shared table of shard-name hashes; two damaged shards whose hashes collide share one warning).
    """

    WARNED_SLOTS = 1 << 16

    def __init__(self) -> None:
        self._skipped = multiprocessing.Value("q", 0)
        self._lost = multiprocessing.Value("q", 0)
        self._warned = multiprocessing.Array("b", self.WARNED_SLOTS)

    def skip(self, exn: BaseException) -> bool:
        with self._skipped.get_lock():
            self._skipped.value += 1
            count = self._skipped.value
        warnings.warn(f"skipped a corrupt sample: {exn!r} ({count} skipped so far)", stacklevel=2)
        return True

    def damaged(self, url: str, problem: str, lost: int | None) -> None:
        with self._lost.get_lock():
            self._lost.value += lost or 0
        slot = zlib.crc32(url.encode()) % self.WARNED_SLOTS
        with self._warned.get_lock():
            first, self._warned[slot] = not self._warned[slot], 1
        if first:
            lost_text = f"{lost} samples lost" if lost is not None else "no record of its sample count"
            warnings.warn(
                f"damaged shard {url}: {problem} ({lost_text}); check with `epg prepare --verify` and repair it "
                "by rerunning the `epg prepare` command that made it",
                stacklevel=2,
            )

    @property
    def skipped(self) -> int:
        """Corrupt samples (or unreadable shards) skipped so far, over all workers."""
        return int(self._skipped.value)

    @property
    def lost(self) -> int:
        """Samples lost to damaged shards so far (recorded count minus samples read), over all workers."""
        return int(self._lost.value)


class ReadShards:
    """Pipeline stage: {"url": shard} -> its samples, damage against the recorded counts reported to `health`."""

    def __init__(self, expected: dict[str, int], health: DataHealth) -> None:
        self.expected, self.health = expected, health

    def __call__(self, source: Iterator[dict[str, str]]) -> Iterator[dict]:
        for shard in source:
            yield from shard_samples(shard["url"], self.expected.get(shard["url"]), self.health.damaged)


def split_by_rank(source: Iterator, rank: int, world_size: int) -> Iterator:
    """wds.split_by_node with the rank fixed at set-up (from the Trainer), so it also holds in spawned workers."""
    yield from source if world_size == 1 else (x for i, x in enumerate(source) if i % world_size == rank)


class PretrainSample:
    """Sample -> (x0, v1, v2, y) for stage 1 (method.md §3.1)."""

    def __init__(self, transform: PretrainViews) -> None:
        self.transform = transform

    def __call__(self, sample: dict) -> tuple:
        image, label = decode_sample(sample)
        return (*self.transform(image), label)


class LabelledSample:
    """Sample -> (x, y), y replaced by the null label with probability `label_drop` (method.md §4 step 1).

    The drop draws from torch's global RNG, like the transforms: the training stream seeds it per sample.
    """

    def __init__(self, transform: Callable, label_drop: float = 0.0, null_label: int = 0) -> None:
        self.transform, self.label_drop, self.null_label = transform, label_drop, null_label

    def __call__(self, sample: dict) -> tuple:
        image, label = decode_sample(sample)
        if self.label_drop > 0 and torch.rand(()) < self.label_drop:
            label = self.null_label
        return self.transform(image), label


def collate(samples: list[tuple]) -> tuple[torch.Tensor, ...]:
    """Stack tensors of a list of tuples; labels become int64."""
    return tuple(
        torch.stack(column) if isinstance(column[0], torch.Tensor) else torch.tensor(column, dtype=torch.int64)
        for column in zip(*samples, strict=True)
    )


def ignore_sigterm(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGTERM and SIGINT, so that a pre-emption or a Ctrl-C can
    finish its checkpoint.

    SLURM (and ``kill`` of the process group) signals every process, as a terminal's Ctrl-C does; PyTorch's workers
    die on a SIGTERM from anyone but their parent (and end on a SIGINT), and the main process then fails with
    "DataLoader worker ... exited unexpectedly" before :class:`SigtermCheckpoint` can save. Ignoring them is safe:
    workers still exit when the loader shuts them down or their parent dies.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

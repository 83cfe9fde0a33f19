"""WebDataset pipeline stages of the DataModule: seeded shard sampling and shuffling, decoding, skipping, collation."""

from __future__ import annotations

import io
import multiprocessing
import random
import signal
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from PIL import Image

from epg.data.transforms import PretrainViews

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


class SkipCounter:
    """WebDataset handler that skips a failing sample (or shard), counts it across worker processes and warns."""

    def __init__(self) -> None:
        self._count = multiprocessing.Value("q", 0)

    def __call__(self, exn: BaseException) -> bool:
        with self._count.get_lock():
            self._count.value += 1
            count = self._count.value
        warnings.warn(f"skipped a corrupt sample: {exn!r} ({count} skipped so far)", stacklevel=2)
        return True

    @property
    def count(self) -> int:
        """Samples or shards skipped so far, over all workers."""
        return int(self._count.value)


def _stream_rng(seed: int, rank: int, tag: str, calls: int) -> random.Random:
    """RNG of one data stream: explicit seed, offset by rank and worker; new draws every epoch.

    In a DataLoader worker, the worker seed comes from the loader's seeded generator (fresh per epoch and per worker);
    in the main process (num_workers=0), `calls` counts the epochs.
    """
    info = torch.utils.data.get_worker_info()
    base = f"worker{info.seed}" if info is not None else f"main{seed}-{rank}-{calls}"
    return random.Random(f"{tag}-{base}")


class ResampledShards(torch.utils.data.IterableDataset):
    """Endless stream of {"url": shard} drawn with replacement, seeded per rank, worker and epoch."""

    def __init__(self, urls: list[str], seed: int, rank: int) -> None:
        super().__init__()
        self.urls, self.seed, self.rank, self.calls = list(urls), seed, rank, 0

    def __iter__(self) -> Iterator[dict[str, str]]:
        rng = _stream_rng(self.seed, self.rank, "shards", self.calls)
        self.calls += 1
        while True:
            yield {"url": rng.choice(self.urls)}


class SeededShuffle:
    """Pipeline stage: shuffle buffer of `bufsize` samples with a seeded RNG (see `_stream_rng`)."""

    def __init__(self, bufsize: int, seed: int, rank: int) -> None:
        self.bufsize, self.seed, self.rank, self.calls = bufsize, seed, rank, 0

    def __call__(self, source: Iterator) -> Iterator:
        rng = _stream_rng(self.seed, self.rank, "samples", self.calls)
        self.calls += 1
        if self.bufsize <= 1:
            yield from source
            return
        buffer: list = []
        for sample in source:
            if len(buffer) < self.bufsize:
                buffer.append(sample)
                continue
            i = rng.randrange(self.bufsize)
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer


def split_by_rank(source: Iterator, rank: int, world_size: int) -> Iterator:
    """wds.split_by_node with the rank fixed at set-up (from the Trainer), so it also holds in spawned workers."""
    yield from source if world_size == 1 else (x for i, x in enumerate(source) if i % world_size == rank)


def decode_sample(sample: dict[str, Any]) -> tuple[Image.Image, int]:
    """(RGB image, label) of a WebDataset sample with a png/jpg and a cls entry; raises on corrupt data."""
    key = next((k for k in IMAGE_EXTENSIONS if k in sample), None)
    if key is None or "cls" not in sample:
        raise ValueError(f"sample {sample.get('__key__')} of {sample.get('__url__')} lacks an image or a cls entry")
    try:
        with Image.open(io.BytesIO(sample[key])) as image:
            image.load()
            rgb = image.convert("RGB")
        return rgb, int(sample["cls"])
    except Exception as exc:
        raise ValueError(f"sample {sample.get('__key__')} of {sample.get('__url__')}: {exc}") from exc


class PretrainSample:
    """Sample -> (x0, v1, v2, y) for stage 1 (METHOD.md §3.1)."""

    def __init__(self, transform: PretrainViews) -> None:
        self.transform = transform

    def __call__(self, sample: dict) -> tuple:
        image, label = decode_sample(sample)
        return (*self.transform(image), label)


class LabelledSample:
    """Sample -> (x, y), y replaced by the null label with probability `label_drop` (METHOD.md §4 step 1)."""

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
    """DataLoader ``worker_init_fn``: workers ignore SIGTERM, so that a pre-emption can finish its checkpoint.

    SLURM (and ``kill`` of the process group) signals every process; PyTorch's workers die on a SIGTERM from anyone
    but their parent, and the main process then fails with "DataLoader worker ... is killed by signal" before
    :class:`SigtermCheckpoint` can save. Ignoring it is safe: workers still exit when the loader shuts them down or
    their parent dies.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

"""The training stream of EPGDataModule: a pure function of (seed, epoch, rank, stream, position) (method.md §7).

Per rank, an epoch has ``batches_per_epoch`` batches of ``batch_size`` samples. With W DataLoader workers (W = 1
without), batch j of the epoch comes from stream s = j mod W, samples (j // W)·batch_size onwards. Stream
(epoch, rank, s) draws shards with replacement and shuffles their samples in a buffer, both seeded by
(seed, epoch, rank, s); the augmentation and label drop of each sample are seeded by its position in the stream.

So a resumed run draws exactly the batches that an uninterrupted run would have drawn: :class:`TrainLoader` starts
each iteration at the number of batches the run has consumed (the Trainer's batch counter, which the checkpoint
restores), and each worker fast-forwards its stream by reading, not decoding, the samples before its first batch.
The cost of that read is at most one epoch's share of the shards per worker (see README, "Resuming").
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from epg.data.pipeline import DataHealth, collate
from epg.data.samples import shard_samples
from epg.io import seed_from

_SHARDS, _SHUFFLE, _SAMPLE = 1, 2, 3  # seed tags of the three kinds of draws


def shuffled_samples(
    urls: list[str],
    expected: dict[str, int],
    seed: int,
    key: tuple[int, ...],
    bufsize: int,
    health: DataHealth,
) -> Iterator[dict[str, Any]]:
    """Endless raw samples of stream `key` (epoch, rank, stream): shards drawn with replacement, read in order,
    shuffled in a buffer of `bufsize`; damage against the `expected` sample counts goes to `health`."""
    shard_rng = random.Random(seed_from(seed, _SHARDS, *key))
    rng = random.Random(seed_from(seed, _SHUFFLE, *key))

    def source() -> Iterator[dict[str, Any]]:
        empty = 0
        while True:
            url = shard_rng.choice(urls)
            count = 0
            for sample in shard_samples(url, expected.get(url), health.damaged):
                count += 1
                yield sample
            empty = 0 if count else empty + 1
            if empty >= max(20, 2 * len(urls)):
                raise RuntimeError(
                    f"{empty} shards in a row held no readable sample (the last: {url}); "
                    "check the shards with `epg prepare --verify`"
                )

    if bufsize <= 1:
        yield from source()
        return
    buffer: list[dict[str, Any]] = []
    for sample in source():
        if len(buffer) < bufsize:
            buffer.append(sample)
            continue
        i = rng.randrange(bufsize)
        buffer[i], sample = sample, buffer[i]
        yield sample


class TrainStream(torch.utils.data.IterableDataset):
    """This rank's training batches, from `consumed` batches into the run to the end of that epoch (module doc).

    A corrupt sample is skipped and counted; its slot is filled by another sample of the same batch, drawn with the
    slot's own augmentation seed, so batch sizes and stream positions stay fixed.
    """

    def __init__(
        self,
        urls: list[str],
        expected: dict[str, int],
        make: Callable[[dict], tuple],
        batch_size: int,
        batches_per_epoch: int,
        seed: int,
        rank: int,
        bufsize: int,
        health: DataHealth,
    ) -> None:
        super().__init__()
        self.urls, self.expected, self.make, self.health = list(urls), expected, make, health
        self.batch_size, self.batches_per_epoch, self.seed, self.rank, self.bufsize = (
            batch_size,
            batches_per_epoch,
            seed,
            rank,
            bufsize,
        )
        self.consumed = 0  # batches of the run consumed before this iteration (set by TrainLoader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, start = divmod(self.consumed, self.batches_per_epoch)
        mine = range(start + worker, self.batches_per_epoch, workers)  # the DataLoader takes batch i from worker i%W
        if not mine:
            return
        key = (epoch, self.rank, mine[0] % workers)
        samples = shuffled_samples(self.urls, self.expected, self.seed, key, self.bufsize, self.health)
        position = mine[0] // workers * self.batch_size
        for _ in range(position):  # fast-forward to this stream's first batch: read, do not decode
            next(samples)
        for _ in mine:
            raw = [next(samples) for _ in range(self.batch_size)]
            yield self._batch(raw, key, position)
            position += self.batch_size

    def _batch(self, raw: list[dict], key: tuple[int, ...], position: int) -> tuple[torch.Tensor, ...]:
        out: list[tuple | None] = [None] * len(raw)
        errors = []
        for i, sample in enumerate(raw):
            try:
                out[i] = self._make(sample, key, position + i)
            except Exception as exc:  # any undecodable sample is skipped and counted, never fatal
                self.health.skip(exc)
                errors.append(exc)
        good = [i for i, o in enumerate(out) if o is not None]
        if not good:
            raise RuntimeError(
                f"no sample of a batch decodes (stream {key}, samples {position}-{position + len(raw) - 1}); "
                "check the shards with `epg prepare --verify`"
            ) from errors[-1]
        for k, i in enumerate(i for i, o in enumerate(out) if o is None):
            out[i] = self._make(raw[good[k % len(good)]], key, position + i)
        return collate(out)

    def _make(self, sample: dict, key: tuple[int, ...], position: int) -> tuple:
        """The sample's tensors, its random draws seeded by its position; the process's own RNG state is kept."""
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed_from(self.seed, _SAMPLE, *key, position))
            return self.make(sample)


class TrainLoader:
    """Iterable of batches: a DataLoader over a :class:`TrainStream` that starts each iteration where the run stands.

    ``consumed()`` gives the batches the run has consumed (from the Trainer); without a Trainer (None) an iteration
    starts at batch :attr:`start` of the run (0 at first), and the next one at the following epoch. Lightning saves
    :meth:`state_dict` in checkpoints; a resume whose data layout differs (workers, ranks, batch size, seed, shards)
    warns that the stream continues with other draws.
    """

    def __init__(
        self, stream: TrainStream, consumed: Callable[[], int | None], layout: dict[str, Any], **kwargs: Any
    ) -> None:
        self.stream, self.loader = stream, torch.utils.data.DataLoader(stream, batch_size=None, **kwargs)
        self._consumed, self.layout, self.start = consumed, dict(layout), 0

    def __len__(self) -> int:
        return self.stream.batches_per_epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        done = self._consumed()
        if done is None:
            done, self.start = self.start, (self.start // len(self) + 1) * len(self)
        self.stream.consumed = done  # copied into this iteration's new worker processes (workers are not persistent)
        return iter(self.loader)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.layout)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        changed = [f"{k} {state[k]} -> {v}" for k, v in self.layout.items() if k in state and state[k] != v]
        if changed:
            warnings.warn(
                f"the data layout differs from the checkpoint's ({', '.join(changed)}): the training stream "
                "continues at the same batch, but with other draws than the interrupted run would have made",
                stacklevel=2,
            )

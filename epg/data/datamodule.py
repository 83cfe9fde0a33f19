"""The WebDataset LightningDataModule of both stages (method.md §3.1, §4 labels, §7 loader)."""

from __future__ import annotations

import json
import os
import re
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import webdataset as wds

from epg.data.pipeline import (
    DataHealth,
    LabelledSample,
    PretrainSample,
    ReadShards,
    collate,
    ignore_sigterm,
    split_by_rank,
)
from epg.data.samples import open_url
from epg.data.shards import (
    RECORDS,
    count_samples,
    expand_shards,
    is_remote,
    local_records,
    read_dataset_info,
    record_problem,
    repair_command,
)
from epg.data.stream import TrainLoader, TrainStream
from epg.data.transforms import EvalTransform, FinetuneTransform, PretrainViews
from epg.method.normalization import NORMALIZATIONS

STAGES = ("pretrain", "finetune")
_NOTED: set[Path] = set()  # folders of unrecorded shards already noted in this process


class DamagedShardsError(ValueError):
    """Local shards whose size differs from their record; the message names them and the repair command."""


class EPGDataModule(L.LightningDataModule):
    """WebDataset shards -> batches for stage 1 `(x0, v1, v2, y)` or stage 2 `(x, y)`; validation `(x, y)`.

    Args:
        train_shards: training shards: a brace pattern such as ``data/train/train-{000000..000004}.tar``, a folder
            (all its ``*.tar``), a single path, or a URL (``pipe:``, ``http://`` ...).
        val_shards: validation shards, same forms; None disables validation.
        stage: "pretrain" (stage 1, method.md §3.1) or "finetune" (stage 2, §4).
        image_size: training resolution; images stored at another size are ADM-center-cropped to it.
        global_batch_size: batch over all devices; each device gets global_batch_size // world_size.
        val_batch_size: per-device validation batch (default: the per-device training batch).
        num_workers: DataLoader worker processes per device.
        normalization: "imagenet" or "simple" (method.md §1.1).
        label_drop: probability of replacing a label by the null label num_classes (finetune only, for CFG).
        num_classes: number of real classes; the null label is this value.
        samples_per_epoch: samples per epoch over all devices (default: ``num_samples`` of the shards' dataset.json).
        seed: base seed of shard sampling, shuffling and augmentation, offset per rank and worker.
        shuffle_buffer: samples in each worker's shuffle buffer.
        hflip: random horizontal flips of method.md §7 (turn off for data whose mirror image is another class).
        rank: this process's rank, for use without a Trainer (default: Trainer, then $RANK, then 0).
        world_size: number of processes, for use without a Trainer (default: Trainer, then $WORLD_SIZE, then 1).
        allow_damaged_shards: train on local shards whose size differs from their record (a warning, not an error).
        shard_records: dataset.json file(s) or URL(s), joined by ``::``, recording remote shards (by file name), so
            that a remote shard that ends early is reported; local shards use the dataset.json beside them.

    The training stream is exact across resumes (see :mod:`epg.data.stream`): a rerun from a checkpoint draws the
    batches an uninterrupted run would have drawn, for the same seed, devices, workers and batch size.
    Damaged shards are named: at setup (local shards whose size differs from dataset.json's record: an error), and
    while reading (a shard that yields fewer samples than its record, or whose tar stream breaks: a warning); the
    samples lost and the corrupt samples skipped are logged as ``data/lost_samples`` and ``data/skipped_samples``.
    """

    def __init__(
        self,
        train_shards: str | None = None,
        val_shards: str | None = None,
        stage: Literal["pretrain", "finetune"] = "finetune",
        image_size: int = 256,
        global_batch_size: int = 1024,
        val_batch_size: int | None = None,
        num_workers: int = 8,
        normalization: Literal["imagenet", "simple"] = "imagenet",
        label_drop: float = 0.1,
        num_classes: int = 1000,
        samples_per_epoch: int | None = None,
        seed: int = 1234,
        shuffle_buffer: int = 1000,
        hflip: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        allow_damaged_shards: bool = False,
        shard_records: str | None = None,
    ) -> None:
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if not 0.0 <= label_drop < 1.0:
            raise ValueError(f"label_drop must be in [0, 1), got {label_drop}")
        for name, value in (
            ("image_size", image_size),
            ("global_batch_size", global_batch_size),
            ("num_classes", num_classes),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.train_shards, self.val_shards, self.stage = train_shards, val_shards, stage
        self.image_size, self.global_batch_size, self.val_batch_size = image_size, global_batch_size, val_batch_size
        self.num_workers, self.normalization, self.label_drop = num_workers, normalization, label_drop
        self.num_classes, self.samples_per_epoch, self.seed = num_classes, samples_per_epoch, seed
        self.shuffle_buffer, self._rank, self._world_size = shuffle_buffer, rank, world_size
        self.hflip, self.allow_damaged_shards, self.shard_records = hflip, allow_damaged_shards, shard_records
        self._num_train_samples: int | None = None
        self._health: DataHealth | None = None

    # -- distributed layout -------------------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        """Global rank of this process: override, Trainer, $RANK, torch.distributed, else 0."""
        return self._dist()[0]

    @property
    def world_size(self) -> int:
        """Number of processes: override, Trainer, $WORLD_SIZE, torch.distributed, else 1."""
        return self._dist()[1]

    def _dist(self) -> tuple[int, int]:
        if self._world_size is not None or self._rank is not None:
            rank, world = self._rank or 0, self._world_size or 1
        elif self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        elif "WORLD_SIZE" in os.environ:
            rank, world = int(os.environ.get("RANK", 0)), int(os.environ["WORLD_SIZE"])
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world = 0, 1
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world size {world}")
        return rank, world

    @property
    def per_device_batch_size(self) -> int:
        """Training batch per device: global_batch_size // world_size (method.md §7: 1024 / 8 = 128)."""
        world = self.world_size
        if self.global_batch_size % world:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not divisible by the world size {world} "
                f"(devices x nodes); pick a multiple of {world}"
            )
        return self.global_batch_size // world

    @property
    def num_train_samples(self) -> int:
        """Samples per epoch over all devices: samples_per_epoch, else dataset.json next to the train shards."""
        if self.samples_per_epoch is not None:
            return self.samples_per_epoch
        if self._num_train_samples is None:
            urls = self._urls(self.train_shards, "train_shards")
            info = read_dataset_info(urls)
            if info is not None and len(info.get("shards", [])) == len(urls):
                self._num_train_samples = int(info["num_samples"])
            elif all(os.path.isfile(u) for u in urls):
                self._num_train_samples = count_samples(urls)
            else:
                raise ValueError(
                    f"cannot count the samples of remote shards {self.train_shards}; set samples_per_epoch"
                )
        return self._num_train_samples

    @property
    def batches_per_epoch(self) -> int:
        """Training batches per epoch, the same on every rank (the last partial global batch is dropped)."""
        return max(1, self.num_train_samples // self.global_batch_size)

    @property
    def num_skipped(self) -> int:
        """Corrupt samples skipped so far by this process's loaders (all their workers)."""
        return self._health.skipped if self._health is not None else 0

    # -- Lightning hooks ----------------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Check the shards and the batch split early, on every rank."""
        if stage in (None, "fit") and self.train_shards is not None:
            self._check_shards(self._urls(self.train_shards, "train_shards"), "train_shards")
            _ = self.per_device_batch_size, self.num_train_samples
        if stage in (None, "fit", "validate") and self.val_shards is not None:
            self._check_shards(self._urls(self.val_shards, "val_shards"), "val_shards")

    def train_dataloader(self) -> TrainLoader:
        """`batches_per_epoch` batches of `per_device_batch_size` per epoch on every rank, exact across resumes."""
        urls = self._urls(self.train_shards, "train_shards")
        if self.stage == "pretrain":
            make = PretrainSample(PretrainViews(self.image_size, self.normalization, self.hflip))
        else:
            transform = FinetuneTransform(self.image_size, self.normalization, self.hflip)
            make = LabelledSample(transform, self.label_drop, null_label=self.num_classes)
        layout = {
            "seed": self.seed,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.per_device_batch_size,
            "batches_per_epoch": self.batches_per_epoch,
            "shuffle_buffer": self.shuffle_buffer,
            "num_shards": len(urls),
        }
        stream = TrainStream(
            urls,
            self._expected(urls),
            make,
            self.per_device_batch_size,
            self.batches_per_epoch,
            self.seed,
            self.rank,
            self.shuffle_buffer,
            self._data_health(),
        )
        return TrainLoader(
            stream,
            self._consumed_batches,
            layout,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=ignore_sigterm,
        )

    def val_dataloader(self) -> wds.WebLoader | list:
        """Each rank reads its share of the val shards once, in order, without flips or label drop."""
        if self.val_shards is None:
            return []
        urls = self._urls(self.val_shards, "val_shards")
        rank, world = self._dist()
        if len(urls) < world:
            warnings.warn(f"{len(urls)} val shards for {world} ranks: some ranks get no validation data")
        health = self._data_health()
        dataset = wds.DataPipeline(
            wds.SimpleShardList(urls),
            partial(split_by_rank, rank=rank, world_size=world),
            wds.split_by_worker,
            ReadShards(self._expected(urls), health),
            wds.map(LabelledSample(EvalTransform(self.image_size, self.normalization)), handler=health.skip),
            wds.batched(self.val_batch_size or self.per_device_batch_size, collation_fn=collate, partial=True),
        )
        workers = min(self.num_workers, len(urls[rank::world]))
        return wds.WebLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=ignore_sigterm,
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Every `log_every_n_steps` training batches, log the samples lost and skipped so far, summed over ranks."""
        trainer = self.trainer
        if trainer is not None and trainer.training and self._health is not None:
            if (trainer.fit_loop.total_batch_idx + 1) % max(1, trainer.log_every_n_steps) == 0:
                self._log_health(trainer)
        return batch

    # -- helpers ------------------------------------------------------------------------------------------------

    def _data_health(self) -> DataHealth:
        if self._health is None:
            self._health = DataHealth()
        return self._health

    def _log_health(self, trainer: L.Trainer) -> None:
        counts = torch.tensor([self._health.lost, self._health.skipped], device=trainer.strategy.root_device)
        lost, skipped = trainer.strategy.reduce(counts, reduce_op="sum").tolist()  # a collective: every rank calls it
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"data/lost_samples": lost, "data/skipped_samples": skipped}, trainer.global_step)

    def _consumed_batches(self) -> int | None:
        """Training batches the run has consumed (restored with a checkpoint), or None without a Trainer."""
        return None if self.trainer is None else self.trainer.fit_loop.total_batch_idx + 1

    def _expected(self, urls: list[str]) -> dict[str, int]:
        """Recorded sample counts by URL: local shards from their dataset.json, remote ones from shard_records."""
        records, _ = local_records(urls)
        if self.shard_records:
            by_name: dict[str, dict] = {}
            for location in self.shard_records.split("::"):
                with open_url(location) as f:
                    by_name.update(json.loads(f.read()).get(RECORDS) or {})
            for url in filter(is_remote, urls):
                names = re.findall(r"[^/\s]+\.tar\b", url)
                if names and names[-1] in by_name:
                    records[url] = by_name[names[-1]]
        return {url: int(record["samples"]) for url, record in records.items()}

    @staticmethod
    def _urls(spec: str | None, name: str) -> list[str]:
        if spec is None:
            raise ValueError(
                f"{name} is not set; pass shards such as data/train/train-{{000000..000004}}.tar or a folder"
            )
        return expand_shards(spec)

    def _check_shards(self, urls: list[str], name: str) -> None:
        """Check local shards against their records, and their dataset.json with num_classes and image_size."""
        self._check_records(urls, name)
        info = read_dataset_info(urls)
        if info is None:
            return
        if int(info.get("num_classes", 0)) > self.num_classes:
            raise ValueError(
                f"the shards hold {info['num_classes']} classes but num_classes is {self.num_classes}; "
                f"set num_classes: {info['num_classes']}"
            )
        if info.get("resolution") not in (None, self.image_size):
            warnings.warn(
                f"shards of {info['resolution']} px with image_size {self.image_size}: every image is ADM-cropped "
                f"again while loading (slower); prepare shards with `epg prepare --resolution {self.image_size}`"
            )

    def _check_records(self, urls: list[str], name: str) -> None:
        """Stop on local shards whose size differs from their record (one stat per shard); note unrecorded ones."""
        records, unrecorded = local_records(urls)
        for folder in unrecorded:
            if folder not in _NOTED:
                _NOTED.add(folder)
                warnings.warn(
                    f"the shards in {folder} have no per-shard records (made by an earlier `epg prepare`), so damage "
                    f"shows only while reading; check them once with `epg prepare --verify {folder}`",
                    stacklevel=2,
                )
        damaged = [(url, p) for url, record in records.items() if (p := record_problem(url, record, content=False))]
        if not damaged:
            return
        folders = sorted({Path(url).parent for url, _ in damaged})
        listing = ", ".join(f"{Path(url).name} ({problem})" for url, problem in damaged[:8])
        more = f" and {len(damaged) - 8} more" if len(damaged) > 8 else ""
        message = (
            f"{len(damaged)} of the {name} in {', '.join(map(str, folders))} differ from their records: "
            f"{listing}{more}; "
            f"repair them with `{'` and `'.join(repair_command(f) for f in folders)}` (check with `epg prepare "
            "--verify`), or set data.allow_damaged_shards: true to train on what they still hold"
        )
        if not self.allow_damaged_shards:
            raise DamagedShardsError(message)
        warnings.warn(message, stacklevel=2)

"""The WebDataset LightningDataModule of both stages (METHOD.md §3.1, §4 labels, §7 loader)."""

from __future__ import annotations

import math
import os
import warnings
from functools import partial
from typing import Literal

import lightning as L
import torch
import webdataset as wds

from epg.data.pipeline import (
    LabelledSample,
    PretrainSample,
    ResampledShards,
    SeededShuffle,
    SkipCounter,
    collate,
    ignore_sigterm,
    split_by_rank,
)
from epg.data.shards import count_samples, expand_shards, read_dataset_info
from epg.data.transforms import EvalTransform, FinetuneTransform, PretrainViews
from epg.method.normalization import NORMALIZATIONS

STAGES = ("pretrain", "finetune")


class EPGDataModule(L.LightningDataModule):
    """WebDataset shards -> batches for stage 1 `(x0, v1, v2, y)` or stage 2 `(x, y)`; validation `(x, y)`.

    Args:
        train_shards: training shards: a brace pattern such as ``data/train/train-{000000..000004}.tar``, a folder
            (all its ``*.tar``), a single path, or a URL (``pipe:``, ``http://`` ...).
        val_shards: validation shards, same forms; None disables validation.
        stage: "pretrain" (stage 1, METHOD.md §3.1) or "finetune" (stage 2, §4).
        image_size: training resolution; images stored at another size are ADM-center-cropped to it.
        global_batch_size: batch over all devices; each device gets global_batch_size // world_size.
        val_batch_size: per-device validation batch (default: the per-device training batch).
        num_workers: DataLoader worker processes per device.
        normalization: "imagenet" or "simple" (METHOD.md §1.1).
        label_drop: probability of replacing a label by the null label num_classes (finetune only, for CFG).
        num_classes: number of real classes; the null label is this value.
        samples_per_epoch: samples per epoch over all devices (default: ``num_samples`` of the shards' dataset.json).
        seed: base seed of shard sampling, shuffling and augmentation, offset per rank and worker.
        shuffle_buffer: samples in each worker's shuffle buffer.
        hflip: random horizontal flips of METHOD.md §7 (turn off for data whose mirror image is another class).
        rank: this process's rank, for use without a Trainer (default: Trainer, then $RANK, then 0).
        world_size: number of processes, for use without a Trainer (default: Trainer, then $WORLD_SIZE, then 1).
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
        self.hflip = hflip
        self._num_train_samples: int | None = None
        self._skips: SkipCounter | None = None

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
        """Training batch per device: global_batch_size // world_size (METHOD.md §7: 1024 / 8 = 128)."""
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
        """Corrupt samples (or unreadable shards) skipped so far by this process's loaders."""
        return self._skips.count if self._skips is not None else 0

    # -- Lightning hooks ----------------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Check the shards and the batch split early, on every rank."""
        if stage in (None, "fit") and self.train_shards is not None:
            self._check_shards(self._urls(self.train_shards, "train_shards"))
            _ = self.per_device_batch_size, self.num_train_samples
        if stage in (None, "fit", "validate") and self.val_shards is not None:
            self._check_shards(self._urls(self.val_shards, "val_shards"))

    def train_dataloader(self) -> wds.WebLoader:
        """Endless resampled stream cut into `batches_per_epoch` batches of `per_device_batch_size` on every rank."""
        urls = self._urls(self.train_shards, "train_shards")
        rank, batches = self.rank, self.batches_per_epoch
        if self.stage == "pretrain":
            make = PretrainSample(PretrainViews(self.image_size, self.normalization, self.hflip))
        else:
            transform = FinetuneTransform(self.image_size, self.normalization, self.hflip)
            make = LabelledSample(transform, self.label_drop, null_label=self.num_classes)
        skips = self._skip_counter()
        dataset = wds.DataPipeline(
            ResampledShards(urls, self.seed, rank),
            wds.tarfile_to_samples(handler=skips),
            SeededShuffle(self.shuffle_buffer, self.seed, rank),
            wds.map(make, handler=skips),
            wds.batched(self.per_device_batch_size, collation_fn=collate, partial=False),
        ).with_epoch(math.ceil(batches / max(1, self.num_workers)))
        loader = wds.WebLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(self.seed + 100_003 * rank),
            worker_init_fn=ignore_sigterm,
        )
        return loader.with_epoch(batches).with_length(batches, silent=True)

    def val_dataloader(self) -> wds.WebLoader | list:
        """Each rank reads its share of the val shards once, in order, without flips or label drop."""
        if self.val_shards is None:
            return []
        urls = self._urls(self.val_shards, "val_shards")
        rank, world = self._dist()
        if len(urls) < world:
            warnings.warn(f"{len(urls)} val shards for {world} ranks: some ranks get no validation data")
        skips = self._skip_counter()
        dataset = (
            wds.WebDataset(
                urls,
                resampled=False,
                shardshuffle=False,
                nodesplitter=partial(split_by_rank, rank=rank, world_size=world),
                workersplitter=wds.split_by_worker,
                empty_check=False,
                handler=skips,
            )
            .map(LabelledSample(EvalTransform(self.image_size, self.normalization)), handler=skips)
            .batched(self.val_batch_size or self.per_device_batch_size, collation_fn=collate, partial=True)
        )
        workers = min(self.num_workers, len(urls[rank::world]))
        return wds.WebLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=ignore_sigterm,
        )

    # -- helpers ------------------------------------------------------------------------------------------------

    def _skip_counter(self) -> SkipCounter:
        if self._skips is None:
            self._skips = SkipCounter()
        return self._skips

    @staticmethod
    def _urls(spec: str | None, name: str) -> list[str]:
        if spec is None:
            raise ValueError(
                f"{name} is not set; pass shards such as data/train/train-{{000000..000004}}.tar or a folder"
            )
        return expand_shards(spec)

    def _check_shards(self, urls: list[str]) -> None:
        """Compare the shards' dataset.json (when there is one) with num_classes and image_size."""
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

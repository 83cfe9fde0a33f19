"""k-NN accuracy of stage-1 CLS features, the encoder check of `validate` (PretrainModule) and of the demo.

The protocol of the SSL literature (DINO, after InstDisc): the memory bank holds features of *training* images, the
queries are the validation images, and the k nearest bank entries by cosine similarity vote with weight exp(sim/T)
(k = 20, T = 0.07). Where the train split is large the bank is a fixed, seeded subset of whole training shards
(:func:`bank_shards`); with the whole train split it is DINO's 20-NN number. Images are the centre crops of the
evaluation transform, fed clean at σ'_0 = s_H·σ_min (:func:`cls_features`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from epg.data.datamodule import EPGDataModule
from epg.data.shards import count_samples, expand_shards, is_remote, read_dataset_info
from epg.method.noise import SIGMA_MIN, c_in, c_noise, resolution_shift


@torch.no_grad()
def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Top-1 accuracy of a k-NN classifier on cosine similarity, neighbours voting with weight exp(sim/T).

    ``train_feats`` (N, C) with int labels (N,) is the memory bank; ``test_feats`` (M, C) are classified. k is
    clipped to N. Returns a fraction in [0, 1].
    """
    if train_feats.shape[0] == 0 or test_feats.shape[0] == 0:
        raise ValueError("k-NN needs at least one bank and one query feature; the bank or the val split is empty")
    if train_feats.shape[0] != train_labels.shape[0] or test_feats.shape[0] != test_labels.shape[0]:
        raise ValueError("features and labels must have the same length")
    k = min(k, train_feats.shape[0])
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    bank = F.normalize(train_feats.float(), dim=1)
    bank_labels = train_labels.long().to(bank.device)
    correct = 0
    for start in range(0, test_feats.shape[0], chunk):
        q = F.normalize(test_feats[start : start + chunk].float().to(bank.device), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, device=bank.device)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        correct += int((votes.argmax(dim=1) == test_labels[start : start + chunk].to(bank.device)).sum())
    return correct / test_feats.shape[0]


@torch.no_grad()
def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate (n_r, ...) tensors of every rank in rank order (n_r may differ); identity without a group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    chunks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(chunks, padded.contiguous())
    return torch.cat([c[:s] for c, s in zip(chunks, sizes, strict=True)], dim=0)


@torch.no_grad()
def cls_features(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """h = LN(x_L[CLS]) of the encoder on clean normalized images at time σ'_0 = s_H·σ_min (method.md §2.1, §3.4).

    No noise is added: σ'_0·ε is below 1e-2 of the data scale, and leaving it out makes the check deterministic.
    """
    sigma0 = torch.tensor(resolution_shift(encoder.image_size) * SIGMA_MIN, device=images.device)
    x_in = images * c_in(sigma0).to(images.dtype)
    return encoder.representation(x_in, c_noise(sigma0).expand(images.shape[0])).float()


@torch.no_grad()
def encoder_features(
    encoder: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS features (N, D) and labels (N,) of labelled ``(x, y, ...)`` batches, on ``device`` (N may be 0)."""
    feats = [torch.zeros(0, encoder.dim, device=device)]
    labels = [torch.zeros(0, dtype=torch.long, device=device)]
    for batch in batches:
        feats.append(cls_features(encoder, batch[0].to(device)))
        labels.append(batch[-1].to(device, torch.long))
    return torch.cat(feats), torch.cat(labels)


def bank_shards(urls: list[str], num_samples: int | None, size: int | None, seed: int) -> list[str]:
    """The training shards of the k-NN memory bank: all of them, or a fixed subset holding about ``size`` samples.

    The subset is the first ⌈size / (num_samples / #shards)⌉ shards of a permutation seeded by ``seed`` (whole
    shards, so each rank reads its own files; `epg prepare` shuffles images across shards), in their original order.
    ``size`` None, or a split no larger than ``size``, keeps every shard.
    """
    if size is None or (num_samples is not None and num_samples <= size):
        return list(urls)
    if num_samples is None:
        raise ValueError(
            "cannot size the k-NN bank: the training shards have no dataset.json (remote shards are not counted); "
            "set knn_bank_size: null to use the whole train split"
        )
    count = min(len(urls), math.ceil(size * len(urls) / num_samples))
    chosen = np.random.default_rng(seed).permutation(len(urls))[:count]
    return [urls[i] for i in sorted(chosen)]


def eval_loader(
    shards: str,
    *,
    image_size: int,
    normalization: str,
    batch_size: int,
    subset: int | None = None,
    seed: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterable:
    """``(x, y)`` batches of this rank's share of ``shards`` through the evaluation transform (centre crop, no flip).

    ``subset``: about that many samples, a seeded subset of whole shards (:func:`bank_shards`); None reads them all.
    """
    urls = expand_shards(shards)
    num_samples = None
    if subset is not None:
        info = read_dataset_info(urls)
        if info is not None and len(info.get("shards", [])) == len(urls):  # the dataset.json describes these shards
            num_samples = int(info["num_samples"])
        elif not any(is_remote(u) for u in urls):
            num_samples = count_samples(urls)
    data = EPGDataModule(
        val_shards="::".join(bank_shards(urls, num_samples, subset, seed)),
        image_size=image_size,
        normalization=normalization,
        val_batch_size=batch_size,
        num_workers=num_workers,
        rank=rank,
        world_size=world_size,
    )
    return data.val_dataloader()


def knn_accuracies(
    encoders: dict[str, nn.Module],
    bank: Iterable,
    queries: Iterable,
    *,
    k: int = 20,
    temperature: float = 0.07,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """k-NN accuracy of each encoder, in one process: ``queries`` batches classified against a ``bank`` of batches."""
    bank, queries = list(bank), list(queries)  # read (and decode) once for all encoders
    results = {}
    for name, encoder in encoders.items():
        was_training = encoder.training
        encoder.eval()
        try:
            features = encoder_features(encoder, bank, device) + encoder_features(encoder, queries, device)
        finally:
            encoder.train(was_training)
        results[name] = knn_accuracy(*features, k=k, temperature=temperature)
    return results


# ---- the distributed check of PretrainModule's validation (method.md §3.9) -------------------------------------
def gather_queries(
    feats: list[torch.Tensor], labels: list[torch.Tensor], dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation features and labels of every rank (a collective: every rank calls it, also with none)."""
    empty = torch.zeros(0, dim, device=device)
    queries = gather_rows(torch.cat([empty, *feats]))
    return queries, gather_rows(torch.cat([empty.new_zeros(0, dtype=torch.long), *labels]).long())


def bank_accuracy(
    bank_feats: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    temperature: float,
) -> torch.Tensor:
    """k-NN accuracy of the gathered ``queries`` against this rank's bank features gathered from every rank."""
    bank_feats, bank_labels = gather_rows(bank_feats), gather_rows(bank_labels)
    return knn_accuracy(bank_feats, bank_labels, queries, labels, k=k, temperature=temperature)

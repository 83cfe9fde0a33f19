"""k-NN accuracy of stage-1 CLS features, the encoder check of `validate` (weighted vote as in DINO/InstDisc)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

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
        raise ValueError("k-NN needs at least one bank and one query feature; the validation split is empty")
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


def split_halves(feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(bank, bank labels, queries, query labels): even positions form the bank, odd ones the queries."""
    return feats[0::2], labels[0::2], feats[1::2], labels[1::2]


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
    """h = LN(x_L[CLS]) of the encoder on clean normalized images at time σ'_0 = s_H·σ_min (METHOD.md §2.1, §3.4).

    No noise is added: σ'_0·ε is below 1e-2 of the data scale, and leaving it out makes the check deterministic.
    """
    sigma0 = torch.tensor(resolution_shift(encoder.image_size) * SIGMA_MIN, device=images.device)
    x_in = images * c_in(sigma0).to(images.dtype)
    return encoder.representation(x_in, c_noise(sigma0).expand(images.shape[0])).float()


@torch.no_grad()
def encoder_knn_accuracy(
    encoder: nn.Module, images: torch.Tensor, labels: torch.Tensor, k: int = 20, batch_size: int = 256
) -> float:
    """k-NN accuracy of an encoder's CLS features on a labelled set split in alternating halves (bank / queries)."""
    was_training = encoder.training
    encoder.eval()
    feats = torch.cat([cls_features(encoder, images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    encoder.train(was_training)
    return knn_accuracy(*split_halves(feats, labels), k=k)

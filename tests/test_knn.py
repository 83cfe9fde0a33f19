"""k-NN accuracy of the encoder-quality check (epg.eval.knn)."""

import math

import pytest
import torch

from epg.eval.knn import bank_shards, gather_rows, knn_accuracy


def test_weighted_vote_by_hand():
    bank = torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0]])
    bank_labels = torch.tensor([0, 0, 1])
    # cos(q, bank) = (0.8, ~0.93, 0.6) for q = (0.8, 0.6): with k = 3, class 0 collects two strong votes.
    query = torch.tensor([[0.8, 0.6]])
    assert knn_accuracy(bank, bank_labels, query, torch.tensor([0]), k=3) == 1.0
    assert knn_accuracy(bank, bank_labels, query, torch.tensor([1]), k=3) == 0.0
    # A query on the class-1 axis: its single nearest neighbour is the class-1 bank entry.
    assert knn_accuracy(bank, bank_labels, torch.tensor([[0.1, 1.0]]), torch.tensor([1]), k=1) == 1.0


def test_temperature_weights_similarity():
    # Two far class-0 neighbours against one near class-1 neighbour: a sharp temperature lets the near one win.
    bank = torch.tensor([[1.0, 0.0], [math.cos(0.5), math.sin(0.5)], [math.cos(0.5), -math.sin(0.5)]])
    labels = torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.0]])
    assert knn_accuracy(bank, labels, query, torch.tensor([1]), k=3, temperature=0.01) == 1.0
    assert knn_accuracy(bank, labels, query, torch.tensor([0]), k=3, temperature=100.0) == 1.0


def test_accuracy_fraction_chunks_and_k_clipping():
    torch.manual_seed(0)
    centers = torch.randn(4, 16) * 5
    labels = torch.randint(0, 4, (400,))
    feats = centers[labels] + torch.randn(400, 16)
    acc = knn_accuracy(feats[:200], labels[:200], feats[200:], labels[200:], k=500, chunk=7)  # k clipped to 200
    assert acc == pytest.approx(1.0, abs=0.02)
    noise = torch.randn(400, 16)
    assert knn_accuracy(noise[:200], labels[:200], noise[200:], labels[200:], k=20) < 0.5
    with pytest.raises(ValueError, match="empty"):
        knn_accuracy(torch.zeros(0, 2), torch.zeros(0), feats, labels)


def test_gather_without_a_process_group_is_the_identity():
    feats = torch.arange(10.0).view(5, 2)
    assert torch.equal(gather_rows(feats), feats)


def test_bank_is_a_fixed_seeded_subset_of_whole_training_shards():
    urls = [f"train-{i:06d}.tar" for i in range(100)]  # 1,000 images each
    chosen = bank_shards(urls, 100_000, 5_000, seed=1)
    assert len(chosen) == 5 and chosen == sorted(chosen) and set(chosen) <= set(urls)
    assert bank_shards(urls, 100_000, 4_500, seed=1) == chosen  # whole shards: the first ⌈4.5⌉ of the same order
    assert bank_shards(urls, 100_000, 5_000, seed=2) != chosen
    assert bank_shards(urls, 5_000, 5_000, seed=1) == urls  # a small split is used whole
    assert bank_shards(urls, None, None, seed=1) == urls  # size None: the whole split (DINO)
    with pytest.raises(ValueError, match="knn_bank_size: null"):
        bank_shards(urls, None, 5_000, seed=1)

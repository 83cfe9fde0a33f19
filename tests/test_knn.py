"""k-NN accuracy of the encoder-quality check (epg.lightning.knn)."""

import math

import pytest
import torch

from epg.lightning.knn import encoder_knn_accuracy, gather_rows, knn_accuracy, split_halves
from epg.nn.network import build_representation


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
    acc = knn_accuracy(*split_halves(feats, labels), k=500, chunk=7)  # k clipped to the 200-sample bank
    assert acc == pytest.approx(1.0, abs=0.02)
    noise = knn_accuracy(*split_halves(torch.randn(400, 16), labels), k=20)
    assert noise < 0.5
    with pytest.raises(ValueError, match="empty"):
        knn_accuracy(torch.zeros(0, 2), torch.zeros(0), feats, labels)


def test_split_halves_and_gather_without_group():
    feats, labels = torch.arange(10.0).view(5, 2), torch.arange(5)
    bank, bank_labels, queries, query_labels = split_halves(feats, labels)
    assert bank_labels.tolist() == [0, 2, 4] and query_labels.tolist() == [1, 3]
    assert torch.equal(gather_rows(feats), feats)


def test_encoder_knn_accuracy_runs_on_a_preset():
    encoder = build_representation("EPG-Nano/4").encoder
    images = torch.randn(20, 3, 16, 16)
    acc = encoder_knn_accuracy(encoder, images, torch.arange(20) % 2, k=3)
    assert 0.0 <= acc <= 1.0 and encoder.training

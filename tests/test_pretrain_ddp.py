"""Gathered-negative InfoNCE under 2-process DDP (gloo) equals the single-process loss on the whole batch (§3.6)."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from epg.method.losses import info_nce
from tests._pretrain_utils import WORLD, make_module, module_loss_worker, pure_loss_worker


def _spawn(worker, data: dict, tmp_path) -> list[dict]:
    init_file = str(tmp_path / "dist_init")
    mp.spawn(worker, args=(init_file, data, str(tmp_path)), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(tmp_path, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


def test_gathered_info_nce_matches_single_process(tmp_path):
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 8)
    data = {"x": torch.randn(6, 5), "keys": torch.randn(6, 8), "tau": 0.2, "layer": layer.state_dict()}
    ranks = _spawn(pure_loss_worker, data, tmp_path)

    loss = info_nce(layer(data["x"]), data["keys"], data["tau"]).mean()
    loss.backward()
    # Rank r sees its own chunk first, then the others in rank order.
    assert torch.equal(ranks[1]["keys"], torch.cat([data["keys"][3:], data["keys"][:3]]))
    assert torch.equal(ranks[0]["keys"], data["keys"])
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(loss.item(), rel=1e-6)
    for name, p in layer.named_parameters():  # DDP averages the per-rank gradients
        for r in ranks:
            torch.testing.assert_close(r["grads"][name], p.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_module_loss_under_ddp_matches_single_process(tmp_path):
    torch.manual_seed(0)
    module = make_module()
    g = torch.Generator().manual_seed(1)
    shape = (8, 3, 16, 16)
    data = {k: torch.randn(shape, generator=g) for k in ("x0", "v1", "v2", "eps")}
    data |= {"sigmas": (3.0, 2.0, 0.0005), "tau_r": 0.1, "state": module.state_dict()}
    ranks = _spawn(module_loss_worker, data, tmp_path)

    inputs = (data[k] for k in ("x0", "v1", "v2", "eps"))
    out = module.loss.terms(module.online, module.target, *inputs, *data["sigmas"], data["tau_r"])
    out.loss.backward()
    out = {"loss": out.loss, **out.logs}
    assert ranks[0]["index"] == ranks[1]["index"] == module.loss.draw_pair_index(41, module.hparams.seed, 7)
    for key in ("loss", "loss_contrastive", "loss_consistency"):
        assert torch.stack([r[key] for r in ranks]).mean().item() == pytest.approx(out[key].item(), rel=1e-5)
    for name, p in module.online.named_parameters():
        torch.testing.assert_close(ranks[0]["grads"][name], p.grad, rtol=1e-4, atol=1e-6)

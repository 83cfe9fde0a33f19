"""notebooks/explore.ipynb runs end to end (nbclient): on a tiny demo-like folder, and with nothing there."""

from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from nbclient import NotebookClient

import epg
from epg.checkpoint import save_network_file

ROOT = Path(__file__).parents[1]


def execute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo: Path) -> tuple[str, int]:
    """Run the notebook with EPG_DEMO=``demo``; (its text outputs, its number of images). Fails on any error."""
    monkeypatch.setenv("EPG_DEMO", str(demo))
    monkeypatch.setenv("EPG_ROOT", str(ROOT))
    monkeypatch.delenv("EPG_DM_CKPT", raising=False)
    monkeypatch.delenv("EPG_CM_CKPT", raising=False)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend renders the figures
    nb = nbformat.read(ROOT / "notebooks" / "explore.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    return text, sum("image/png" in o.get("data", {}) for o in outputs)


def tiny_demo(root: Path) -> Path:
    """What `epg demo` leaves in its folder, tiny: data shards, the three checkpoints, TensorBoard events."""
    from torch.utils.tensorboard import SummaryWriter

    from epg.data.demo import load_digits
    from epg.lightning.pretrain import PretrainModule
    from tests.test_monitoring import write_split

    images, labels = load_digits()
    picks = np.linspace(0, len(labels) - 1, 40).astype(int)
    write_split(root / "data" / "train", "train", images[picks[::2]], labels[picks[::2]])
    write_split(root / "data" / "val", "val", images[picks[1::2]], labels[picks[1::2]])
    torch.manual_seed(0)
    PretrainModule(preset="EPG-Nano/4", total_steps=40).export_stage1(root / "pretrain/checkpoints/last.ckpt")
    for name, param in (("finetune_dm", "x0"), ("finetune_cm", "edm")):
        net = epg.build_network("EPG-Nano/4")
        for p in net.parameters():  # leave the zero-initialised output so the images are not blank
            p.data.add_(torch.randn_like(p) * 0.05)
        (root / name / "checkpoints").mkdir(parents=True)
        save_network_file(root / name / "checkpoints" / "last.ckpt", net, param)
    for name, tags in (
        ("pretrain", ("train/loss", "train/lr", "val/knn_acc", "train/num_scales", "hp_metric")),
        ("finetune_dm", ("train/loss", "val/ema_loss", "val/fid", "hp_metric")),
    ):
        with SummaryWriter(root / name / "tb" / "version_0") as writer:
            for step in (10, 20, 30):
                for tag in tags:
                    writer.add_scalar(tag, step / 10, step)
            if name == "pretrain":
                writer.add_image("train/views", torch.rand(3, 52, 137), 0)
    return root


@pytest.mark.slow
def test_explore_notebook_executes(tmp_path, monkeypatch):
    text, images = execute(tmp_path, monkeypatch, tiny_demo(tmp_path / "demo"))
    assert "network-file checkpoint" in text and "shift s_H = 0.25" in text
    assert "pretrain: hp_metric 3 at step 30" in text and "this run: K = 40" in text
    assert "stage 1, same-σ bank: σ=0.002:" in text and "random init, clean bank: σ=0.002:" in text  # k-NN over σ
    # TensorBoard panels, curriculum, k-NN curve, views, σ/weight plot, 5 sampler grids, trajectory, CM/DM grids
    assert images >= 14
    assert "skipped" in text and "finetune_cm" in text  # the CM run has no TensorBoard events here


@pytest.mark.slow
def test_explore_notebook_says_what_to_run_without_the_demo(tmp_path, monkeypatch):
    text, images = execute(tmp_path, monkeypatch, tmp_path / "nothing")
    assert "Some demo outputs are missing" in text and "make demo && make demo-consistency" in text
    assert "epg demo --out /tmp/demo" in text and "skipped:" in text
    assert images == 1  # the σ grid needs no checkpoint

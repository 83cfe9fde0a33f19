"""notebooks/explore.ipynb runs end to end (nbclient) on small DM and CM checkpoints."""

from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

import epg
from epg.checkpoint import save_network_file

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_explore_notebook_executes(tmp_path, monkeypatch):
    torch.manual_seed(0)
    for name, param in (("dm", "x0"), ("cm", "edm")):
        net = epg.build_network("EPG-Nano/4")
        for p in net.parameters():  # leave the zero-initialised output so the images are not blank
            p.data.add_(torch.randn_like(p) * 0.05)
        save_network_file(tmp_path / f"{name}.pt", net, param)
    monkeypatch.setenv("EPG_DM_CKPT", str(tmp_path / "dm.pt"))
    monkeypatch.setenv("EPG_CM_CKPT", str(tmp_path / "cm.pt"))
    monkeypatch.setenv("EPG_ROOT", str(ROOT))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend renders the figures
    nb = nbformat.read(ROOT / "notebooks" / "explore.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(
        o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
    )
    assert "network-file checkpoint" in outputs and "shift s_H = 0.25" in outputs
    images = [o for cell in nb.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 9  # σ/weight plot, 5 sampler grids, trajectory, CM 1/2-step and DM grids

"""`epg fid sweep` and the in-memory sampling/scoring it shares with InLoopFID (tiny EPG-Nano/4, 16 px, 8 samples)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from epg.commands.fid import main
from epg.eval import sweep
from epg.eval.distances import frechet_distance, frechet_to_stats, statistics
from epg.eval.errors import EvalInputError
from epg.eval.sweep import ema_choices, rank_indices, sample_images
from epg.eval.tables import format_sweep
from epg.method.denoiser import Denoiser
from epg.nn.network import build_network
from epg.sampling import SampleSettings
from tests.test_eval_metrics import one_thread, photo_crops, write_folder

NANO = "EPG-Nano/4"
N = 8
RATES = [0.5, 0.9]


def nano_network(seed: int) -> torch.nn.Module:
    """A Nano network with all parameters jittered, so that its samples are neither blank nor alike across seeds."""
    torch.manual_seed(seed)
    net = build_network(NANO)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def write_lightning_checkpoint(path, rates=RATES, objective: str = "diffusion") -> None:
    """A FinetuneModule-layout checkpoint (the contract of epg.checkpoint) with one EMA copy per rate."""
    state = {f"net.{k}": v for k, v in nano_network(0).state_dict().items()}
    for i in range(len(rates)):
        state |= {f"ema_nets.{i}.{k}": v for k, v in nano_network(i + 1).state_dict().items()}
    loss = {
        "class_path": f"epg.method.objectives.{'ConsistencyLoss' if objective == 'consistency' else 'DiffusionLoss'}"
    }
    hparams = {"preset": NANO, "ema_rates": list(rates), "loss": loss, "normalization": "imagenet"}
    torch.save({"pytorch-lightning_version": "2.6.0", "hyper_parameters": hparams, "state_dict": state}, path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    write_lightning_checkpoint(root / "run.ckpt")
    write_folder(root / "real", photo_crops(N, size=16))
    assert main(["ref", str(root / "real"), "--out", str(root / "ref.npz"), "--device", "cpu"]) == 0
    return root


def test_rank_split_makes_the_same_images_as_one_rank():
    denoiser = Denoiser(nano_network(3))
    num, world = 7, 3
    kwargs = dict(settings=SampleSettings(steps=3, seed=5), batch_size=2)
    whole = sample_images(denoiser, rank_indices(num), num, **kwargs)
    shares = [sample_images(denoiser, rank_indices(num, r, world), num, **kwargs) for r in range(world)]
    assert [s.shape[0] for s in shares] == [3, 2, 2]
    assert sorted(sum((rank_indices(num, r, world) for r in range(world)), [])) == list(range(num))
    assert whole.dtype == torch.uint8 and whole.shape == (num, 16, 16, 3) and whole.float().std() > 1
    # Same noise and label per index; batch composition may only move a pixel by a rounding step.
    for r, share in enumerate(shares):
        assert (share.int() - whole[rank_indices(num, r, world)].int()).abs().max() <= 1


@pytest.mark.parametrize("n", [2, 10, 63, 64, 200])
def test_low_rank_frechet_equals_torch_fidelity(n):
    rng = np.random.default_rng(n)
    mu, sigma = statistics(rng.normal(size=(300, 64)) @ rng.normal(size=(64, 64)) * 0.3)
    x = rng.normal(size=(n, 64)).astype(np.float32) + 0.5
    assert frechet_to_stats(x, mu, sigma) == pytest.approx(frechet_distance(*statistics(x), mu, sigma), rel=1e-6)
    with pytest.raises(EvalInputError, match="at least 2"):
        frechet_to_stats(x[:1], mu, sigma)


def test_ema_choices(files, tmp_path):
    assert ema_choices("all", files / "run.ckpt") == [0, 1]
    assert ema_choices("1, none", files / "run.ckpt") == [1, None]
    with pytest.raises(EvalInputError, match="--ema takes"):
        ema_choices("ema1", files / "run.ckpt")
    plain = tmp_path / "plain.pt"
    torch.save({"epg_network_file": 1}, plain)
    assert ema_choices("all", plain) == [None]


def test_format_sweep_pivots_scales_by_weights():
    rows = [
        {"weights": "ema:0.5", "scale": 1.0, "fid": 10.0},
        {"weights": "ema:0.9", "scale": 1.0, "fid": 9.0},
        {"weights": "ema:0.5", "scale": 2.0, "fid": 8.5},
    ]
    lines = format_sweep(rows).splitlines()
    assert lines[0].split() == ["cfg", "ema:0.5", "ema:0.9"]
    assert lines[1].split() == ["1.00", "10.000", "9.000"] and lines[2].split() == ["2.00", "8.500", "-"]


@pytest.mark.usefixtures(one_thread.__name__)
def test_sweep_table_json_plot_and_resume(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    args = ["sweep", str(files / "run.ckpt"), "--ref", str(files / "ref.npz"), "--scales", "1.0,3.0"]
    args += ["--ema", "all", "--num", str(N), "--steps", "3", "--batch-size", str(N), "--device", "cpu"]
    args += ["--interval", "none", "--out", str(out)]  # 3 levels: none would fall in the default interval
    assert main(args) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "sweep.json").read_text())
    rows = results["rows"]
    assert len(rows) == 4 and {(r["ema"], r["scale"]) for r in rows} == {(0, 1.0), (0, 3.0), (1, 1.0), (1, 3.0)}
    assert {r["weights"] for r in rows} == {"ema:0.5", "ema:0.9"}
    assert all(np.isfinite(r["fid"]) and r["num"] == N for r in rows)
    assert len({round(r["fid"], 6) for r in rows}) == 4  # each setting makes different images
    best = min(rows, key=lambda r: r["fid"])
    assert results["best"] == best
    assert f"best: cfg {best['scale']:g} with {best['weights']}" in printed
    assert "ema:0.5" in printed and "ema:0.9" in printed
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same command again reuses every row; a changed setting refuses the folder.
    monkeypatch.setattr(sweep, "sample_images", lambda *a, **k: pytest.fail("a finished row was sampled again"))
    assert main(args) == 0
    assert json.loads((out / "sweep.json").read_text())["rows"] == rows
    assert main([*args, "--seed", "1"]) == 2
    assert "different settings (seed)" in capsys.readouterr().err


def test_sweep_of_a_consistency_checkpoint_defaults_to_its_one_step_sampler(files, tmp_path):
    write_lightning_checkpoint(tmp_path / "cm.ckpt", rates=[0.5], objective="consistency")
    args = ["sweep", str(tmp_path / "cm.ckpt"), "--ref", str(files / "ref.npz"), "--scales", "1.0", "--ema", "0"]
    assert main([*args, "--num", "2", "--device", "cpu", "--out", str(tmp_path / "sweep")]) == 0
    settings = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["settings"]
    assert (settings["sampler"], settings["steps"]) == ("consistency", 1)  # not Heun-32


def test_sweep_refuses_a_reference_at_another_resolution(files, tmp_path, capsys):
    write_folder(tmp_path / "real32", photo_crops(2, size=32))
    assert main(["ref", str(tmp_path / "real32"), "--out", str(tmp_path / "ref32.npz"), "--device", "cpu"]) == 0
    args = ["sweep", str(files / "run.ckpt"), "--ref", str(tmp_path / "ref32.npz"), "--out", str(tmp_path / "o")]
    assert main([*args, "--num", "2", "--device", "cpu"]) == 2
    assert "reference is at 32x32 but the network makes 16x16" in capsys.readouterr().err


@pytest.mark.usefixtures(one_thread.__name__)
def test_sweep_final_run_compares_label_modes(files, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", str(files / "run.ckpt"), "--ref", str(files / "ref.npz"), "--scales", "1.0,2.0", "--ema", "1"]
    args += ["--num", "4", "--final-num", str(N), "--labels", "both", "--steps", "3", "--interval", "none"]
    args += ["--device", "cpu"]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "sweep.json").read_text())
    final = results["final"]
    assert final["num"] == N and final["setting"] == f"ema-1_cfg{results['best']['scale']:g}"
    for mode in ("balanced", "random"):
        metrics = final[mode]["metrics"]
        assert {"fid", "sfid", "kid", "precision", "recall"} <= set(metrics) and np.isfinite(metrics["fid"])
        with np.load(final[mode]["samples"]) as data:
            assert data["arr_0"].shape == (N, 16, 16, 3)
            labels = data["arr_1"]
        if mode == "balanced":
            assert labels.tolist() == [i * 10 // N for i in range(N)]
    assert final["balanced"]["metrics"]["fid"] != final["random"]["metrics"]["fid"]
    table = printed[printed.index(f"{N} samples, ema-1") :].splitlines()
    assert table[1].split()[:3] == ["mode", "FID", "sFID"]
    assert table[2].startswith("class-balanced") and table[3].startswith("random")

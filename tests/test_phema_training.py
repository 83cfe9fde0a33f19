"""Post-hoc EMA through a Lightning Trainer (method.md §13): copies, snapshots, exact resume, reconstruction and the
checkpoints the sampling commands read."""

from __future__ import annotations

import json

import pytest
import torch

from epg.checkpoint import load_denoiser
from epg.lightning.finetune import FinetuneModule
from epg.lightning.phema import PhemaOptions
from epg.method.phema import discrete_weights, gamma_of_sigma_rel
from epg.posthoc import reconstruct, reconstruct_run, snapshot_files, snapshot_name
from tests.test_finetune_module import NANO, write_stage1
from tests.test_finetune_trainer import loader, trainer

TARGET = 0.07
PHEMA = {"sigma_rels": (0.05, 0.10, TARGET), "snapshot_every": 3, "snapshot_dtype": "float32"}


def module(stage1: str, **kwargs) -> FinetuneModule:
    kwargs = {"phema": PHEMA, "ema_rates": (0.9,)} | kwargs
    return FinetuneModule(preset=NANO, init_from=stage1, warmup_steps=1, total_steps=100, lr=1e-3, **kwargs)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("stage1") / "stage1.ckpt"
    write_stage1(path)
    return str(path)


def _flat(state: dict) -> torch.Tensor:
    return torch.cat([v.flatten().double() for v in state.values() if v.is_floating_point()])


def test_options_are_checked():
    with pytest.raises(ValueError, match="σ_rel must lie"):
        PhemaOptions(sigma_rels=(0.5,))
    with pytest.raises(ValueError, match="snapshot_dtype"):
        PhemaOptions(snapshot_dtype="int8")
    with pytest.raises(ValueError, match="snapshot_unit"):
        PhemaOptions(snapshot_unit="kimg")
    assert PhemaOptions.of({"sigma_rels": [0.05]}).as_dict()["sigma_rels"] == [0.05]


def test_copies_follow_the_discrete_profile_without_a_trainer(stage1):
    """Three applied updates with θ_s known: each copy equals Σ_s w_s θ_s with w from discrete_weights."""
    m = module(stage1, phema={"sigma_rels": (0.05, 0.2)})
    p = m.net.decoder.out.weight
    seen = []
    for s in range(1, 4):
        with torch.no_grad():
            p.add_(torch.randn_like(p))
        seen.append(p.detach().clone().double())
        m.updates = s
        m.on_applied_update()
    for copy, sigma in zip(m.phema.nets, (0.05, 0.2), strict=True):
        w = discrete_weights(3, gamma_of_sigma_rel(sigma))
        expected = sum(wi * th for wi, th in zip(w, seen, strict=True))
        torch.testing.assert_close(copy.decoder.out.weight.double(), expected, rtol=1e-5, atol=1e-6)
    assert not m.phema.nets[0].training and m.train().phema.nets[0].training is False


def test_snapshot_interval_in_images(tmp_path, stage1):
    """snapshot_unit images (EDM2's snapshot_nimg): a snapshot follows the update that reaches or crosses each
    multiple. Every 8 images at 3 per update: images 3, 6, 9 | 12, 15, 18 | 21, 24 → updates 3, 6 and 8. Through a
    Trainer at batch 4 × 2 accumulated micro-batches (8 images per update), every 12 images: 8, 16 | 24 | 32, 40 | 48
    → updates 2, 3, 5 and 6, each snapshot recording its image count."""
    options = PhemaOptions(snapshot_every=8, snapshot_unit="images")
    phema = module(stage1, phema=options).phema
    assert [t for t in range(1, 9) if phema.due(t, batch=3)] == [3, 6, 8]
    with pytest.raises(ValueError, match="global batch"):
        phema.due(1)
    m = module(stage1, phema={"sigma_rels": (0.05,), "snapshot_every": 12, "snapshot_unit": "images"})
    trainer(tmp_path, max_steps=6, accumulate_grad_batches=2).fit(m, loader(n=48))
    files = snapshot_files(tmp_path)
    assert [f.name for f in files] == [snapshot_name(u) for u in (2, 3, 5, 6)]
    assert [torch.load(f, weights_only=True)["images"] for f in files] == [16, 24, 40, 48]


def test_snapshots_resume_and_reconstruction(tmp_path, stage1, capsys, monkeypatch):
    """24 updates, snapshots every 3: a run resumed at update 11 rewrites the same snapshots (to 1e-6: an in-process
    resume is not bitwise, the kill -9 test of tests/test_resume.py is) and misses none; σ_rel 0.07, tracked
    directly as a third copy, is reconstructed from the 0.05 and 0.10 copies of the 8 snapshots (16 profiles for 24
    updates, so not trivially exact; exact discrete inner products).

    Tolerance: L2 distance of the reconstructed weights to the tracked 0.07 copy ≤ 50 % of the distance between the
    tracked 0.07 and 0.05 copies (measured 32 %; the 0.10 copy lies 164 % away), profile error < 2 % (measured
    0.9 %). The first Adam updates move every weight by ~lr, so 24 updates are a rough trajectory; the longer
    synthetic one of tests/test_phema_math.py holds 1 %."""
    data = loader(n=4)  # one batch: the data order cannot differ after the resume
    torch.manual_seed(0)
    straight = module(stage1)
    t = trainer(tmp_path / "straight", max_steps=24)
    t.fit(straight, data)
    t.save_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    files = snapshot_files(tmp_path / "straight")
    assert [f.name for f in files] == [snapshot_name(u) for u in range(3, 25, 3)]

    torch.manual_seed(0)
    first = module(stage1)
    t = trainer(tmp_path / "run", max_steps=11)
    t.fit(first, data)
    t.save_checkpoint(tmp_path / "half.ckpt")
    resumed = module(stage1)
    trainer(tmp_path / "run", max_steps=24).fit(resumed, data, ckpt_path=tmp_path / "half.ckpt")
    assert [f.name for f in snapshot_files(tmp_path / "run")] == [f.name for f in files]
    for a, b in zip(files, snapshot_files(tmp_path / "run"), strict=True):
        sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
        assert sa["updates"] == sb["updates"]
        for x, y in zip(sa["state_dicts"], sb["state_dicts"], strict=True):
            assert all(torch.allclose(x[k], y[k], atol=1e-6) for k in x), a.name
    for x, y in zip(straight.phema.parameters(), resumed.phema.parameters(), strict=True):
        assert torch.allclose(x, y, atol=1e-6)

    (rec,) = reconstruct(tmp_path / "straight", [TARGET], use=(0.05, 0.10))
    assert rec.updates == 24
    tracked = _flat(straight.phema.nets[2].state_dict())
    other = _flat(straight.phema.nets[0].state_dict())
    error = float((_flat(rec.state_dict) - tracked).norm() / (tracked - other).norm())
    neighbour = float((_flat(straight.phema.nets[1].state_dict()) - tracked).norm() / (tracked - other).norm())
    assert error <= 0.5 and neighbour > 1.0 and rec.profile_error < 0.02, (error, neighbour, rec.profile_error)

    # A checkpoint that the sampling commands read: ema_nets.0 holds the reconstruction.
    ((path, rec),) = reconstruct_run(tmp_path / "straight", [TARGET])
    assert path.name == "sigma_rel-0.07_updates-24.ckpt"
    loaded = load_denoiser(path, ema=0)
    assert loaded.weights == f"phema:{TARGET}"
    net_state = loaded.denoiser.network.state_dict()
    assert all(torch.equal(net_state[k], rec.state_dict[k].to(net_state[k].dtype)) for k in net_state)
    again = FinetuneModule.load_from_checkpoint(path, weights_only=True)
    assert again.hparams.phema["reconstructed"] == TARGET
    # `epg ema list|reconstruct`, then `epg sample` on what it wrote.
    from epg.cli import main

    assert main(["ema", "list", str(tmp_path / "straight")]) == 0
    assert "sigma_rels" in capsys.readouterr().out
    out = tmp_path / "cli"
    assert main(["ema", "reconstruct", str(tmp_path / "straight"), "--sigma-rel", "0.06,0.08", "--out", str(out)]) == 0
    assert '"sigma_rel": 0.08' in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse names the valid σ_rel range
        main(["ema", "reconstruct", str(tmp_path / "straight"), "--sigma-rel", "0.5"])
    assert "σ_rel must lie" in capsys.readouterr().err
    sampled = out / "samples"
    assert main(["sample", str(out / "sigma_rel-0.06_updates-24.ckpt"), "--out", str(sampled), "--num", "2",
                 "--steps", "2"]) == 0  # fmt: skip
    assert len(list(sampled.glob("*.png"))) == 2
    # `epg fid sweep --sigma-rel`: one reconstruction per σ_rel, FID per (σ_rel, CFG scale), both plots; a rerun
    # samples nothing again.
    from epg.eval import sweep
    from tests.test_eval_metrics import photo_crops, write_folder

    write_folder(tmp_path / "real", photo_crops(4, size=16))
    assert main(["fid", "ref", str(tmp_path / "real"), "--out", str(tmp_path / "ref.npz"), "--device", "cpu"]) == 0
    ckpt = tmp_path / "straight" / "checkpoints" / "last.ckpt"
    args = ["fid", "sweep", str(ckpt), "--ref", str(tmp_path / "ref.npz"), "--scales", "1.0", "--num", "4"]
    args += ["--steps", "2", "--batch-size", "4", "--device", "cpu", "--out", str(tmp_path / "sweep")]
    args += ["--sigma-rel", "0.05,0.09"]
    assert main(args) == 0
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"]
    assert [(r["sigma_rel"], r["weights"]) for r in rows] == [(0.05, "phema:0.05"), (0.09, "phema:0.09")]
    assert (tmp_path / "sweep" / "sweep_sigma_rel.png").exists() and (tmp_path / "sweep" / "sweep.png").exists()
    monkeypatch.setattr(sweep, "sample_images", lambda *a, **k: pytest.fail("a finished row was sampled again"))
    assert main(args) == 0
    # The scoring loop the demo calls: a row per σ_rel with the scorer's numbers, and their plot.
    from epg.eval.phema import plot_sigma_rels, score_sigma_rels

    scored = score_sigma_rels(tmp_path / "straight", [0.05, 0.08], lambda p: {"fid": float(p.stat().st_size > 0)})
    assert [(r["sigma_rel"], r["updates"], r["fid"]) for r in scored] == [(0.05, 24, 1.0), (0.08, 24, 1.0)]
    assert plot_sigma_rels(scored, tmp_path / "phema.png") and (tmp_path / "phema.png").exists()
    # Reconstructing a tracked σ_rel from all copies returns that copy (the least squares picks it alone).
    (same,) = reconstruct(tmp_path / "straight", [0.10])
    torch.testing.assert_close(_flat(same.state_dict), _flat(straight.phema.nets[1].state_dict()), rtol=0, atol=1e-5)

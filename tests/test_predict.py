"""`epg predict`: `epg sample`'s images through Lightning's predict loop, resumable, split over ranks; no `epg test`.

The demo's diffusion config as a user runs it (`epg prepare demo`, `epg fit -c configs/demo/finetune_dm.yaml`, here 2
steps from scratch), sampled with 3 Heun steps at 16 px.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import epg.sampling.run as sample_run
from epg.cli import main as epg

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo" / "finetune_dm.yaml"
NUM = 6
SAMPLE = ["--sample.num", str(NUM), "--sample.steps", "3", "--sample.batch", "4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """configs/demo/finetune_dm.yaml trained 2 steps from scratch, in a folder of its own (its paths are relative)."""
    from epg.data.demo import prepare_demo

    root = tmp_path_factory.mktemp("predict")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        prepare_demo("runs/demo/data")
        short = ["--trainer.max_steps", "2", "--model.init_args.init_from", "null"]
        short += ["--model.init_args.network.image_size", "16"]  # the demo's size, else given by its stage-1 file
        short += ["--data.global_batch_size", "8", "--data.num_workers", "0"]
        assert epg(["fit", "-c", str(CONFIG), *short]) == 0
    finally:
        os.chdir(cwd)
    return {"root": root, "ckpt": root / "runs/demo/finetune_dm/checkpoints/last.ckpt"}


@pytest.fixture(autouse=True)
def _in_run_folder(run, monkeypatch):
    monkeypatch.chdir(run["root"])


def predict(run: dict[str, Path], out: Path, *extra: str) -> int:
    argv = ["-c", str(CONFIG), "--ckpt_path", str(run["ckpt"]), *SAMPLE, *extra, "--sample.out", str(out)]
    return epg(["predict", *argv])


def sample(run: dict[str, Path], out: Path, *extra: str) -> int:
    argv = [str(run["ckpt"]), "--out", str(out), "--num", str(NUM), "--steps", "3", "--batch", "4", "--no-progress"]
    return epg(["sample", *argv, *extra])


def test_predict_writes_the_images_of_epg_sample_that_fid_calc_scores(run, tmp_path, capsys):
    from tests.test_eval_metrics import photo_crops, write_folder

    assert predict(run, tmp_path / "predicted") == 0
    assert sorted(p.name for p in (tmp_path / "predicted").glob("*.png")) == [f"{i:06d}.png" for i in range(NUM)]
    predicted = np.load(tmp_path / "predicted.npz")
    assert predicted["arr_0"].shape == (NUM, 16, 16, 3) and predicted["arr_0"].dtype == np.uint8
    assert predicted["arr_1"].tolist() == [i * 10 // NUM for i in range(NUM)]  # class-balanced, in class order
    # The same checkpoint, seed and labels through `epg sample` (EMA copy 0 by default): the same images, bit for bit.
    assert sample(run, tmp_path / "sampled") == 0
    sampled = np.load(tmp_path / "sampled.npz")
    assert np.array_equal(predicted["arr_0"], sampled["arr_0"])
    assert np.array_equal(predicted["arr_1"], sampled["arr_1"])
    assert sample(run, tmp_path / "online", "--ema", "none") == 0  # predict used the EMA weights, not the online ones
    assert not np.array_equal(predicted["arr_0"], np.load(tmp_path / "online.npz")["arr_0"])
    # Both commands guard the folder with the same settings record: `epg sample` accepts predict's folder as complete.
    capsys.readouterr()
    assert sample(run, tmp_path / "predicted") == 0
    assert "is up to date" in capsys.readouterr().out

    real = write_folder(tmp_path / "real", photo_crops(NUM, size=16))
    assert epg(["fid", "ref", str(real), "--out", str(tmp_path / "ref.npz"), "--device", "cpu"]) == 0
    scores = tmp_path / "metrics.json"
    calc = ["fid", "calc", str(tmp_path / "predicted.npz"), "--ref", str(tmp_path / "ref.npz"), "--metrics", "fid"]
    assert epg([*calc, "--device", "cpu", "--out", str(scores)]) == 0
    assert json.loads(scores.read_text())["metrics"]["fid"] > 0


def test_predict_resumes_and_refuses_other_settings(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "s"
    random = ("--sample.labels", "random")  # drawn from the class counts of the training shards the run records
    assert predict(run, out, *random) == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.png")}
    for name in ("000001.png", "000004.png"):
        (out / name).unlink()
    written: list[str] = []
    real_write = sample_run.write_png
    monkeypatch.setattr(
        sample_run, "write_png", lambda path, image: (written.append(Path(path).name), real_write(path, image))
    )
    assert predict(run, out, *random) == 0
    assert sorted(written) == ["000001.png", "000004.png"]  # only the missing ones, and the same images again
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == before
    capsys.readouterr()
    assert predict(run, out, *random, "--sample.seed", "1") == 2  # other images: a one-line error, no traceback
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (the line before says where the label counts come from)
    assert err.startswith("epg predict: sample:") and "different settings (seed)" in err
    # Without --sample.out the run folder gets one folder per checkpoint step and settings.
    assert epg(["predict", "-c", str(CONFIG), "--ckpt_path", str(run["ckpt"]), *SAMPLE]) == 0
    default = run["root"] / "runs/demo/finetune_dm/samples" / f"last-step2_ema0_heun3_cfg1_balanced_seed0_n{NUM}"
    assert len(list(default.glob("*.png"))) == NUM and default.with_name(default.name + ".npz").is_file()


def test_there_is_no_epg_test(capsys):
    assert epg(["--help"]) == 0
    assert "predict" in capsys.readouterr().out.split("tools:")[0] and not epg(["test"]) == 0
    assert "there is no test split" in capsys.readouterr().err


@pytest.mark.slow
def test_two_ranks_write_the_single_rank_images(run, tmp_path):
    """DDP on 2 CPU processes (gloo): Lightning's sampler splits the missing indices; the folder is the same."""
    assert predict(run, tmp_path / "one") == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "epg.cli", "predict", "-c", str(CONFIG), "--ckpt_path", str(run["ckpt"])]
    cmd += [*SAMPLE, "--sample.out", str(tmp_path / "two"), "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    subprocess.run(cmd, check=True, env=env, cwd=run["root"], timeout=300, capture_output=True)
    assert np.array_equal(np.load(tmp_path / "one.npz")["arr_0"], np.load(tmp_path / "two.npz")["arr_0"])


def test_predict_reports_progress_and_stops_on_sigterm(run, tmp_path, monkeypatch, caplog):
    """Lightning's predict loop ignores its SIGTERM flag; SampleWriter stops after the batch, writes no checkpoint,
    and the same command then writes only the missing images. Progress lines come without a progress bar."""
    import lightning as L

    out, ckpt = tmp_path / "s", run["ckpt"]
    stamp = ckpt.stat().st_mtime_ns
    monkeypatch.setattr(L.Trainer, "received_sigterm", property(lambda self: True))
    with pytest.raises(SystemExit) as stop:
        predict(run, out)
    assert not stop.value.code  # as `epg fit` after SIGTERM: status 0
    assert len(list(out.glob("*.png"))) == 4  # one batch of --sample.batch 4, then the stop
    assert "epg predict: 4/6 images (66.7%)" in caplog.text and "SIGTERM: stopped after 4 new images" in caplog.text
    assert ckpt.stat().st_mtime_ns == stamp and not list(ckpt.parent.glob("*.tmp*"))  # predict saves no checkpoint
    monkeypatch.undo()
    monkeypatch.chdir(run["root"])
    caplog.clear()
    assert predict(run, out) == 0
    assert len(list(out.glob("*.png"))) == NUM and "epg predict: 2/2 images" in caplog.text

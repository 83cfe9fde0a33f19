"""`epg sample`: count, ADM npz, labels, per-image determinism and resuming (method.md §6.4, §8)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import epg.commands.sample as cli
import epg.sampling.run as sample_run
from epg.checkpoint import save_network_file
from epg.data.shards import shard_name, write_metadata, write_shard
from epg.nn.network import build_network
from epg.sampling.options import SamplingOptions
from epg.sampling.per_image import class_labels
from epg.sampling.run import SampleRun, SampleRunError

NUM = 12


@pytest.fixture(scope="module")
def nano(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("nets")
    net = build_network("EPG-Nano/4")
    paths = {"x0": root / "nano_x0.pt", "edm": root / "nano_edm.pt"}
    save_network_file(paths["x0"], net, "x0")
    save_network_file(paths["edm"], net, "edm", normalization="simple")
    return paths


def _run(ckpt: Path, out: Path, *extra: str) -> int:
    return cli.main([str(ckpt), "--out", str(out), "--num", str(NUM), "--steps", "3", "--batch", "5", *extra])


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    # batch composition may flip a rounding: allow one grey level
    return np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_writes_the_requested_pngs_and_an_adm_npz(nano: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "samples"
    assert _run(nano["x0"], out, "--cfg", "2.0", "--no-progress") == 0
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:06d}.png" for i in range(NUM)]
    data = np.load(tmp_path / "samples.npz")
    assert data["arr_0"].shape == (NUM, 16, 16, 3) and data["arr_0"].dtype == np.uint8
    # class-balanced, in class order: image i gets class ⌊i·10/12⌋
    assert data["arr_1"].tolist() == [i * 10 // NUM for i in range(NUM)]
    assert not list(out.glob(".*.tmp*"))


def test_rerun_fills_exactly_the_missing_files(
    nano: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "s"
    _run(nano["x0"], out, "--no-progress")
    before = np.load(tmp_path / "s.npz")["arr_0"]
    deleted = [1, 6, 11]
    for i in deleted:
        (out / f"{i:06d}.png").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    written: list[str] = []
    real_write = sample_run.write_png
    monkeypatch.setattr(
        sample_run, "write_png", lambda path, image: (written.append(Path(path).name), real_write(path, image))
    )
    _run(nano["x0"], out, "--no-progress")
    assert sorted(written) == [f"{i:06d}.png" for i in deleted]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png") if p.name in kept} == kept
    after = np.load(tmp_path / "s.npz")["arr_0"]
    assert _close(before, after)  # the refilled images are the same images
    written.clear()
    _run(nano["x0"], out, "--no-progress")
    assert written == []


def test_rerun_with_other_settings_is_refused(nano: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "s"
    _run(nano["x0"], out, "--no-progress", "--no-npz")
    assert not (tmp_path / "s.npz").exists()
    with pytest.raises(SystemExit, match="seed"):
        _run(nano["x0"], out, "--no-progress", "--seed", "1")


def test_images_depend_only_on_seed_and_index(nano: dict[str, Path], tmp_path: Path) -> None:
    # consistency 2-step draws noise inside the loop too; random labels are drawn per image
    args = ("--sampler", "consistency", "--steps", "2", "--labels", "random", "--no-progress")
    _run(nano["edm"], tmp_path / "a", *args)
    cli.main([str(nano["edm"]), "--out", str(tmp_path / "b"), "--num", "7", "--batch", "2", *args])
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert _close(a["arr_0"][:7], b["arr_0"]) and a["arr_1"][:7].tolist() == b["arr_1"].tolist()
    assert set(a["arr_1"].tolist()) <= set(range(10)) and len(set(a["arr_1"].tolist())) > 1
    _run(nano["edm"], tmp_path / "c", *args[:-1], "--seed", "1", "--no-progress")
    assert not _close(a["arr_0"], np.load(tmp_path / "c.npz")["arr_0"])


def test_stochastic_variant_reaches_the_sampler_and_the_folder_identity(nano: dict[str, Path], tmp_path: Path) -> None:
    args = ("--sampler", "stochastic", "--no-progress", "--no-npz")
    _run(nano["x0"], tmp_path / "official", *args)
    _run(nano["x0"], tmp_path / "edm", *args, "--stochastic-variant", "edm")
    # 3 steps at 16 px: σ' = 20 is churned by the official window [0.05, 50] only (the shifted one is [0.0125, 12.5])
    png = "000000.png"
    assert (tmp_path / "official" / png).read_bytes() != (tmp_path / "edm" / png).read_bytes()
    with pytest.raises(SystemExit, match="stochastic_variant"):
        _run(nano["x0"], tmp_path / "official", *args, "--stochastic-variant", "edm")


def write_train_split(folder: Path, counts: list[int]) -> Path:
    """An (empty) training shard with a dataset.json holding ``counts`` per class, as `epg prepare` writes it."""
    folder.mkdir(parents=True)
    records = {shard_name("train", 0): write_shard(folder / shard_name("train", 0), [])}
    classes = [f"n{c:08d}" for c in range(len(counts))]
    write_metadata(folder, "train", classes, {}, [shard_name("train", 0)], counts, 16, "png", records)
    return folder


def test_random_labels_follow_the_training_class_frequencies() -> None:
    counts, n = [100, 300, 0, 600], 10_000
    labels = class_labels(range(n), n, 4, "random", 0, class_counts=counts)
    assert np.bincount(labels, minlength=4) / n == pytest.approx([0.1, 0.3, 0.0, 0.6], abs=0.02)
    assert not (labels == 2).any()
    picked = [5, 17, n - 1]  # one draw per image, seeded by (seed, i): independent of the batch
    assert class_labels(picked, n, 4, "random", 0, counts).tolist() == labels[picked].tolist()
    uniform = class_labels(range(n), n, 4, "random", 0)  # no counts: every class equally often
    assert np.bincount(uniform, minlength=4) / n == pytest.approx([0.25] * 4, abs=0.02)
    with pytest.raises(ValueError, match="4 non-negative counts"):
        class_labels([0], n, 4, "random", 0, [1, 2])


def test_random_labels_read_the_class_counts_of_the_training_shards(
    nano: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    train = write_train_split(tmp_path / "data" / "train", [0, 0, 0, 5, 0, 0, 0, 5, 0, 0])
    ckpt = tmp_path / "run.ckpt"  # a FinetuneModule checkpoint records its datamodule's train_shards
    torch.save(
        {
            "pytorch-lightning_version": "2.6.0",
            "hyper_parameters": {"preset": "EPG-Nano/4", "loss": {"class_path": "epg.method.objectives.DiffusionLoss"}},
            "datamodule_hyper_parameters": {"train_shards": str(train)},
            "state_dict": {f"net.{k}": v for k, v in build_network("EPG-Nano/4").state_dict().items()},
        },
        ckpt,
    )
    random = ("--labels", "random", "--no-progress")
    _run(ckpt, tmp_path / "auto", *random)
    assert set(np.load(tmp_path / "auto.npz")["arr_1"].tolist()) == {3, 7}
    assert f"class frequencies of {train}" in capsys.readouterr().err
    _run(nano["x0"], tmp_path / "file", *random)  # a network file records no shards: uniform, with a note
    assert "note: random labels are uniform" in capsys.readouterr().err
    assert len(set(np.load(tmp_path / "file.npz")["arr_1"].tolist())) > 2
    _run(nano["x0"], tmp_path / "given", *random, "--label-counts", str(train / "dataset.json"))
    assert set(np.load(tmp_path / "given.npz")["arr_1"].tolist()) == {3, 7}
    with pytest.raises(SystemExit, match="label_counts"):  # other frequencies, other images: a fresh folder
        _run(nano["x0"], tmp_path / "file", *random, "--label-counts", str(train))


def test_argument_errors_say_what_to_do(nano: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--poor"):
        _run(nano["x0"], tmp_path / "x", "--autoguidance", "1.0")
    with pytest.raises(SystemExit, match="stochastic"):
        _run(nano["x0"], tmp_path / "x", "--s-churn", "10")
    with pytest.raises(FileNotFoundError):
        _run(tmp_path / "missing.pt", tmp_path / "x")


def test_the_command_is_a_typed_sample_run(nano: dict[str, Path], tmp_path: Path) -> None:
    """`epg sample` parses into a SampleRun, whose command line parses back into the same run."""
    argv = [str(nano["x0"]), "--out", str(tmp_path / "s"), "--num", "5", "--sampler", "stochastic", "--s-churn", "10"]
    argv += ["--cfg", "2", "--interval", "none", "--labels", "random", "--ema", "none", "--no-npz", "--no-clamp"]
    run = cli.sample_run(cli.build_parser().parse_args(argv))
    assert (run.options.sampler, run.options.steps, run.options.interval) == ("stochastic", 32, None)
    assert run.ema is None and run.s_churn == 10 and not run.npz and not run.clamp
    assert run.sampler_options() == {"s_churn": 10.0}
    words = shlex.split(run.command_line())
    assert words[:2] == ["epg", "sample"] and cli.sample_run(cli.build_parser().parse_args(words[2:])) == run
    # The library fills in the checkpoint's sampler and checks the options with the same messages.
    assert SampleRun(nano["edm"], tmp_path / "c", 4).options == SamplingOptions("consistency", 1)
    with pytest.raises(SampleRunError, match="--poor"):
        SampleRun(nano["x0"], tmp_path / "x", 4, autoguidance=1.0)
    with pytest.raises(SampleRunError, match="--sigma-mid"):
        SampleRun(nano["x0"], tmp_path / "x", 4, sigma_mid=(0.8,))


@pytest.mark.slow
def test_two_process_ddp_run_matches_one_process(nano: dict[str, Path], tmp_path: Path) -> None:
    base = [str(nano["x0"]), "--num", str(NUM), "--steps", "3", "--batch", "4", "--cfg", "2.0", "--no-progress"]
    cli.main([*base, "--out", str(tmp_path / "one")])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "epg.cli", "sample", *base, "--out", str(tmp_path / "two")]
    cmd += ["--devices", "2", "--accelerator", "cpu"]
    subprocess.run(cmd, check=True, env=env, cwd=tmp_path, timeout=180)
    assert _close(np.load(tmp_path / "one.npz")["arr_0"], np.load(tmp_path / "two.npz")["arr_0"])

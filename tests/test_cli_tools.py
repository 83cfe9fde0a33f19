"""Smoke tests of the `epg` dispatcher and `epg convert` (a subprocess each, as a user runs them)."""

import subprocess
import sys

import torch

import epg
from epg.checkpoint import load_denoiser
from epg.nn.official import epg_to_official_key


def run(*args):
    return subprocess.run([sys.executable, "-m", "epg.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_commands():
    res = run("--help")
    assert res.returncode == 0
    for name in ("fit", "validate", "prepare", "sample", "fid", "convert"):
        assert name in res.stdout


def test_unknown_command():
    res = run("frobnicate")
    assert res.returncode == 2 and "unknown command 'frobnicate'" in res.stderr


def test_convert_official_roundtrip(tmp_path):
    torch.manual_seed(0)
    net = epg.build_network("EPG-Nano/4")
    for p in net.parameters():
        p.data.normal_(0, 0.1)
    sd = {"module." + epg_to_official_key(k): v for k, v in net.state_dict().items()}
    torch.save({"nnet_ema": sd}, tmp_path / "official.pth")
    res = run("convert", str(tmp_path / "official.pth"), str(tmp_path / "ours.pt"), "--preset", "EPG-Nano/4")
    assert res.returncode == 0, res.stderr
    assert "0.1M parameters" in res.stdout
    loaded = load_denoiser(tmp_path / "ours.pt")
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    with torch.no_grad():
        ref = epg.Denoiser(net.eval(), "x0")(x, torch.tensor(1.0), y)
        assert torch.equal(loaded.denoiser(x, torch.tensor(1.0), y), ref)
    assert loaded.source == "network-file" and loaded.normalization == "imagenet"


def test_convert_errors_are_one_line(tmp_path):
    res = run("convert", str(tmp_path / "nope.pth"), str(tmp_path / "o.pt"), "--preset", "EPG-Nano/4")
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "does not exist" in res.stderr
    torch.save({"cls_token": torch.zeros(1, 1, 32)}, tmp_path / "bad.pth")
    res = run("convert", str(tmp_path / "bad.pth"), str(tmp_path / "o.pt"), "--preset", "EPG-Nano/4")
    assert res.returncode == 2 and "missing keys" in res.stderr
    assert not (tmp_path / "o.pt").exists()

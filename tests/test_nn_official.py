"""Official checkpoint loading: key layout, wrappers/prefixes, errors, and outputs vs an independent reference."""

from pathlib import Path

import pytest
import torch

import epg
from epg.method.noise import c_in, c_noise
from epg.nn.official import CheckpointMismatchError, epg_to_official_key, read_state_dict
from epg.nn.presets import get_config
from tests._official_reference import reference_forward

KEYS_FILE = Path(__file__).parent / "data" / "official_checkpoint_keys.txt"  # copy of shared/'s listing
CFG = get_config("EPG-Nano/4", dec_dim=48, dec_heads=3, num_classes=10)


def official_state_dict(cfg=CFG, seed=0):
    """Random weights under the official key names (decoder gates and output non-zero so they matter)."""
    torch.manual_seed(seed)
    net = epg.build_network(cfg)
    return {epg_to_official_key(k): torch.randn_like(v) * 0.2 for k, v in net.state_dict().items()}


def test_key_names_follow_the_official_layout():
    keys = set(official_state_dict())
    lines = KEYS_FILE.read_text().splitlines()
    official = {line.split("\t")[0] for line in lines if line and not line.startswith("#")}
    # The listed file holds block 0 only; every listed key must exist in ours (for block 0 / 0-th decoder block).
    assert official <= keys
    ours_block0 = {k for k in keys if not (k.startswith(("blocks.", "decoder_blocks.")) and ".0." not in k[:17])}
    assert ours_block0 == official


def test_xl_shapes_match_official_listing():
    with torch.device("meta"):
        net = epg.build_network("EPG-XL/16")
    shapes = {epg_to_official_key(k): tuple(v.shape) for k, v in net.state_dict().items()}
    lines = KEYS_FILE.read_text().splitlines()
    for line in lines:
        if line and not line.startswith("#"):
            key, shape = line.split("\t")
            assert shapes[key] == eval(shape), key


@pytest.mark.parametrize("wrap", ["bare", "nnet_ema", "state_dict", "model_module", "orig_mod"])
def test_load_official_matches_reference(wrap, tmp_path):
    sd = official_state_dict()
    if wrap == "nnet_ema":
        payload = {"nnet_ema": sd, "step": 5}
    elif wrap == "state_dict":
        payload = {"state_dict": sd}
    elif wrap == "model_module":
        payload = {"model": {"module." + k: v for k, v in sd.items()}}
    elif wrap == "orig_mod":
        payload = {"module._orig_mod." + k: v for k, v in sd.items()}
    else:
        payload = sd
    path = tmp_path / "ckpt.pth"
    torch.save(payload, path)
    den = epg.load_official(path, CFG, parameterization="x0")
    x = torch.randn(3, 3, 16, 16)
    sigma = torch.tensor([0.01, 0.7, 40.0])
    y = torch.tensor([0, 9, 10])
    with torch.no_grad():
        ours = den(x, sigma, y)
        ref = reference_forward(
            sd, c_in(sigma)[:, None, None, None] * x, c_noise(sigma), y, depth=2, enc_heads=2, dec_heads=3, patch=4
        )
    assert ours.shape == (3, 3, 16, 16)
    assert (ours - ref).abs().max().item() < 1e-4
    assert ref.abs().mean() > 1e-2  # the comparison is not between zeros


def test_edm_parameterization_wraps_the_same_network():
    sd = official_state_dict()
    den = epg.load_official(sd, CFG, parameterization="edm")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = den(x, torch.tensor(den.sigma_min), torch.tensor([1, 2]))
    assert torch.equal(out, x)  # D(x, σ'_min) = x


def test_mismatch_errors_name_keys():
    sd = official_state_dict()
    sd.pop("blocks.1.mlp.fc2.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["out.weight"] = torch.zeros(5, 48)
    with pytest.raises(CheckpointMismatchError) as err:
        epg.load_official(sd, CFG)
    msg = str(err.value)
    assert "encoder.blocks.1.mlp.fc2.bias" in msg and "extra.weight" in msg and "decoder.out.weight" in msg


def test_unconditional_checkpoint_builds_without_class_table():
    sd = official_state_dict()
    sd.pop("class_embed.weight")
    den = epg.load_official(sd, CFG, parameterization="edm")
    assert den.network.class_embed is None and den.null_label is None
    with torch.no_grad():
        assert den(torch.randn(1, 3, 16, 16), torch.tensor(1.0)).shape == (1, 3, 16, 16)


def test_read_state_dict_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "missing.pth")
    torch.save({"epoch": 3, "config": {"a": 1}}, tmp_path / "x.pth")
    with pytest.raises(CheckpointMismatchError, match="no tensors found"):
        read_state_dict(tmp_path / "x.pth")

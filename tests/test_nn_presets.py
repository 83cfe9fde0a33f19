"""Parameter counts of the paper presets (method.md §2.4), built on the meta device (no memory)."""

import pytest
import torch

from epg import build_network, build_representation, get_config

EXPECTED_M = {"EPG-L/16": 540.2, "EPG-XL/16": 583.0, "EPG-XXL/16": 788.9, "EPG-G/16": 1391.9, "EPG-L/32": 544.9}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("preset", sorted(EXPECTED_M))
def test_paper_parameter_counts(preset):
    with torch.device("meta"):
        net = build_network(preset)
    assert round(count(net) / 1e6, 1) == EXPECTED_M[preset]
    assert all(p.is_meta for p in net.parameters())


def test_encoder_and_projector_sizes():
    with torch.device("meta"):
        b = build_representation("RCM-B/16")
        large = build_representation("RCM-L/16")
        b768 = build_representation("RCM-B/16", proj_out=768)
    assert round(count(b.encoder) / 1e6, 1) == 85.8
    assert round(count(large.encoder) / 1e6, 1) == 202.5
    assert round(count(b.projection_head) / 1e6, 1) == 21.0
    assert round(count(b768.projection_head) / 1e6, 1) == 23.1
    assert round(count(large.projection_head) / 1e6, 1) == 22.0


def test_decoder_head_dims_and_tokens():
    cfg = get_config("EPG-XL/16")
    assert cfg.dec_dim // cfg.dec_heads == 72
    assert (cfg.image_size // cfg.patch_size) ** 2 + cfg.num_cls_tokens + 1 == 258
    cfg512 = get_config("EPG-L/32")
    assert (cfg512.image_size // cfg512.patch_size) ** 2 == 256


def test_encoder_to_decoder_only_when_widths_differ():
    with torch.device("meta"):
        names_l = set(build_network("EPG-L/16").state_dict())
        names_xl = set(build_network("EPG-XL/16").state_dict())
    assert not any("encoder_to_decoder" in k for k in names_l)
    assert "decoder.encoder_to_decoder.weight" in names_xl


def test_bad_presets_and_options_name_the_problem():
    with pytest.raises(ValueError, match="unknown preset 'EPG-Q/16'"):
        get_config("EPG-Q/16")
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        get_config("EPG-T/4", image_size=30)
    with pytest.raises(ValueError, match=r"unknown network option\(s\) \['widht'\]"):
        get_config("EPG-T/4", widht=3)


def test_stage1_names_are_the_released_encoders():
    """method.md §2.4: RCM-B (IN-256 and IN-512) is the ViT-B body (12, 768, 12), RCM-L (IN-256) the L one."""
    from epg.nn.presets import ALIASES, ENCODER_FIELDS, PRESETS, STAGE1_PRESETS

    def encoder(cfg):
        return {f: getattr(cfg, f) for f in ENCODER_FIELDS}

    for name, row in ALIASES.items():  # an alias is exactly the encoder part of its row
        assert get_config(name) == PRESETS[row]
    b16, b32, l16 = get_config("RCM-B/16"), get_config("RCM-B/32"), get_config("RCM-L/16")
    assert (b16.enc_depth, b16.enc_dim, b16.enc_heads, b16.image_size, b16.patch_size) == (12, 768, 12, 256, 16)
    assert (l16.enc_depth, l16.enc_dim, l16.enc_heads, l16.image_size, l16.patch_size) == (16, 1024, 16, 256, 16)
    # RCM-B/32 is the B encoder at 512 px with 32-px patches, not EPG-L/32's L encoder.
    assert (b32.enc_depth, b32.enc_dim, b32.enc_heads, b32.image_size, b32.patch_size) == (12, 768, 12, 512, 32)
    assert encoder(b32) == {**encoder(b16), "image_size": 512, "patch_size": 32}
    assert encoder(b32) != encoder(PRESETS["EPG-L/32"])
    assert set(STAGE1_PRESETS) == {"RCM-B/16", "RCM-L/16", "RCM-B/32"}
    with pytest.raises(ValueError, match="RCM-B/16, RCM-L/16, RCM-B/32"):
        get_config("RCM-X/8")

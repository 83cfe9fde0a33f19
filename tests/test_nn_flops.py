"""Analytic GFLOPs against the table of method.md §2.4 (linear-layer multiply-adds, DiT convention)."""

import pytest

from epg.nn.flops import encoder_macs, forward_macs


@pytest.mark.parametrize(
    "preset,gflops", [("EPG-L/16", 113), ("EPG-XL/16", 127), ("EPG-XXL/16", 176), ("EPG-G/16", 321), ("EPG-L/32", 114)]
)
def test_linear_gflops_match_table(preset, gflops):
    assert forward_macs(preset).linear / 1e9 == pytest.approx(gflops, abs=0.6)


def test_attention_adds_about_four_gflops():
    assert 3.5 < forward_macs("EPG-XL/16").attention / 1e9 < 4.5


def test_encoder_is_b_body():
    # ViT-B at 258 tokens: 12 blocks × 12·768² MACs per token ≈ 21.9 G, plus patchify, projector and attention.
    assert 22.0 < encoder_macs("RCM-B/16") / 1e9 < 24.0

"""Backbone behaviour: initialisation (method.md §2.3), conditioning, dtype handling, checkpointing, dropout."""

import math

import pytest
import torch

import epg
from epg.nn.layers import Attention, LayerNorm32, timestep_embedding


def test_stage2_init_outputs_zero_and_edm_is_skip():
    torch.manual_seed(0)
    net = epg.build_network("EPG-Nano/4")
    x = torch.randn(2, 3, 16, 16)
    y = torch.tensor([3, 10])
    with torch.no_grad():
        assert torch.equal(epg.Denoiser(net, "x0")(x, torch.tensor(1.0), y), torch.zeros_like(x))
        sigma = torch.tensor(2.0)
        d = epg.Denoiser(net, "edm")
        c_skip = 0.25 / ((2.0 - d.sigma_min) ** 2 + 0.25)
        assert torch.allclose(d(x, sigma, y), c_skip * x)


def test_init_statistics():
    torch.manual_seed(0)
    net = epg.build_network("EPG-T/4")
    enc = net.encoder
    assert enc.cls_token.std().item() < 1e-5
    assert abs(enc.pos_embed.std().item() - 0.02) < 0.003
    dim = enc.dim
    qkv = enc.blocks[0].attn.qkv.weight
    assert qkv.abs().max().item() <= math.sqrt(6 / (2 * dim)) + 1e-7
    assert qkv.abs().max().item() > 0.9 * math.sqrt(6 / (2 * dim))
    fc1 = enc.blocks[0].mlp.fc1.weight
    assert fc1.abs().max().item() <= math.sqrt(6 / (fc1.shape[0] + fc1.shape[1])) + 1e-7
    w = enc.patch_embed.proj.weight
    assert w.abs().max().item() <= math.sqrt(6 / (3 * 16 + dim)) + 1e-7
    assert torch.all(enc.blocks[0].attn.proj.bias == 0)
    blk = net.decoder.decoder_blocks[0]
    assert torch.all(blk.adaLN_modulation[1].weight == 0) and torch.all(blk.adaLN_modulation[1].bias == 0)
    assert torch.all(net.decoder.out.weight == 0) and torch.all(net.decoder.out.bias == 0)
    assert abs(net.class_embed.weight.std().item() - 0.02) < 0.004
    assert enc.blocks[0].attn.qkv.bias is None


def test_timestep_embedding_cos_first():
    e = timestep_embedding(torch.tensor([0.0, 1.0]), 8)
    assert torch.equal(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.tensor([10000 ** (-k / 4) for k in range(4)])
    assert torch.allclose(e[1], torch.cat([freqs.cos(), freqs.sin()]))


def test_labels_condition_the_output():
    torch.manual_seed(0)
    net = epg.build_network("EPG-Nano/4")
    for p in net.parameters():  # leave the zero-init regime
        p.data.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(1, 3, 16, 16).repeat(2, 1, 1, 1)
    out = net(x, torch.zeros(2), torch.tensor([1, 2]))
    assert not torch.allclose(out[0], out[1])
    with pytest.raises(ValueError, match="class-conditional"):
        net(x, torch.zeros(2))


def test_layernorm32_returns_input_dtype():
    ln = LayerNorm32(8)
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert ln(x).dtype == torch.bfloat16
    assert torch.allclose(ln(x).float(), torch.nn.functional.layer_norm(x.float(), (8,)), atol=1e-2)


def test_bf16_autocast_forward_runs():
    net = epg.build_network("EPG-Nano/4")
    x = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, torch.ones(2), torch.tensor([0, 1]))
    assert out.shape == x.shape and torch.isfinite(out.float()).all()


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    net = epg.build_network("EPG-Nano/4")
    for p in net.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    ckpt = epg.build_network("EPG-Nano/4", grad_checkpointing=True)
    ckpt.load_state_dict(net.state_dict())
    x, c, y = torch.randn(2, 3, 16, 16), torch.ones(2), torch.tensor([0, 1])
    grads = []
    for model in (net, ckpt):
        model.train()
        model.zero_grad()
        model(x, c, y).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_dropout_only_on_decoder_attention_output():
    net = epg.build_network("EPG-Nano/4", drop=0.5)
    drops = [(n, m.p) for n, m in net.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    assert drops and all(n.startswith("decoder.decoder_blocks.") and n.endswith("attn.proj_drop") for n, _ in drops)
    assert all(isinstance(m, Attention) for n, m in net.named_modules() if n.endswith(".attn"))


def test_representation_model():
    rep = epg.build_representation("EPG-Nano/4")
    rep.eval()
    z, h = rep(torch.randn(4, 3, 16, 16), torch.zeros(4))
    assert z.shape == (4, 16) and h.shape == (4, 32)
    names = [n for n, _ in rep.projection_head.named_children()]
    assert names == [str(i) for i in range(7)]
    assert isinstance(rep.projection_head[1], torch.nn.BatchNorm1d) and rep.projection_head[6].bias is None

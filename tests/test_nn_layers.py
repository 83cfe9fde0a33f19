"""timm's layers in epg.nn: the same state-dict keys and outputs as the hand-written layers they replaced.

The ``Previous*`` modules below are the layers of epg.nn before timm (commit 7cb0e83), kept as the reference.
"""

import pytest
import timm.layers
import timm.layers.config
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block as TimmBlock
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import epg
from epg.nn.decoder import DecoderBlock
from epg.nn.flops import encoder_macs, forward_macs
from epg.nn.layers import Block
from epg.nn.presets import get_config


class PreviousLayerNorm32(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(
            x.dtype
        )


class PreviousAttention(nn.Module):
    def __init__(self, dim, num_heads, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class PreviousMlp(nn.Module):
    def __init__(self, dim, mlp_ratio=4.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.act = nn.GELU()
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class PreviousBlock(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1 = PreviousLayerNorm32(dim, eps=1e-5)
        self.attn = PreviousAttention(dim, num_heads)
        self.norm2 = PreviousLayerNorm32(dim, eps=1e-5)
        self.mlp = PreviousMlp(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def previous_decoder_block(dim, enc_dim, num_heads, drop) -> DecoderBlock:
    """The decoder block with the previous attention, MLP and fp32 LayerNorms (its own forward is unchanged)."""
    block = DecoderBlock(dim, enc_dim, num_heads, drop=drop)
    block.norm1, block.norm2 = PreviousLayerNorm32(dim, eps=1e-5), PreviousLayerNorm32(dim, eps=1e-5)
    block.attn, block.mlp = PreviousAttention(dim, num_heads, proj_drop=drop), PreviousMlp(dim)
    return block


def same_weights(module: nn.Module, reference: nn.Module) -> None:
    """Random (non-default) weights in ``module``, copied into ``reference``, whose keys and shapes must be equal."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    ours = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    reference.load_state_dict(module.state_dict())


def outputs_and_grads(module: nn.Module, *inputs: torch.Tensor) -> list[torch.Tensor]:
    inputs = [t.clone().requires_grad_() for t in inputs]
    module.zero_grad()
    out = module(*inputs)
    out.float().square().sum().backward()
    return [out.detach(), *(t.grad for t in inputs), *(p.grad for p in module.parameters())]


def assert_all_equal(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> None:
    assert len(ours) == len(reference)
    for a, b in zip(ours, reference, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_encoder_block_is_timms_and_reproduces_the_previous_block(monkeypatch):
    # The SDPA path is kept even where TIMM_FUSED_ATTN=0 would select timm's explicit softmax.
    monkeypatch.setattr(timm.layers.config, "_USE_FUSED_ATTN", 0)
    block, previous = Block(48, 3), PreviousBlock(48, 3)
    assert isinstance(block, TimmBlock) and block.attn.fused_attn
    assert isinstance(block.norm1, timm.layers.LayerNormFp32) and block.norm1.eps == 1e-5
    assert block.attn.qkv.bias is None and block.attn.proj.bias is not None
    same_weights(block, previous)
    x = torch.randn(2, 10, 48)
    assert_all_equal(outputs_and_grads(block, x), outputs_and_grads(previous, x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_all_equal(outputs_and_grads(block, x), outputs_and_grads(previous, x))
    with pytest.raises(ValueError, match="width 48 is not divisible by 5 heads"):
        Block(48, 5)


def test_patch_embed_is_timms_and_reproduces_the_conv_patchify():
    encoder = epg.build_network("EPG-Nano/4").encoder
    embed = encoder.patch_embed
    assert isinstance(embed, timm.layers.PatchEmbed)
    assert [k for k in embed.state_dict()] == ["proj.weight", "proj.bias"]
    x = torch.randn(2, 3, 16, 16)
    previous = F.conv2d(x, embed.proj.weight, embed.proj.bias, stride=4).flatten(2).transpose(1, 2)
    assert torch.equal(embed(x), previous)
    with pytest.raises(AssertionError, match=r"Input height \(32\) doesn't match model \(16\)"):
        embed(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("train", [False, True])
def test_decoder_block_uses_timm_attention_and_mlp_and_reproduces_the_previous_block(train):
    """In training mode the one dropout (p 0.5, on the attention output) draws the same mask as before."""
    block, previous = DecoderBlock(48, 32, 3, drop=0.5), previous_decoder_block(48, 32, 3, drop=0.5)
    assert isinstance(block.attn, timm.layers.Attention) and block.attn.fused_attn
    assert isinstance(block.mlp, timm.layers.Mlp)
    same_weights(block, previous)
    block.train(train), previous.train(train)
    x, skip, c = torch.randn(2, 10, 48), torch.randn(2, 10, 32), torch.randn(2, 32)
    torch.manual_seed(1)
    ours = outputs_and_grads(block, x, skip, c)
    torch.manual_seed(1)
    assert_all_equal(ours, outputs_and_grads(previous, x, skip, c))


def test_analytic_flops_count_the_network():
    """epg.nn.flops equals torch's FLOP counter (math SDPA, so the attention products are counted too)."""
    cfg = get_config("EPG-Nano/4", dec_dim=48, dec_heads=3)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as network:
            epg.build_network(cfg).eval()(x, torch.ones(1), torch.tensor([1]))
        with FlopCounterMode(display=False) as representation:
            epg.build_representation(cfg).eval()(x, torch.ones(1))
    assert network.get_total_flops() == 2 * forward_macs(cfg).total
    assert representation.get_total_flops() == 2 * encoder_macs(cfg)


def test_network_compiles_as_one_graph_with_grad_checkpointing():
    torch.manual_seed(0)
    net = epg.build_network("EPG-Nano/4", grad_checkpointing=True).train()
    for p in net.parameters():  # leave the zero-init regime
        p.data.add_(torch.randn_like(p) * 0.05)
    x, c, y = torch.randn(2, 3, 16, 16), torch.ones(2), torch.tensor([0, 1])
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    results = []
    for forward in (net, compiled):
        net.zero_grad()
        out = forward(x, c, y)
        out.square().sum().backward()
        results.append([out.detach(), *(p.grad for p in net.parameters())])
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, atol=1e-6)

"""An independent functional EPG forward on the official flat key names (method.md §1.6, §2), for loader tests."""

import math

import torch
import torch.nn.functional as F


def _ln(x, sd, name, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def _lin(x, sd, name):
    return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))


def _attn(x, sd, name, heads):
    b, n, c = x.shape
    d = c // heads
    q, k, v = _lin(x, sd, name + ".qkv").reshape(b, n, 3, heads, d).unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return _lin((w @ v).transpose(1, 2).reshape(b, n, c), sd, name + ".proj")


def _mlp(x, sd, name):
    return _lin(F.gelu(_lin(x, sd, name + ".fc1")), sd, name + ".fc2")


def _temb(c, dim):
    half = dim // 2
    freqs = torch.tensor([10000.0 ** (-k / half) for k in range(half)], dtype=torch.float64)
    a = c.double()[:, None] * freqs[None]
    return torch.cat([a.cos(), a.sin()], 1).float()


def reference_forward(sd, x_in, c_noise, y, *, depth, enc_heads, dec_heads, patch, num_tokens=1):
    """F(x_in, c_noise, y) of an official EPG state dict, written from method.md §2 alone."""
    b = x_in.shape[0]
    dim = sd["pos_embed"].shape[-1]
    patches = F.conv2d(x_in, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    grid = patches.shape[-1]
    patches = patches.flatten(2).transpose(1, 2)
    e = sd["class_embed.weight"][y]
    temb = _temb(c_noise, dim)
    cls = sd["cls_token"].expand(b, -1, -1) + e[:, None]
    x = torch.cat([cls, temb[:, None], patches], 1) + sd["pos_embed"]
    skips = []
    for i in range(depth):
        p = f"blocks.{i}."
        x = x + _attn(_ln(x, sd, p + "norm1"), sd, p + "attn", enc_heads)
        x = x + _mlp(_ln(x, sd, p + "norm2"), sd, p + "mlp")
        skips.append(x)
    x = _ln(x, sd, "norm")
    if "encoder_to_decoder.weight" in sd:
        x = _lin(x, sd, "encoder_to_decoder")
    c = temb + e
    for j in range(depth):
        p = f"decoder_blocks.{j}."
        x = _ln(_lin(torch.cat([x, skips[depth - 1 - j]], -1), sd, p + "skip_linear"), sd, p + "skip_norm")
        sh1, sc1, g1, sh2, sc2, g2 = _lin(F.silu(c), sd, p + "adaLN_modulation.1")[:, None].chunk(6, -1)
        x = x + g1 * _attn(_ln(x, sd, p + "norm1") * (1 + sc1) + sh1, sd, p + "attn", dec_heads)
        x = x + g2 * _mlp(_ln(x, sd, p + "norm2") * (1 + sc2) + sh2, sd, p + "mlp")
    x = _lin(_ln(x[:, num_tokens + 1 :], sd, "out_norm"), sd, "out")
    x = x.reshape(b, grid, grid, patch, patch, 3).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, 3, grid * patch, grid * patch)

"""Analytic FLOP counts of a preset, for throughput/MFU reporting (method.md §2.4, DiT convention)."""

from __future__ import annotations

from dataclasses import dataclass

from epg.nn.presets import EPGConfig, get_config


@dataclass(frozen=True)
class FlopCount:
    """Multiply-adds of one forward pass per image, split by part (1 MAC = 2 FLOPs)."""

    encoder_linear: float
    decoder_linear: float
    attention: float  # QKᵀ and AV products

    @property
    def linear(self) -> float:
        """Linear-layer MACs: the GFLOPs column of method.md §2.4."""
        return self.encoder_linear + self.decoder_linear

    @property
    def total(self) -> float:
        return self.linear + self.attention


def forward_macs(preset: str | EPGConfig, **overrides) -> FlopCount:
    """MACs per image of one forward pass of the stage-2 network (encoder + decoder)."""
    cfg = get_config(preset, **overrides)
    patches = (cfg.image_size // cfg.patch_size) ** 2
    tokens = patches + cfg.num_cls_tokens + 1
    big_d, d, r = cfg.enc_dim, cfg.dec_dim, cfg.mlp_ratio
    per_token_block = (4 + 2 * r) * big_d**2  # qkv + proj + MLP
    enc = patches * 3 * cfg.patch_size**2 * big_d + tokens * cfg.enc_depth * per_token_block
    dec_block = tokens * ((4 + 2 * r) * d**2 + (d + big_d) * d) + 6 * d * big_d  # + skip linear, adaLN
    dec = cfg.dec_depth * dec_block + patches * d * 3 * cfg.patch_size**2
    if d != big_d:
        dec += tokens * big_d * d
    attn = 2 * tokens**2 * (cfg.enc_depth * big_d + cfg.dec_depth * d)
    return FlopCount(float(enc), float(dec), float(attn))


def encoder_macs(preset: str | EPGConfig, **overrides) -> float:
    """MACs per image of one encoder forward (stage 1), projector included."""
    cfg = get_config(preset, **overrides)
    patches = (cfg.image_size // cfg.patch_size) ** 2
    tokens = patches + cfg.num_cls_tokens + 1
    enc = (
        patches * 3 * cfg.patch_size**2 * cfg.enc_dim
        + tokens * cfg.enc_depth * (4 + 2 * cfg.mlp_ratio) * cfg.enc_dim**2
    )
    proj = cfg.enc_dim * cfg.proj_hidden + cfg.proj_hidden**2 + cfg.proj_hidden * cfg.proj_out
    return float(enc + proj + 2 * tokens**2 * cfg.enc_depth * cfg.enc_dim)


def train_flops_per_image(stage: str, preset: str | EPGConfig, **overrides) -> float:
    """FLOPs per image of one training step (1 MAC = 2 FLOPs; backward = 2× forward).

    "finetune" (DM): one network pass with gradients. "pretrain" (method.md §3.8): online passes on u1, u2 and x_a
    with gradients (3 × 3) plus the target on u1, u2 and the online x_b without (3): 12 encoder-pass equivalents.
    """
    if stage == "finetune":
        return 2 * 3 * forward_macs(preset, **overrides).total
    if stage == "pretrain":
        return 2 * 12 * encoder_macs(preset, **overrides)
    raise ValueError(f"unknown stage {stage!r}: choose 'pretrain' or 'finetune'")


# Dense (not 2:4-sparse) bf16/fp16 tensor-core peaks in TFLOP/s, by device-name substring, first match wins. The
# H200's is the bf16 matrix rate the project measures against (benchmarks/gpu_check.sh, `epg bench`); the others are
# the datasheet dense numbers. Lightning's own table knows the H200 only as "h200 sxm1"/"h200 nvl1", with sparse
# peaks, and no device named plainly "NVIDIA H200".
DENSE_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h200", 790.0),
    ("h100 pcie", 756.0),
    ("h100", 989.4),
    ("a100", 312.0),
)


def dense_peak_tflops(device_name: str, half_precision: bool = True) -> float | None:
    """Dense bf16/fp16 peak of a GPU named ``device_name`` (e.g. "NVIDIA H200"), None when unknown or not half."""
    if not half_precision:
        return None
    name = device_name.lower()
    return next((peak for key, peak in DENSE_PEAK_TFLOPS if key in name), None)

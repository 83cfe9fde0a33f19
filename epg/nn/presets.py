"""Named model sizes: the paper's table rows (method.md §2.4) and small presets for CPU work."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EPGConfig:
    """Architecture hyper-parameters of one EPG network (encoder + decoder + class table)."""

    image_size: int = 256
    patch_size: int = 16
    enc_dim: int = 768
    enc_depth: int = 12
    enc_heads: int = 12
    dec_dim: int = 1584
    dec_depth: int = 12
    dec_heads: int = 22
    num_cls_tokens: int = 1
    num_classes: int | None = 1000  # None: unconditional (no class table)
    mlp_ratio: float = 4.0
    drop: float = 0.0  # decoder attention-output dropout (0 for the DM, 0.5 for the CM; method.md §2.2)
    proj_hidden: int = 4096  # stage-1 projector (method.md §2.1, §10.1)
    proj_out: int = 256
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}: "
                "choose a patch size that divides the resolution"
            )
        for name in ("enc", "dec"):
            dim, heads = getattr(self, f"{name}_dim"), getattr(self, f"{name}_heads")
            if dim % heads:
                raise ValueError(f"{name}_dim {dim} is not divisible by {name}_heads {heads}")


@dataclass
class NetworkOptions:
    """EPGConfig fields that override a preset's, one by one; a field left None keeps the preset's value.

    The type of the modules' ``network`` argument, so that a config's fields combine with command-line ones
    (``--model.init_args.network.image_size 64`` keeps the config's ``drop: 0.5``).
    """

    image_size: int | None = None
    patch_size: int | None = None
    enc_dim: int | None = None
    enc_depth: int | None = None
    enc_heads: int | None = None
    dec_dim: int | None = None
    dec_depth: int | None = None
    dec_heads: int | None = None
    num_cls_tokens: int | None = None
    num_classes: int | None = None  # 0 gives an unconditional network (the preset's None cannot be spelled here)
    mlp_ratio: float | None = None
    drop: float | None = None
    proj_hidden: int | None = None
    proj_out: int | None = None
    grad_checkpointing: bool | None = None


def network_overrides(network: NetworkOptions | Mapping[str, Any] | None) -> dict[str, Any]:
    """The fields a ``network`` argument (NetworkOptions or a dict of its fields) sets, as a plain dict: what the
    modules save as a hyper-parameter. As in NetworkOptions, None keeps the preset's value."""
    if network is None:
        return {}
    fields = dataclasses.asdict(network) if isinstance(network, NetworkOptions) else dict(network)
    return {k: v for k, v in fields.items() if v is not None}


def _row(enc: tuple[int, int, int], dec: tuple[int, int, int], image_size: int, patch_size: int) -> EPGConfig:
    return EPGConfig(
        image_size=image_size,
        patch_size=patch_size,
        enc_depth=enc[0],
        enc_dim=enc[1],
        enc_heads=enc[2],
        dec_depth=dec[0],
        dec_dim=dec[1],
        dec_heads=dec[2],
    )


# Paper rows (method.md §2.4): (blocks, width, heads) for encoder and decoder. Expected parameter counts
# (decoder + encoder + class table) are asserted in tests/test_nn_presets.py.
PRESETS: dict[str, EPGConfig] = {
    "EPG-L/16": _row((16, 1024, 16), (16, 1024, 16), 256, 16),  # 540.2M, FID 8.82 as a 1-step CM
    "EPG-XL/16": _row((12, 768, 12), (12, 1584, 22), 256, 16),  # 583.0M, FID 2.04
    "EPG-XXL/16": _row((12, 768, 12), (12, 1920, 16), 256, 16),  # 788.9M, FID 1.87
    "EPG-G/16": _row((12, 768, 12), (12, 2688, 21), 256, 16),  # 1391.9M, FID 1.58
    "EPG-L/32": _row((16, 1024, 16), (16, 1024, 16), 512, 32),  # 544.9M, FID 2.35 at 512
    # CPU presets (not in the paper): 32-px inputs, patch 4 → 64 tokens.
    "EPG-S/4": dataclasses.replace(
        _row((6, 256, 4), (6, 256, 4), 32, 4), num_classes=10, proj_hidden=1024, proj_out=128
    ),
    "EPG-T/4": dataclasses.replace(
        _row((4, 128, 4), (4, 128, 4), 32, 4), num_classes=10, proj_hidden=512, proj_out=128
    ),
    "EPG-Nano/4": dataclasses.replace(_row((2, 32, 2), (2, 32, 2), 16, 4), num_classes=10, proj_hidden=64, proj_out=16),
}
# Stage-1 names for the encoders the paper released (method.md §2.4: RCM-B on IN-256 and IN-512, RCM-L on IN-256).
# RCM-B/16 and RCM-L/16 are the encoder part of a row (ALIASES); RCM-B/32, the B encoder at 512 px, is no row's
# encoder (EPG-L/32 has the L one): it is RCM-B/16's body with 32-px patches (configs/pretrain/rcm_b32_in512.yaml).
ALIASES = {"RCM-B/16": "EPG-XL/16", "RCM-L/16": "EPG-L/16"}
STAGE1_PRESETS: dict[str, EPGConfig] = {
    **{name: PRESETS[row] for name, row in ALIASES.items()},
    "RCM-B/32": dataclasses.replace(PRESETS["EPG-XL/16"], image_size=512, patch_size=32),
}


def get_config(preset: str | EPGConfig, **overrides) -> EPGConfig:
    """Resolve a preset name (or config) and apply field overrides, with errors that name the bad option."""
    if isinstance(preset, EPGConfig):
        cfg = preset
    elif preset in PRESETS or preset in STAGE1_PRESETS:
        cfg = PRESETS.get(preset) or STAGE1_PRESETS[preset]
    else:
        names = ", ".join([*PRESETS, *STAGE1_PRESETS])
        raise ValueError(f"unknown preset {preset!r}: choose one of {names}")
    fields = {f.name for f in dataclasses.fields(EPGConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown network option(s) {unknown}: valid options are {sorted(fields)}")
    return dataclasses.replace(cfg, **overrides)


# What a stage-2 network takes from the stage-1 file it starts from (method.md §2.3): the encoder's shape and the
# projector of the CM's frozen stage-1 copy (§5.4); the decoder depth follows, as each block takes one skip.
ENCODER_FIELDS = (
    "image_size",
    "patch_size",
    "enc_dim",
    "enc_depth",
    "enc_heads",
    "num_cls_tokens",
    "mlp_ratio",
    "proj_hidden",
    "proj_out",
)


def with_stage1_encoder(preset: str, network: Mapping[str, Any], stage1: EPGConfig) -> dict[str, Any]:
    """``network`` overrides of ``preset`` completed so that the encoder is ``stage1``'s: the fields it does not set
    itself that differ (an explicit field is kept, and a mismatch then shows when the weights are loaded)."""
    network = dict(network)
    base = get_config(preset, **network)
    taken = {f: getattr(stage1, f) for f in ENCODER_FIELDS if f not in network}
    taken = {f: value for f, value in taken.items() if value != getattr(base, f)}
    depth = taken.get("enc_depth", base.enc_depth)
    if "dec_depth" not in network and depth != base.dec_depth:
        taken["dec_depth"] = depth
    return {**taken, **network}

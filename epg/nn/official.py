"""Loading released EPG/RCM checkpoints (layout: shared/official_checkpoint_keys.txt; method.md §2, §12)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from epg.nn.network import EPGNetwork, EPGRepresentation, build_network, build_representation
from epg.nn.presets import EPGConfig

# Wrapper keys released files may use, most preferred first (EMA weights before online ones).
WRAPPER_KEYS = ("nnet_ema", "ema", "model_ema", "model", "state_dict", "nnet", "net")
PREFIXES = ("module.", "_orig_mod.")
_ENCODER = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
_DECODER = ("decoder_blocks.", "encoder_to_decoder.", "out_norm.", "out.")


class CheckpointMismatchError(RuntimeError):
    """A state dict does not fit the network: lists missing/unexpected keys and shape mismatches."""


def read_state_dict(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A flat tensor dict from a file or mapping: unwraps `nnet_ema`/`state_dict`/`model`…, strips prefixes."""
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        if not os.path.isfile(source):
            raise FileNotFoundError(f"checkpoint {source} does not exist")
        state = torch.load(source, map_location="cpu", weights_only=True)
    while not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            raise CheckpointMismatchError(
                f"no tensors found; top-level keys are {sorted(state)[:20]}: expected a state dict or one wrapped "
                f"under one of {WRAPPER_KEYS}"
            )
        state = dict(inner)
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        changed = True
        while changed:
            changed = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def official_to_epg_key(key: str) -> str:
    """Map an official flat key to this package's nested module names."""
    if key.startswith(_ENCODER) or key in ("cls_token", "pos_embed"):
        return "encoder." + key
    if key.startswith(_DECODER):
        return "decoder." + key
    return key


def epg_to_official_key(key: str) -> str:
    """Inverse of :func:`official_to_epg_key`."""
    for prefix in ("encoder.", "decoder."):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], ignore: tuple[str, ...] = ()) -> None:
    """Strictly copy ``state`` into ``module``; keys starting with ``ignore`` prefixes may be missing/extra.

    Raises :class:`CheckpointMismatchError` naming every missing/unexpected key and shape mismatch.
    """
    own = module.state_dict()
    skip = lambda k: k.startswith(ignore) if ignore else False  # noqa: E731
    # BN step counters are bookkeeping that some files omit.
    missing = [k for k in own if k not in state and not skip(k) and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and not skip(k)]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                shown = ", ".join(items[:12]) + (f", … ({len(items)} in all)" if len(items) > 12 else "")
                parts.append(f"{title}: {shown}")
        raise CheckpointMismatchError("checkpoint does not fit the model — " + "; ".join(parts))
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def _classes_from(state: Mapping[str, torch.Tensor]) -> int | None:
    table = state.get("class_embed.weight")
    return None if table is None else table.shape[0] - 1


def load_official_network(
    source: str | os.PathLike | Mapping[str, torch.Tensor], preset: str | EPGConfig, **overrides
) -> EPGNetwork:
    """An :class:`EPGNetwork` holding a released fine-tuned checkpoint's weights (EMA when the file has both)."""
    state = {official_to_epg_key(k): v for k, v in read_state_dict(source).items()}
    overrides.setdefault("num_classes", _classes_from(state))  # the CM may be unconditional (method.md §5.1)
    network = build_network(preset, **overrides)
    load_into(network, state)
    return network.eval()


def load_official_representation(
    source: str | os.PathLike | Mapping[str, torch.Tensor], preset: str | EPGConfig, **overrides
) -> EPGRepresentation:
    """A stage-1 :class:`EPGRepresentation` from a released RCM checkpoint (encoder + `projection_head`)."""
    state = {official_to_epg_key(k): v for k, v in read_state_dict(source).items()}
    proj = state.get("projection_head.6.weight")
    if proj is not None:
        overrides.setdefault("proj_out", proj.shape[0])
        overrides.setdefault("proj_hidden", proj.shape[1])
    network = build_representation(preset, **overrides)
    load_into(network, state)
    return network

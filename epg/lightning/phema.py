"""Power-function EMA copies kept during training and their periodic snapshots (method.md §13).

:class:`PowerEMAs` holds one copy of the online network per σ_rel, updated after every applied optimizer update
(t = the applied-update count, so a skipped fp16 step changes nothing), and writes a snapshot of all copies every
``snapshot_every`` updates, or training images as EDM2 counts them (``snapshot_unit: images``: after the update that
reaches or crosses each multiple), into ``<run folder>/phema/phema-<t>.pt``. A snapshot is a dict::

    {"epg_phema_snapshot": 1, "updates": t, "images": images trained on (None without a Trainer),
     "sigma_rels": [...], "gammas": [...], "dtype": "float16",
     "parameters": [names the EMA averages], "state_dicts": [network state dict of copy i, ...]}

named by t, so a run that resumes from an earlier checkpoint rewrites the same files (atomically, same bytes)
instead of adding or losing any. :mod:`epg.posthoc` (which owns the format) reads them back and reconstructs
other profiles.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from epg.io import save_torch
from epg.method.phema import gamma_of_sigma_rel, power_ema_update_
from epg.posthoc import SNAPSHOT_FOLDER, SNAPSHOT_VERSION, snapshot_name

SNAPSHOT_UNITS = ("updates", "images")
SNAPSHOT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "network": None}


@dataclass
class PhemaOptions:
    """Post-hoc EMA settings of a FinetuneModule (its ``phema`` hyper-parameter).

    Args:
        sigma_rels: the σ_rel of each power-function copy (EDM2 keeps 0.05 and 0.10).
        snapshot_every: write a snapshot every this many applied updates or images (0: never; the copies are still
            kept).
        snapshot_unit: what ``snapshot_every`` counts: "updates" (applied optimizer updates) or "images" (training
            images, global batch × applied updates, as EDM2's ``snapshot_nimg``; a snapshot follows the update that
            reaches or crosses each multiple).
        snapshot_dtype: "float16" (EDM2's choice, half the bytes), "bfloat16", "float32" or "network" (as trained).
        reconstructed: set only in a checkpoint written by ``epg ema reconstruct``: the σ_rel whose reconstruction
            ``ema_nets.0`` holds.
    """

    sigma_rels: tuple[float, ...] = (0.05, 0.10)
    snapshot_every: int = 1000
    snapshot_unit: str = "updates"
    snapshot_dtype: str = "float16"
    reconstructed: float | None = None

    def __post_init__(self) -> None:
        self.sigma_rels = tuple(float(s) for s in self.sigma_rels)
        for s in self.sigma_rels:
            gamma_of_sigma_rel(s)  # a σ_rel out of range fails here, with the range in the message
        if self.snapshot_every < 0:
            raise ValueError(f"phema.snapshot_every must be ≥ 0, got {self.snapshot_every}")
        if self.snapshot_unit not in SNAPSHOT_UNITS:
            raise ValueError(f"phema.snapshot_unit must be one of {list(SNAPSHOT_UNITS)}, got {self.snapshot_unit!r}")
        if self.snapshot_dtype not in SNAPSHOT_DTYPES:
            choices = sorted(SNAPSHOT_DTYPES)
            raise ValueError(f"phema.snapshot_dtype must be one of {choices}, got {self.snapshot_dtype!r}")

    @classmethod
    def of(cls, value: PhemaOptions | dict | None) -> PhemaOptions | None:
        """Options from a config value: a PhemaOptions, a dict of its fields, or None (no post-hoc EMA)."""
        if value is None or isinstance(value, PhemaOptions):
            return value
        return cls(**dict(value))

    def as_dict(self) -> dict:
        return {**asdict(self), "sigma_rels": list(self.sigma_rels)}


class PowerEMAs(nn.Module):
    """One gradient-free copy of ``net`` per σ_rel (``nets.<i>``), always in eval mode."""

    def __init__(self, net: nn.Module, options: PhemaOptions) -> None:
        super().__init__()
        self.options = options
        self.gammas = [gamma_of_sigma_rel(s) for s in options.sigma_rels]
        self.nets = nn.ModuleList([copy.deepcopy(net).requires_grad_(False).eval() for _ in options.sigma_rels])

    def train(self, mode: bool = True) -> PowerEMAs:
        return super().train(False)

    @torch.no_grad()
    def update_(self, online: nn.Module, updates: int) -> None:
        """Fold the online weights of the ``updates``-th applied update into every copy (β_1 = 0 copies them)."""
        for net, gamma in zip(self.nets, self.gammas, strict=True):
            power_ema_update_(net, online, updates, gamma)

    def after_update(self, online: nn.Module, updates: int, trainer=None, batch: int = 0) -> None:
        """:meth:`update_` after the ``updates``-th applied update, then under a Trainer the snapshot when due, into
        ``<trainer.default_root_dir>/phema`` (every rank gathers, rank 0 writes); ``batch``: the global batch (images
        per applied update), needed by ``snapshot_unit: images``."""
        self.update_(online, updates)
        if trainer is not None and self.due(updates, batch):
            folder = os.path.join(trainer.default_root_dir, SNAPSHOT_FOLDER)
            self.write_snapshot(
                folder, updates, write=trainer.is_global_zero, images=updates * batch if batch else None
            )

    def due(self, updates: int, batch: int = 0) -> bool:
        """Whether the ``updates``-th applied update, of ``batch`` images each, ends a snapshot interval."""
        every = self.options.snapshot_every
        if every <= 0:
            return False
        if self.options.snapshot_unit == "updates":
            return updates % every == 0
        if batch <= 0:
            raise ValueError("phema.snapshot_unit 'images' needs the global batch size of each update")
        return (updates * batch) // every > ((updates - 1) * batch) // every

    def full_state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Each copy's whole state dict on the CPU in the snapshot dtype; under FSDP2 every rank must call this
        (the shards are gathered with torch.distributed.checkpoint's full-state-dict option)."""
        dtype = SNAPSHOT_DTYPES[self.options.snapshot_dtype]
        states = []
        for net in self.nets:
            if any(type(p).__name__ == "DTensor" for p in net.parameters()):
                from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

                full = StateDictOptions(full_state_dict=True, cpu_offload=True)
                state = get_model_state_dict(net, options=full)
            else:
                state = net.state_dict()
            states.append({k: _cast(v.detach().cpu(), dtype) for k, v in state.items()})
        return states

    def write_snapshot(
        self, folder: str | os.PathLike, updates: int, write: bool = True, images: int | None = None
    ) -> Path:
        """Write the snapshot of ``updates`` into ``folder`` (``write`` False: gather only, as ranks > 0 do)."""
        states = self.full_state_dicts()
        path = Path(folder) / snapshot_name(updates)
        if write:
            payload = {
                "epg_phema_snapshot": SNAPSHOT_VERSION,
                "updates": int(updates),
                "images": images,
                "sigma_rels": list(self.options.sigma_rels),
                "gammas": list(self.gammas),
                "dtype": self.options.snapshot_dtype,
                "parameters": [name for name, _ in self.nets[0].named_parameters()],
                "state_dicts": states,
            }
            save_torch(payload, path)
        return path


def _cast(value: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return value.to(dtype) if dtype is not None and value.is_floating_point() else value.clone()

"""Post-hoc EMA reconstruction from a run's power-function snapshots (method.md §13; EDM2 App. C.3).

:func:`reconstruct` combines the snapshots written during training (:mod:`epg.lightning.phema`) into the weights of
other σ_rel; :func:`write_reconstruction` puts such weights into a copy of a training checkpoint, in the EMA slot
that ``epg sample``, ``epg predict`` and ``epg fid`` read by default (``ema_nets.0``), with the σ_rel recorded in
the ``phema.reconstructed`` hyper-parameter. :func:`reconstruct_run` does both for a run folder
(``epg ema reconstruct``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from epg.checkpoint import read_checkpoint
from epg.io import save_torch
from epg.method.phema import DISCRETE_LIMIT, profile_error, solve_coefficients

# The snapshot format, written during training by epg.lightning.phema.PowerEMAs (this module imports no Lightning).
SNAPSHOT_VERSION = 1
SNAPSHOT_FOLDER = "phema"  # under the run folder
RECONSTRUCTED_FOLDER = "reconstructed"  # under SNAPSHOT_FOLDER


def snapshot_name(updates: int) -> str:
    """File name of the snapshot written after ``updates`` applied updates."""
    return f"phema-{updates:09d}.pt"


@dataclass
class Reconstruction:
    """The weights of one σ_rel at ``updates``, the coefficients of the snapshot copies and the profile's error."""

    sigma_rel: float
    updates: int
    state_dict: dict[str, torch.Tensor]
    coefficients: list[float]
    profile_error: float  # relative L2 error of the reconstructed profile (closed form)


def snapshot_files(run: str | os.PathLike) -> list[Path]:
    """The snapshots of a run folder (or of its ``phema`` folder itself), oldest first."""
    folder = Path(run)
    if (folder / SNAPSHOT_FOLDER).is_dir():
        folder = folder / SNAPSHOT_FOLDER
    return sorted(folder.glob("phema-*.pt"))


def _read(path: Path, mmap: bool = False) -> dict:
    """A snapshot file, checked for the format; ``mmap``: tensors are mapped, not read (for the headers)."""
    snap = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    if not isinstance(snap, dict) or snap.get("epg_phema_snapshot") != SNAPSHOT_VERSION:
        raise ValueError(f"{path} is not a post-hoc EMA snapshot of version {SNAPSHOT_VERSION}")
    return snap


def snapshot_headers(run: str | os.PathLike | Sequence[str | os.PathLike]) -> list[tuple[Path, int, list[float]]]:
    """(file, updates, σ_rels) of each snapshot of a run folder (or of a list of files), read memory-mapped (no
    weights are loaded), oldest first."""
    files = snapshot_files(run) if isinstance(run, str | os.PathLike) else [Path(p) for p in run]
    out = []
    for path in files:
        snap = _read(path, mmap=True)
        out.append((path, int(snap["updates"]), [float(s) for s in snap["sigma_rels"]]))
    return sorted(out, key=lambda h: h[1])


def reconstruct(
    run: str | os.PathLike | Sequence[str | os.PathLike],
    sigma_rels: Sequence[float],
    updates: int | None = None,
    dtype: torch.dtype = torch.float32,
    use: Sequence[float] | None = None,
) -> list[Reconstruction]:
    """Weights of each σ_rel in ``sigma_rels`` at ``updates`` applied updates (default: the last snapshot's) as
    Σ_i x_i θ̂_i over the snapshot copies written at or before it, x from
    :func:`epg.method.phema.solve_coefficients`; parameters are summed in ``dtype``, one snapshot file in memory at
    a time, buffers come from the last snapshot used. ``run`` is a run folder, its ``phema`` folder or a list of
    snapshot files; ``use`` restricts the snapshot copies to those σ_rel (default: all)."""
    headers = snapshot_headers(run)
    if not headers:
        raise FileNotFoundError(f"no post-hoc EMA snapshots (phema-*.pt) in {run}: train with phema set")
    last = max(u for _, u, _ in headers) if updates is None else int(updates)
    headers = sorted((h for h in headers if h[1] <= last), key=lambda h: h[1])
    if not headers:
        raise ValueError(f"no snapshot at or before update {last} in {run}")
    keep = [[use is None or s in use for s in sig] for _, _, sig in headers]
    in_t = [u for (_, u, sig), k in zip(headers, keep, strict=True) for _, ok in zip(sig, k, strict=True) if ok]
    in_s = [s for (_, _, sig), k in zip(headers, keep, strict=True) for s, ok in zip(sig, k, strict=True) if ok]
    if not in_t:
        raise ValueError(f"the snapshots in {run} keep no copy of σ_rel {list(use or [])}")
    coefficients = [solve_coefficients(in_t, in_s, last, s) for s in sigma_rels]
    sums: list[dict[str, torch.Tensor]] = [{} for _ in sigma_rels]
    column, snap = 0, None
    for (path, _, _), k in zip(headers, keep, strict=True):
        snap = _read(path)
        names = set(snap.get("parameters") or snap["state_dicts"][0])
        for state in (state for state, ok in zip(snap["state_dicts"], k, strict=True) if ok):
            for out, x in zip(sums, coefficients, strict=True):
                weight = float(x[column])
                for key, value in state.items():
                    if not (key in names and value.is_floating_point()):
                        continue
                    if key in out:  # add_ promotes a half-precision snapshot without a converted copy
                        out[key].add_(value, alpha=weight)
                    else:
                        out[key] = value.to(dtype) * weight
            column += 1
    result = []
    for s, x, out in zip(sigma_rels, coefficients, sums, strict=True):
        state = {k: out.get(k, v) for k, v in snap["state_dicts"][-1].items()}
        error = profile_error(x, in_t, in_s, last, s, discrete=len(in_t) * last <= DISCRETE_LIMIT)
        result.append(Reconstruction(float(s), last, state, x.tolist(), error))
    return result


def write_reconstruction(checkpoint: str | os.PathLike, rec: Reconstruction, out: str | os.PathLike) -> Path:
    """A copy of the training ``checkpoint`` whose ``ema_nets.0.*`` hold ``rec``'s weights (in the dtype the slot
    had), with ``phema.reconstructed`` = σ_rel in its hyper-parameters and the details (updates, coefficients, profile
    error) under ``epg_phema_reconstruction``; a run without
    fixed-rate EMA copies gets one slot of rate 1.0 (a copy that never changes). Written atomically."""
    ckpt = read_checkpoint(checkpoint)
    hp = dict(ckpt.get("hyper_parameters") or {})
    if "preset" not in hp:
        raise ValueError(f"{checkpoint} is not a FinetuneModule checkpoint (no 'preset' hyper-parameter)")
    state = dict(ckpt["state_dict"])
    slot = {k[len("ema_nets.0.") :]: v for k, v in state.items() if k.startswith("ema_nets.0.")}
    if not slot:
        slot = {k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")}
        hp["ema_rates"] = [1.0]
    if set(slot) != set(rec.state_dict):
        raise ValueError(f"the snapshots do not fit {checkpoint}: their keys differ from the network's")
    for key, value in rec.state_dict.items():
        state[f"ema_nets.0.{key}"] = value.to(slot[key].dtype)
    hp["phema"] = {**(hp.get("phema") or {}), "reconstructed": rec.sigma_rel}
    ckpt["state_dict"], ckpt["hyper_parameters"] = state, hp
    ckpt["epg_phema_reconstruction"] = {
        "sigma_rel": rec.sigma_rel,
        "updates": rec.updates,
        "coefficients": rec.coefficients,
        "profile_error": rec.profile_error,
    }
    save_torch(ckpt, out)
    return Path(out)


def reconstruction_name(sigma_rel: float, updates: int) -> str:
    return f"sigma_rel-{sigma_rel:g}_updates-{updates}.ckpt"


def reconstruct_run(
    run: str | os.PathLike,
    sigma_rels: Sequence[float],
    updates: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
) -> list[tuple[Path, Reconstruction]]:
    """Reconstruct each σ_rel of a run folder and write it into a copy of ``checkpoint`` (default: the run's
    ``checkpoints/last.ckpt``) under ``out`` (default ``<run>/phema/reconstructed``); returns (path, reconstruction)."""
    run = Path(run)
    checkpoint = Path(checkpoint) if checkpoint is not None else run / "checkpoints" / "last.ckpt"
    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist: pass one with --checkpoint")
    folder = Path(out) if out is not None else run / SNAPSHOT_FOLDER / RECONSTRUCTED_FOLDER
    written = []
    for rec in reconstruct(run, sigma_rels, updates):
        path = write_reconstruction(checkpoint, rec, folder / reconstruction_name(rec.sigma_rel, rec.updates))
        written.append((path, rec))
    return written

"""Loading a sampling-ready :class:`Denoiser` from any checkpoint this package meets.

Three formats are accepted:

1. an *EPG network file* written by ``epg convert`` or :func:`save_network_file`:
   ``{"epg_network_file": 1, "config": {...EPGConfig...}, "parameterization": "x0"|"edm",
   "normalization": "imagenet"|"simple", "state_dict": {...}}``;
2. a Lightning checkpoint (a file, or the folder of a sharded FSDP checkpoint) of
   :class:`epg.lightning.finetune.FinetuneModule`: ``hyper_parameters`` hold
   ``preset``, ``network`` (EPGConfig overrides), ``loss`` (the objective's class path), ``normalization`` and
   ``ema_rates``; the state dict
   holds the online network under ``net.`` and EMA copies under ``ema_nets.<i>.`` (i indexes ``ema_rates``);
3. a released official checkpoint (needs ``preset``; method.md §12), see :func:`epg.load_official`.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from epg.io import recover_interrupted_swap, save_torch
from epg.method.denoiser import Denoiser
from epg.method.objectives import FinetuneLoss, loss_class, sampler_for
from epg.nn.network import EPGNetwork, build_network
from epg.nn.official import load_into, load_official_network
from epg.nn.presets import EPGConfig, get_config

NETWORK_FILE_VERSION = 1


@dataclass
class LoadedModel:
    """A denoiser plus what a sampler needs to know about it."""

    denoiser: Denoiser
    normalization: str
    source: str  # "network-file" | "lightning" | "official"
    weights: str  # "online" or "ema:<rate>"


def save_network_file(
    path: str | os.PathLike, network: EPGNetwork, parameterization: str, normalization: str = "imagenet"
) -> None:
    """Write an EPG network file atomically (:func:`epg.io.save_torch`: a temporary sibling, then a rename)."""
    payload = {
        "epg_network_file": NETWORK_FILE_VERSION,
        "config": dataclasses.asdict(network.config),
        "parameterization": parameterization,
        "normalization": normalization,
        "state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()},
    }
    save_torch(payload, path)


def _lightning_network(ckpt: dict, ema: int | None) -> tuple[EPGNetwork, str, str, str]:
    hp = ckpt.get("hyper_parameters", {})
    if "preset" not in hp:
        raise ValueError("Lightning checkpoint has no 'preset' hyper-parameter: is it a FinetuneModule checkpoint?")
    network = build_network(hp["preset"], **(hp.get("network") or {}))
    rates = list(hp.get("ema_rates") or [])
    if ema is not None and ema >= len(rates):
        if rates:
            raise ValueError(f"ema index {ema} out of range: the checkpoint keeps EMA rates {rates}")
        ema = None  # no EMA kept: fall back to the online weights
    prefix = "net." if ema is None else f"ema_nets.{ema}."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    load_into(network, state)
    parameterization = checkpoint_loss(hp).parameterization
    weights = "online" if ema is None else f"ema:{rates[ema]}"
    reconstructed = (hp.get("phema") or {}).get("reconstructed")
    if ema == 0 and reconstructed is not None:  # epg.posthoc put a reconstruction in the first slot
        weights = f"phema:{reconstructed}"
    return network, parameterization, hp.get("normalization", "imagenet"), weights


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint as one dict: a file, or a sharded (FSDP, ``ModelParallelStrategy``) checkpoint folder.

    A folder holds ``meta.pt`` (Lightning's metadata, hyper-parameters included) and torch.distributed.checkpoint
    shards, which are consolidated here on the CPU. A folder that a crash left under its hidden ``.<name>.old`` twin
    during an atomic swap (:func:`epg.io.swap_in_folder`, as :class:`epg.lightning.faults.AtomicModelParallelStrategy`
    saves) is renamed back first.
    """
    path = Path(path)
    if not os.path.lexists(path):
        recover_interrupted_swap(path, cleanup=False)  # a training job may be saving beside this reader
    if path.is_dir():
        meta = path / "meta.pt"
        if not meta.is_file():
            raise FileNotFoundError(f"{path} is a folder but not a sharded Lightning checkpoint (no meta.pt)")
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(path, Path(tmp) / "full.pt")
            tensors = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=True)
        return {**torch.load(meta, map_location="cpu", weights_only=True), **tensors}
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint_meta(path: str | os.PathLike) -> dict:
    """A checkpoint's dict without reading its weights ({} when there is none): a file is memory-mapped, so only
    what is accessed is read; a sharded folder keeps everything but the shards in its ``meta.pt``."""
    path = Path(path)
    if path.is_dir():
        path = path / "meta.pt"
    if not path.is_file():
        return {}
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a legacy (non-zip) file cannot be mapped
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt if isinstance(ckpt, dict) else {}


def read_hyper_parameters(path: str | os.PathLike) -> tuple[dict, dict]:
    """(module, datamodule) hyper-parameters of a checkpoint without reading its weights; ({}, {}) when it has none."""
    ckpt = read_checkpoint_meta(path)
    return dict(ckpt.get("hyper_parameters") or {}), dict(ckpt.get("datamodule_hyper_parameters") or {})


def checkpoint_loss(hparams: dict) -> type[FinetuneLoss]:
    """The stage-2 loss class a FinetuneModule's hyper-parameters name (``loss.class_path``)."""
    spec = hparams.get("loss")
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError("Lightning checkpoint has no 'loss' hyper-parameter: is it a FinetuneModule checkpoint?")
    cls = loss_class(spec)
    if not (isinstance(cls, type) and issubclass(cls, FinetuneLoss)):
        raise ValueError(f"the checkpoint's loss {spec['class_path']} is not a stage-2 loss (a FinetuneLoss)")
    return cls


def default_sampler(path: str | os.PathLike, parameterization: str | None = None) -> str:
    """The sampler a checkpoint needs when none is named, read without its weights: its loss's (a FinetuneModule
    checkpoint), else that of the loss training its output form (a network file's, or ``parameterization``)."""
    ckpt = read_checkpoint_meta(path)
    if parameterization is None and "pytorch-lightning_version" in ckpt:
        return checkpoint_loss(dict(ckpt.get("hyper_parameters") or {})).sampler
    if parameterization is None and ckpt.get("epg_network_file"):
        parameterization = ckpt.get("parameterization")
    return sampler_for(parameterization or "x0")


def stage1_config(path: str | os.PathLike, preset: str | None = None) -> EPGConfig | None:
    """The architecture of a stage-1 file without reading its weights: a PretrainModule checkpoint's ``preset`` and
    ``network`` hyper-parameters, else (an official RCM file) ``preset``; None when neither says."""
    hp = read_hyper_parameters(path)[0]
    if "preset" in hp:
        return get_config(hp["preset"], **(hp.get("network") or {}))
    return get_config(preset) if preset else None


def read_global_step(path: str | os.PathLike) -> int | None:
    """The training step a Lightning checkpoint was saved at; None for other files (network or official ones)."""
    step = read_checkpoint_meta(path).get("global_step")
    return None if step is None else int(step)


def load_denoiser(
    path: str | os.PathLike, ema: int | None = 0, preset: str | None = None, parameterization: str | None = None
) -> LoadedModel:
    """A :class:`Denoiser` in eval mode from a network file, a FinetuneModule checkpoint or an official file.

    ``ema`` picks the EMA copy by index (None: the online weights); ``preset`` is needed for official files.
    """
    ckpt = read_checkpoint(path)
    if isinstance(ckpt, dict) and ckpt.get("epg_network_file"):
        network = EPGNetwork(EPGConfig(**ckpt["config"]))
        load_into(network, ckpt["state_dict"])
        param = parameterization or ckpt["parameterization"]
        model = LoadedModel(Denoiser(network, param), ckpt.get("normalization", "imagenet"), "network-file", "stored")
    elif isinstance(ckpt, dict) and "pytorch-lightning_version" in ckpt:
        network, param, norm, weights = _lightning_network(ckpt, ema)
        model = LoadedModel(Denoiser(network, parameterization or param), norm, "lightning", weights)
    else:
        if preset is None:
            raise ValueError(f"{path} looks like an official checkpoint: pass its preset (e.g. --preset EPG-XL/16)")
        network = load_official_network(ckpt, preset)
        model = LoadedModel(Denoiser(network, parameterization or "x0"), "imagenet", "official", "stored")
    model.denoiser.eval()
    return model


def load_stage1_representation(path: str | os.PathLike, preset: str | None = None, **overrides):
    """The stage-1 online encoder + projector (method.md §2.3, §3.9) from a PretrainModule checkpoint or an RCM file.

    A Lightning checkpoint of :class:`epg.lightning.pretrain.PretrainModule` keeps the online network under
    ``online.`` and its architecture in the ``preset``/``network`` hyper-parameters. An official RCM file needs
    ``preset`` (e.g. ``RCM-B/16``).
    """
    from epg.nn.network import build_representation
    from epg.nn.official import load_official_representation

    if not os.path.exists(path):
        raise FileNotFoundError(f"stage-1 checkpoint {path} does not exist")
    ckpt = read_checkpoint(path)
    if isinstance(ckpt, dict) and "pytorch-lightning_version" in ckpt:
        hp = ckpt.get("hyper_parameters", {})
        if "preset" not in hp:
            raise ValueError(f"{path} has no 'preset' hyper-parameter: is it a PretrainModule checkpoint?")
        network = build_representation(hp["preset"], **{**(hp.get("network") or {}), **overrides})
        state = {k[len("online.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("online.")}
        load_into(network, state)
        return network
    if preset is None:
        raise ValueError(f"{path} looks like an official RCM checkpoint: pass its preset (e.g. RCM-B/16)")
    return load_official_representation(ckpt, preset, **overrides)

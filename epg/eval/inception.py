"""The Inception feature extractor of `epg fid`: torch-fidelity's TF-compatible Inception-v3 (method.md §8).

:class:`InceptionFeatures` gives pool_3 (FID, KID, precision/recall), ADM's sFID layer and, with torch-fidelity's
original weights, the logits (IS); :func:`extract_features` runs it over an image source of :mod:`epg.eval.readers`.
On GPUs the convolutions run in full fp32 (:func:`ieee_convolutions`, no TF32). See :mod:`epg.eval.metrics` for how
this relates to ADM's TensorFlow evaluator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from epg.data.adm_crop import adm_center_crop
from epg.eval.errors import EvalInputError, LogitsUnavailableError, logits_message
from epg.eval.inception_weights import ensure_inception_weights, load_extractor
from epg.eval.readers import image_batches
from epg.io import pick_device

SFID_CHANNELS = 7
POOL_DIM = 2048


@contextlib.contextmanager
def ieee_convolutions(device: torch.device) -> Iterator[None]:
    """Full-fp32 cuDNN convolutions (no TF32) inside the block, restored afterwards."""
    if device.type != "cuda":
        yield
        return
    conv = torch.backends.cudnn.conv
    previous = conv.fp32_precision
    conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision = previous


@dataclass
class Features:
    """Inception features of one image set: pool_3 (N, 2048), sFID spatial (N, 2023), optional logits (N, 1008)."""

    pool: np.ndarray
    spatial: np.ndarray
    logits: np.ndarray | None
    resolution: tuple[int, int]

    def __len__(self) -> int:
        return len(self.pool)


class InceptionFeatures:
    """torch-fidelity's TF-compatible Inception-v3 giving pool_3, mixed_6/conv[:7] and (when it has them) logits."""

    def __init__(
        self, device: str | torch.device | None = None, weights: str | Path | None = None, require_logits: bool = False
    ):
        self.weights = Path(weights) if weights is not None else ensure_inception_weights()
        self.device = pick_device(device)
        self.model = load_extractor(self.weights, ["2048", "logits_unbiased"])
        self.has_logits = bool(self.model.fc.weight.abs().sum() > 0)
        if require_logits and not self.has_logits:
            raise LogitsUnavailableError(logits_message(self.weights))
        self.model.to(self.device)
        self._spatial: torch.Tensor | None = None
        # ADM's sFID layer "mixed_6/conv" is torch-fidelity's Mixed_6d.branch1x1 (BasicConv2d, ReLU included).
        self.model.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        # NCHW -> NHWC before flattening, the order of TF's reshape in ADM's evaluator.
        self._spatial = output[:, :SFID_CHANNELS].permute(0, 2, 3, 1).flatten(1).float()

    @torch.no_grad()
    def __call__(self, images: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        """Features of uint8 images (B, H, W, 3): {"pool", "spatial"[, "logits" if has_logits]}, float32 arrays."""
        x = torch.as_tensor(images).to(self.device).permute(0, 3, 1, 2).contiguous()
        with ieee_convolutions(self.device):
            outputs = self.model(x)
        result = {"pool": outputs[0], "spatial": self._spatial}
        if self.has_logits:
            result["logits"] = outputs[1]
        return {name: value.cpu().numpy() for name, value in result.items()}


def extract_features(
    source: str | Path | np.ndarray,
    inception: InceptionFeatures,
    batch_size: int = 100,
    resolution: tuple[int, int] | None = None,
    progress: bool = False,
    crop_to: int | None = None,
) -> Features:
    """Inception features of an image set; `resolution` (H, W), when given, must match the images.

    ``crop_to`` ADM-center-crops images larger than that size to it first (method.md §7), as the DataModule does
    when it trains at a lower resolution than the shards hold.
    """
    name = "the image array" if isinstance(source, np.ndarray) else str(source)
    parts: dict[str, list[np.ndarray]] = {"pool": [], "spatial": [], "logits": []}
    found: tuple[int, int] | None = None
    bar = None
    try:
        for images in image_batches(source, batch_size):
            if crop_to is not None and min(images.shape[1:3]) > crop_to:
                from PIL import Image

                images = np.stack([np.asarray(adm_center_crop(Image.fromarray(im), crop_to)) for im in images])
            shape = (int(images.shape[1]), int(images.shape[2]))
            if resolution is not None and shape != tuple(resolution):
                raise EvalInputError(
                    f"the reference is at {resolution[0]}x{resolution[1]} but the images in {name} are "
                    f"{shape[0]}x{shape[1]}; make a reference at the sample resolution (`epg fid ref`)"
                )
            if found is not None and shape != found:
                raise EvalInputError(f"{name} mixes resolutions {found} and {shape}; use one resolution per set")
            found = shape
            if progress and bar is None:  # made once the first batch is read, so input errors stay one line
                from tqdm import tqdm

                bar = tqdm(desc=f"Inception features of {name}", unit="img")
            for kind, value in inception(images).items():
                parts[kind].append(value)
            if bar is not None:
                bar.update(len(images))
    finally:
        if bar is not None:
            bar.close()
    if found is None:
        raise EvalInputError(f"no images in {name}")
    logits = np.concatenate(parts["logits"]) if parts["logits"] else None
    return Features(np.concatenate(parts["pool"]), np.concatenate(parts["spatial"]), logits, found)


def pool_features(images: torch.Tensor | np.ndarray, inception: InceptionFeatures, batch_size: int = 100) -> np.ndarray:
    """Inception pool_3 features (N, 2048) of uint8 images (N, H, W, 3) held in memory."""
    parts = [np.zeros((0, POOL_DIM), np.float32)]
    for start in range(0, len(images), batch_size):
        parts.append(inception(images[start : start + batch_size])["pool"])
    return np.concatenate(parts)

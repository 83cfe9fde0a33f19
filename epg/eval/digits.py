"""A small digit classifier for the MNIST demo: is a sample a digit of the requested class?

Trained on the demo's train split (a few seconds on CPU), it scores class-conditional samples by the fraction
classified as the label they were generated for. A demo/eval utility, not part of the method.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from epg.data.shards import expand_shards
from epg.io import save_torch


def read_shards(spec: str) -> tuple[np.ndarray, np.ndarray]:
    """All images (uint8 NHWC) and labels of local shards, in shard order."""
    images, labels = [], []
    for url in expand_shards(spec):
        with tarfile.open(url) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            for name in sorted(members):
                stem, ext = os.path.splitext(name)
                if ext not in (".png", ".jpg"):
                    continue
                data = tar.extractfile(members[name]).read()
                images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
                labels.append(int(tar.extractfile(members[stem + ".cls"]).read().decode()))
    if not images:
        raise ValueError(f"no images in shards {spec!r}")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


class DigitClassifier(nn.Module):
    """Two conv blocks and an MLP on uint8 RGB digits (converted to grey in [0, 1], pooled to 16 px)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.AdaptiveAvgPool2d(16),  # digits are legible at 16 px; 4× cheaper to train
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 16, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """Logits for (B, H, W, 3) uint8 images."""
        x = images_uint8.float().mean(-1, keepdim=True).permute(0, 3, 1, 2) / 255.0
        return self.head(self.features(x))


def train_classifier(
    images: np.ndarray, labels: np.ndarray, epochs: int = 6, batch_size: int = 64, seed: int = 0
) -> DigitClassifier:
    """Fit the classifier with Adam and light shift augmentation."""
    torch.manual_seed(seed)
    model = DigitClassifier(int(labels.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x_all), generator=g)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            x = torch.roll(x_all[idx], shifts=(dy, dx), dims=(1, 2))
            loss = nn.functional.cross_entropy(model(x), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def class_accuracy(model: DigitClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images classified as their label."""
    pred = torch.cat([model(torch.from_numpy(images[i : i + 256])).argmax(1) for i in range(0, len(images), 256)])
    return float((pred.numpy() == labels).mean())


def load_or_train(train_shards: str, cache: str | os.PathLike) -> DigitClassifier:
    """The classifier cached at ``cache``, trained on ``train_shards`` first if the file is missing."""
    cache = Path(cache)
    if cache.is_file():
        model = DigitClassifier()
        model.load_state_dict(torch.load(cache, map_location="cpu", weights_only=True))
        return model.eval()
    images, labels = read_shards(train_shards)
    model = train_classifier(images, labels)
    save_torch(model.state_dict(), cache)
    return model

"""Per-sample transforms of method.md §7: PIL image in, normalized float32 (3, H, W) tensors out."""

from __future__ import annotations

import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from epg.data.adm_crop import adm_center_crop
from epg.method.normalization import normalize

BLUR_RADIUS = (0.1, 2.0)


def _fit(image: Image.Image, image_size: int) -> Image.Image:
    """The stored image as RGB, ADM-center-cropped (method.md §7) only when it is not image_size²."""
    image = image.convert("RGB")
    return image if image.size == (image_size, image_size) else adm_center_crop(image, image_size)


def _to_model_space(image: Image.Image | torch.Tensor, normalization: str) -> torch.Tensor:
    """uint8 PIL image or (3, H, W) uint8 tensor -> normalized float32 (method.md §1.1)."""
    pixels = F.pil_to_tensor(image) if isinstance(image, Image.Image) else image
    return normalize(pixels.float().div_(255), normalization)


def _maybe_flip(x: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    return x.flip(-1) if torch.rand(()) < p else x


class RandomGaussianBlur:
    """PIL Gaussian blur with radius ~ U[0.1, 2], applied with probability p (the BYOL blur of method.md §7)."""

    def __init__(self, p: float, radius: tuple[float, float] = BLUR_RADIUS) -> None:
        self.p, self.radius = p, radius

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.p <= 0 or torch.rand(()) >= self.p:
            return image
        radius = float(torch.empty(()).uniform_(*self.radius))
        return image.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, radius={self.radius})"


def byol_view(image_size: int, blur_p: float, solarize_p: float, hflip: bool = True) -> v2.Compose:
    """One asymmetric BYOL view of method.md §7 on a PIL image, ending in a uint8 (3, H, W) tensor."""
    steps = [
        v2.RandomResizedCrop(
            image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation=v2.InterpolationMode.BILINEAR
        ),
        v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        RandomGaussianBlur(p=blur_p),
    ]
    if solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))
    steps += [v2.RandomHorizontalFlip(p=0.5 if hflip else 0.0), v2.PILToTensor()]
    return v2.Compose(steps)


class EvalTransform:
    """Validation: the stored image, normalized; no flip (method.md §7)."""

    def __init__(self, image_size: int = 256, normalization: str = "imagenet") -> None:
        self.image_size, self.normalization = image_size, normalization

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return _to_model_space(_fit(image, self.image_size), self.normalization)


class FinetuneTransform(EvalTransform):
    """Stage 2: random horizontal flip (p 0.5), to tensor, normalize; nothing else (method.md §7).

    ``hflip=False`` turns the flip off, for data whose mirror image is another class (the demo digits).
    """

    def __init__(self, image_size: int = 256, normalization: str = "imagenet", hflip: bool = True) -> None:
        super().__init__(image_size, normalization)
        self.hflip = hflip

    def __call__(self, image: Image.Image) -> torch.Tensor:
        x = super().__call__(image)
        return _maybe_flip(x) if self.hflip else x


class PretrainViews:
    """Stage 1 (method.md §3.1, §7): x0 = stored image with a random flip, plus the two asymmetric BYOL views.

    ``hflip=False`` turns every flip off (the demo digits).
    """

    def __init__(self, image_size: int = 256, normalization: str = "imagenet", hflip: bool = True) -> None:
        self.image_size, self.normalization, self.hflip = image_size, normalization, hflip
        self.view1 = byol_view(image_size, blur_p=1.0, solarize_p=0.0, hflip=hflip)
        self.view2 = byol_view(image_size, blur_p=0.1, solarize_p=0.2, hflip=hflip)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = image.convert("RGB")  # the views are cut from the image as stored (method.md §7)
        x0 = _to_model_space(_fit(image, self.image_size), self.normalization)
        x0 = _maybe_flip(x0) if self.hflip else x0
        v1 = _to_model_space(self.view1(image), self.normalization)
        v2_ = _to_model_space(self.view2(image), self.normalization)
        return x0, v1, v2_

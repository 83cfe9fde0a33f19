"""The ADM center crop of method.md §7 and the lossless/lossy encoders used for shards."""

from __future__ import annotations

import io

from PIL import Image

FORMATS = ("png", "jpg")
JPEG_QUALITY = 95
# Official PNGs use zlib level 0 (method.md §7): ~1.6x larger than level 1 but twice as fast to decode.
PNG_COMPRESS_LEVEL = 0


def adm_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Square `resolution` crop of `image` as ADM does it (method.md §7 steps 1-3)."""
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    # 1. While the short side is >= 2·res, halve with a BOX filter (cheap, alias-free anti-aliasing).
    while min(image.size) >= 2 * resolution:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    # 2. Bicubic resize so that the short side equals res, rounding the long side.
    scale = resolution / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    # 3. Center crop, with the offset rounded down.
    left = (image.width - resolution) // 2
    top = (image.height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def encode_image(image: Image.Image, fmt: str, png_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """Encode an RGB image as PNG (lossless, zlib level `png_level`) or JPEG quality 95."""
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=png_level)
    elif fmt == "jpg":
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        raise ValueError(f"unknown image format {fmt!r}: choose one of {FORMATS}")
    return buffer.getvalue()


def load_rgb(path: str) -> Image.Image:
    """Open an image file fully decoded as RGB (raises on truncated or unreadable files)."""
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")

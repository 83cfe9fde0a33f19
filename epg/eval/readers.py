"""Image sources as uint8 arrays (N, H, W, 3) in batches: arrays, PNG/JPEG folders, ADM .npz files, WebDataset shards.

Nothing here knows about Inception or metrics; :mod:`epg.eval.inception` reads its images through
:func:`image_batches`.
"""

from __future__ import annotations

import glob
import zipfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from epg.eval.errors import EvalInputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _folder_batches(folder: Path, batch_size: int) -> Iterator[tuple[list[str], np.ndarray]]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise EvalInputError(f"no {'/'.join(IMAGE_EXTENSIONS)} images in folder {folder}")
    with ThreadPoolExecutor(max_workers=8) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            yield [str(p) for p in chunk], _stack([str(p) for p in chunk], list(pool.map(_read_image, chunk)))


def _npz_batches(path: Path, batch_size: int) -> Iterator[tuple[list[str], np.ndarray]]:
    """Stream `arr_0` of an ADM-style .npz without loading it whole."""
    with zipfile.ZipFile(path) as archive:
        if "arr_0.npy" not in archive.namelist():
            raise EvalInputError(f"{path} has no arr_0 (expected ADM-style uint8 images, N x H x W x 3)")
        with archive.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(f)
            if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran_order:
                raise EvalInputError(f"{path}: arr_0 is {dtype} {shape}; expected uint8 images N x H x W x 3")
            per_image = int(np.prod(shape[1:]))
            for start in range(0, shape[0], batch_size):
                count = min(batch_size, shape[0] - start)
                images = np.frombuffer(bytearray(f.read(count * per_image)), np.uint8).reshape(count, *shape[1:])
                yield [f"{path}[{start + i}]" for i in range(count)], images


def _shard_batches(urls: list[str], batch_size: int) -> Iterator[tuple[list[str], np.ndarray]]:
    import webdataset as wds

    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    names, images = [], []
    for sample in dataset.decode("rgb8"):
        key = next((k for k in ("png", "jpg", "jpeg", "webp") if k in sample), None)
        if key is None:
            raise EvalInputError(f"shard sample {sample['__key__']} in {sample['__url__']} has no png/jpg image")
        names.append(f"{sample['__url__']}:{sample['__key__']}")
        images.append(sample[key])
        if len(images) == batch_size:
            yield names, _stack(names, images)
            names, images = [], []
    if images:
        yield names, _stack(names, images)


def _stack(names: list[str], images: list[np.ndarray]) -> np.ndarray:
    for name, image in zip(names, images, strict=True):
        if image.shape != images[0].shape:
            raise EvalInputError(
                f"{name} is {image.shape[0]}x{image.shape[1]} but {names[0]} is {images[0].shape[0]}x"
                f"{images[0].shape[1]}; all images of a set must share one resolution"
            )
    return np.stack(images)


def _shard_urls(source: str) -> list[str] | None:
    """Tar shards named by `source` (a .tar, a folder holding .tar files, a glob or a brace pattern); else None."""
    if "{" in source:
        import braceexpand

        urls = list(braceexpand.braceexpand(source))
    elif any(c in source for c in "*?["):
        urls = sorted(glob.glob(source))
    elif source.endswith(".tar"):
        urls = [source]
    elif Path(source).is_dir():
        urls = sorted(str(p) for p in Path(source).glob("*.tar"))
        return urls or None
    else:
        return None
    missing = [u for u in urls if not Path(u).is_file()]
    if not urls or missing:
        raise EvalInputError(f"no WebDataset shard {missing[0] if missing else source}: the file does not exist")
    return urls


def image_batches(source: str | Path | np.ndarray, batch_size: int = 100) -> Iterator[np.ndarray]:
    """uint8 (B, H, W, 3) batches from an array, a folder of PNG/JPEG, an ADM .npz (`arr_0`) or WebDataset shards."""
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 4 or source.shape[-1] != 3:
            raise EvalInputError(f"images are {source.dtype} {source.shape}; expected uint8 N x H x W x 3")
        for start in range(0, len(source), batch_size):
            yield source[start : start + batch_size]
        return
    text = str(source)
    urls = _shard_urls(text)
    if urls is not None:
        batches: Iterable = _shard_batches(urls, batch_size)
    elif not Path(text).exists():
        raise EvalInputError(f"{text} does not exist (expected an image folder, an ADM .npz or WebDataset shards)")
    elif Path(text).is_dir():
        batches = _folder_batches(Path(text), batch_size)
    elif text.endswith(".npz"):
        batches = _npz_batches(Path(text), batch_size)
    else:
        raise EvalInputError(f"{text} is neither a folder, an .npz nor a .tar shard")
    for _, images in batches:
        yield images

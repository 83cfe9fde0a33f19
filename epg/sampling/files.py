"""Sample files: PNGs written atomically and the ADM-style ``<folder>.npz`` (method.md §8)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from epg.io import atomic_path


def png_name(index: int, num: int) -> str:
    """File name of image ``index`` in a folder of ``num`` images: zero-padded to at least six digits."""
    return f"{index:0{max(6, len(str(num - 1)))}d}.png"


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Save one uint8 HWC image atomically (:func:`epg.io.atomic_path`), so a file that exists is complete."""
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def write_adm_npz(folder: str | os.PathLike, num: int, path: str | os.PathLike, labels: np.ndarray | None) -> None:
    """Stack ``folder``'s images 0…num−1 into ``path`` as ``arr_0`` (uint8 NHWC) plus ``arr_1`` labels, streaming.

    The array is written straight into the (uncompressed) zip one image at a time, so 50K images at 512 px
    never sit in memory; ``np.load`` and the ADM evaluator read it like ``np.savez`` output.
    """
    folder, path = Path(folder), Path(path)
    first = np.asarray(Image.open(folder / png_name(0, num)).convert("RGB"))
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False}
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, {**header, "shape": (num, *first.shape)})
                for i in range(num):
                    image = np.asarray(Image.open(folder / png_name(i, num)).convert("RGB"))
                    if image.shape != first.shape:
                        raise ValueError(
                            f"{folder / png_name(i, num)} is {image.shape}, image 0 is {first.shape}: "
                            "the folder mixes runs; sample into a fresh --out folder"
                        )
                    f.write(np.ascontiguousarray(image).tobytes())
            if labels is not None:
                with zf.open("arr_1.npy", "w") as f:
                    np.lib.format.write_array(f, np.asarray(labels, dtype=np.int64))

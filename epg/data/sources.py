"""Find (image, class) pairs in ImageNet train/val layouts and ImageFolder trees, and class names."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SYNSET_MAPPING = "LOC_synset_mapping.txt"
VAL_SOLUTION = "LOC_val_solution.csv"


class SourceError(ValueError):
    """A source folder or labels file that cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class Item:
    """One image to convert: its path, its sample key and its class index."""

    path: str
    key: str
    label: int


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _images_below(folder: Path) -> list[str]:
    """Image files under `folder` (recursively), as paths relative to it, sorted."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        rel_root = os.path.relpath(root, folder)
        found += [os.path.normpath(os.path.join(rel_root, f)) for f in files if _is_image(f)]
    return sorted(found)


def _sample_keys(rel_paths: list[str]) -> list[str]:
    """Keys that keep the file name (method.md §7) when stems are unique, else the relative path; no dots."""
    stems = [Path(p).stem for p in rel_paths]
    if len(set(stems)) < len(stems):
        stems = [str(Path(p).with_suffix("")).replace(os.sep, "_") for p in rel_paths]
    return [s.replace(".", "_") for s in stems]


def scan_class_folders(src: Path, classes: list[str] | None = None) -> tuple[list[Item], list[str]]:
    """ImageNet train layout / ImageFolder: one sub-folder per class (sorted names -> 0, 1, ... unless `classes`)."""
    folders = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    per_class = {c: _images_below(src / c) for c in folders}
    folders = [c for c in folders if per_class[c]]
    if not folders:
        raise SourceError(
            f"no class sub-folders with images in {src}; pass an ImageNet train folder (one folder per synset), "
            "an ImageFolder tree, or a flat folder with --labels FILE"
        )
    classes = classes or folders
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in folders if c not in index]
    if unknown:
        raise SourceError(f"folder {src / unknown[0]} is not a class of the given class list; check --classes")
    rel_paths = [os.path.join(c, p) for c in folders for p in per_class[c]]
    labels = [index[c] for c in folders for _ in per_class[c]]
    keys = _sample_keys(rel_paths)
    items = [Item(str(src / p), k, y) for p, k, y in zip(rel_paths, keys, labels, strict=True)]
    return items, classes


def read_labels_file(path: Path) -> dict[str, str]:
    """File name (or stem) -> class token from LOC_val_solution.csv or a `filename class` text file."""
    if not path.is_file():
        raise SourceError(f"labels file {path} does not exist; pass LOC_val_solution.csv or a `filename class` file")
    labels: dict[str, str] = {}
    with path.open(newline="") as f:
        if path.suffix.lower() == ".csv":
            reader = csv.reader(f)
            header = next(reader, [])
            if [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
                raise SourceError(f"{path}: expected the header `ImageId,PredictionString` of LOC_val_solution.csv")
            for row in reader:
                if len(row) >= 2 and row[1].split():
                    labels[row[0].strip()] = row[1].split()[0]
        else:
            for n, line in enumerate(f, start=1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2:
                    raise SourceError(f"{path}:{n}: expected `filename class`, got {line.strip()!r}")
                labels[parts[0]] = parts[1]
    if not labels:
        raise SourceError(f"labels file {path} holds no labels")
    return labels


def class_order(tokens: set[str]) -> list[str]:
    """Classes sorted as labels 0, 1, ...: numerically when all are integers, else by name (synsets)."""
    if all(t.isdigit() for t in tokens):
        return [str(i) for i in range(max(int(t) for t in tokens) + 1)]
    return sorted(tokens)


def scan_flat_with_labels(
    src: Path, labels_file: Path, classes: list[str] | None = None
) -> tuple[list[Item], list[str]]:
    """ImageNet val layout: images in one folder, classes from a labels file (matched by file name or stem)."""
    by_name = read_labels_file(labels_file)
    classes = classes or class_order(set(by_name.values()))
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(by_name.values()) - set(index))
    if unknown:
        raise SourceError(f"{labels_file} names classes missing from the class list, e.g. {unknown[0]!r}")
    rel_paths, labels = [], []
    for rel in _images_below(src):
        token = by_name.get(rel) or by_name.get(Path(rel).name) or by_name.get(Path(rel).stem)
        if token is not None:
            rel_paths.append(rel)
            labels.append(index[token])
    if not rel_paths:
        raise SourceError(f"no image in {src} is named in {labels_file}; check that they belong together")
    keys = _sample_keys(rel_paths)
    return [Item(str(src / p), k, y) for p, k, y in zip(rel_paths, keys, labels, strict=True)], classes


def find_near(src: Path, name: str) -> Path | None:
    """The file `name` in `src` or in one of the 3 folders above it (the Kaggle ImageNet layout), if any."""
    for folder in [src, *list(src.resolve().parents)[:3]]:
        if (folder / name).is_file():
            return folder / name
    return None


def has_flat_images(src: Path) -> bool:
    """Whether `src` holds images directly (a val-style flat folder)."""
    return any(p.is_file() and _is_image(p.name) for p in src.iterdir())


def find_class_names(src: Path, names_file: Path | None) -> dict[str, str]:
    """Class names from `names_file` or a LOC_synset_mapping.txt found in `src` or up to 3 folders above it."""
    names_file = names_file or find_near(src, SYNSET_MAPPING)
    if names_file is None:
        return {}
    if not names_file.is_file():
        raise SourceError(f"class names file {names_file} does not exist; pass a `synset name...` file")
    names = {}
    for line in names_file.read_text().splitlines():
        parts = line.strip().split(maxsplit=1)
        if len(parts) == 2:
            names[parts[0]] = parts[1]
    return names

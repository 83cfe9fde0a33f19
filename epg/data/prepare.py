"""An image tree -> WebDataset shards of ADM center crops (method.md §7): the library of `epg prepare`.

:func:`prepare` resumes and repairs: a shard is kept only if it matches its record (sample count, size, sha256; kept
in dataset.json), the rest are (re)written. The command line is :mod:`epg.commands.prepare`; the embedded demo digits
are :mod:`epg.data.demo` and the check of finished shards :mod:`epg.data.verify`.
"""

from __future__ import annotations

import hashlib
import json
import random
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from epg.data.adm_crop import PNG_COMPRESS_LEVEL, adm_center_crop, encode_image, load_rgb
from epg.data.samples import BrokenShard, tar_samples
from epg.data.shards import (
    CLASSES_JSON,
    map_shards,
    record_problem,
    shard_name,
    shard_record,
    write_metadata,
    write_shard,
)
from epg.data.sources import (
    VAL_SOLUTION,
    Item,
    SourceError,
    find_class_names,
    find_near,
    has_flat_images,
    scan_class_folders,
    scan_flat_with_labels,
)
from epg.io import write_json

STATE_DIR = ".prepare"


def read_class_list(path: Path) -> list[str]:
    """Classes in label order from a classes.json written by `epg prepare`, or one class per line of a text file."""
    if not path.is_file():
        raise SourceError(f"class list {path} does not exist; pass the {CLASSES_JSON} of the train shards")
    if path.suffix == ".json":
        index = json.loads(path.read_text()).get("classes")
        if not isinstance(index, dict):
            raise SourceError(f"{path} has no `classes` mapping; pass a {CLASSES_JSON} written by `epg prepare`")
        return sorted(index, key=index.__getitem__)
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class Encoding:
    """How each image is stored: ADM crop size, file format and PNG zlib level."""

    resolution: int
    fmt: str
    png_level: int = PNG_COMPRESS_LEVEL


def _convert(items: list[Item], enc: Encoding, skipped: list[tuple[str, str]]) -> Iterator[tuple]:
    """(key, ext, bytes, label) per readable item; unreadable ones are appended to `skipped` with the reason."""
    for item in items:
        try:
            data = encode_image(adm_center_crop(load_rgb(item.path), enc.resolution), enc.fmt, enc.png_level)
        except Exception as exc:  # any undecodable file is skipped and reported, never fatal
            skipped.append((item.path, f"{type(exc).__name__}: {exc}"))
            continue
        yield item.key, enc.fmt, data, item.label


def _write_one(task: tuple[int, Path, Path, list[Item], Encoding]) -> tuple[int, dict]:
    """Write one shard, then its report: its record, labels and skipped files (the report marks it finished)."""
    index, shard_path, report_path, items, enc = task
    skipped: list[tuple[str, str]] = []
    record = write_shard(shard_path, _convert(items, enc, skipped))
    bad = {path for path, _ in skipped}
    report = {
        "written": record["samples"],
        "bytes": record["bytes"],
        "sha256": record["sha256"],
        "labels": [it.label for it in items if it.path not in bad],
        "skipped": skipped,
    }
    write_json(report_path, report)
    return index, report


def _record(report: dict) -> dict:
    """The shard record of a shard report."""
    return {"samples": report["written"], "bytes": report["bytes"], "sha256": report["sha256"]}


def _check_finished(task: tuple[int, Path, Path]) -> tuple[int, dict | None, str | None]:
    """(index, report, None) if the shard matches its report's record (size, sha256), else (index, None, problem).

    A report of an earlier version (no record) is adopted, and its record added, when the shard reads to its end
    with the reported sample count.
    """
    index, shard_path, report_path = task
    report = json.loads(report_path.read_text())
    if "sha256" in report:
        problem = record_problem(shard_path, _record(report))
        return index, None if problem else report, problem
    count = 0
    try:
        with open(shard_path, "rb") as stream:
            count = sum(1 for _ in tar_samples(stream, str(shard_path)))
    except BrokenShard as exc:
        return index, None, f"tar stream {exc}"
    if count != report["written"]:
        return index, None, f"holds {count} of its {report['written']} reported samples"
    report.update({k: v for k, v in shard_record(shard_path, count).items() if k != "samples"})
    write_json(report_path, report)
    return index, report, None


def scan(
    src: Path, labels: Path | None = None, classes_file: Path | None = None, names_file: Path | None = None
) -> tuple[list[Item], list[str], dict[str, str]]:
    """Items (sorted by path), classes in label order, and class names of a source folder."""
    if not src.is_dir():
        raise SourceError(f"source folder {src} does not exist; pass the folder that holds the images")
    classes = read_class_list(classes_file) if classes_file else None
    if labels is None and has_flat_images(src):
        labels = find_near(src, VAL_SOLUTION)
    if labels is not None:
        items, classes = scan_flat_with_labels(src, labels, classes)
    else:
        items, classes = scan_class_folders(src, classes)
    return sorted(items, key=lambda it: it.path), classes, find_class_names(src, names_file)


def _start_output(out: Path, split: str, state: dict) -> Path:
    """Create `out`, refuse shards of other settings in it, drop temporaries of killed runs; returns the state dir."""
    if out.exists() and not out.is_dir():
        raise SourceError(f"output {out} is a file; pass a folder (it is created when missing)")
    state_dir = out / STATE_DIR
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SourceError(f"cannot create output folder {out} ({exc.strerror}); pass a writable folder") from exc
    state_path = state_dir / f"{split}-state.json"
    if state_path.is_file():
        old = json.loads(state_path.read_text())
        diff = [k for k in state if old.get(k) != state[k]]
        if diff:
            raise SourceError(
                f"{out} holds shards made with other settings or files ({', '.join(diff)} differ); "
                "use a new output folder or delete it"
            )
    else:
        write_json(state_path, state)
    for stale in out.glob(f".{split}-*.tar.tmp-*"):  # left by a killed run; final names are never partial
        stale.unlink()
    return state_dir


def _run(tasks: list[tuple], workers: int, desc: str) -> Iterator[tuple[int, dict]]:
    """Write the shards of `tasks` in `workers` processes, with a progress bar over images."""
    with tqdm(total=sum(len(t[3]) for t in tasks), unit="img", desc=desc, dynamic_ncols=True) as bar:
        for i, report in map_shards(_write_one, tasks, workers):
            bar.update(report["written"] + len(report["skipped"]))
            yield i, report


def prepare(
    src: Path,
    out: Path,
    resolution: int = 256,
    split: str = "train",
    labels: Path | None = None,
    classes_file: Path | None = None,
    names_file: Path | None = None,
    fmt: str = "png",
    png_level: int = PNG_COMPRESS_LEVEL,
    shard_size: int = 1000,
    workers: int = 1,
    seed: int = 0,
) -> dict:
    """Write the shards, classes.json and dataset.json of `src` into `out`, resuming; returns the dataset info."""
    items, classes, names = scan(src, labels, classes_file, names_file)
    random.Random(seed).shuffle(items)  # shard i's content is fixed by the seed, so a rerun can skip finished shards
    chunks = [items[i : i + shard_size] for i in range(0, len(items), shard_size)]
    digest = hashlib.sha256("\n".join(f"{it.path}\t{it.label}" for it in items).encode()).hexdigest()
    state = {
        "split": split,
        "resolution": resolution,
        "format": fmt,
        "shard_size": shard_size,
        "seed": seed,
        "num_items": len(items),
        "items_sha256": digest,
    }
    state_dir = _start_output(out, split, state)

    shards = [shard_name(split, i) for i in range(len(chunks))]
    done = [(i, out / name, state_dir / f"{name}.json") for i, name in enumerate(shards)]
    done = [task for task in done if task[1].is_file() and task[2].is_file()]
    reports: dict[int, dict] = {}
    checks = map_shards(_check_finished, done, workers)
    for i, report, problem in tqdm(checks, total=len(done), unit="shard", desc=f"check finished {split} shards"):
        if report is not None:
            reports[i] = report
        else:
            print(f"{out / shards[i]}: {problem}: rewriting it", file=sys.stderr)
    tasks = [
        (i, out / shards[i], state_dir / f"{shards[i]}.json", chunk, Encoding(resolution, fmt, png_level))
        for i, chunk in enumerate(chunks)
        if i not in reports
    ]
    kept = len(reports)
    reports.update(_run(tasks, workers, desc=f"epg prepare {split}"))

    counts = [0] * len(classes)
    for report in reports.values():
        for label in report["labels"]:
            counts[label] += 1
    skipped = [path for i in range(len(chunks)) for path, _ in reports[i]["skipped"]]
    info = write_metadata(
        out,
        split,
        classes,
        names,
        shards,
        counts,
        resolution,
        fmt,
        {shards[i]: _record(report) for i, report in reports.items()},
        prepare_command=_command(src, state, png_level, labels, classes_file, names_file),
        num_skipped=len(skipped),
        skipped_files=skipped,
        source=str(src.resolve()),
        seed=seed,
        shard_size=shard_size,
    )
    for path, reason in (s for task in tasks for s in reports[task[0]]["skipped"]):
        print(f"skipped unreadable image {path} ({reason})", file=sys.stderr)
    _print_summary(info, len(tasks), kept, out)
    return info


def _command(
    src: Path, state: dict, png_level: int, labels: Path | None, classes_file: Path | None, names_file: Path | None
) -> str:
    """The `epg prepare` command of these settings, with ``{out}`` for the output folder (see repair_command)."""
    options = ["--resolution", state["resolution"], "--split", state["split"], "--format", state["format"]]
    options += ["--png-level", png_level, "--shard-size", state["shard_size"], "--seed", state["seed"]]
    for flag, path in (("--labels", labels), ("--classes", classes_file), ("--names", names_file)):
        if path is not None:
            options += [flag, Path(path).resolve()]
    return " ".join(["epg prepare", shlex.quote(str(src.resolve())), "{out}", *(shlex.quote(str(o)) for o in options)])


def _print_summary(info: dict, written: int, kept: int, out: Path) -> None:
    counts = info["class_counts"]
    print(
        f"{info['split']}: {info['num_samples']} samples in {info['num_shards']} shards at {out} "
        f"({written} shards written, {kept} already done), {info['num_skipped']} unreadable images skipped"
    )
    if len(counts) <= 20:
        print("per class: " + ", ".join(f"{c}={n}" for c, n in counts.items()))
    else:
        values = list(counts.values())
        print(f"per class: {len(values)} classes, {min(values)}-{max(values)} samples each (all in dataset.json)")

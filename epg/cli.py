"""The one `epg` command: LightningCLI subcommands (fit/validate/predict) plus the tools.

Tools are imported lazily so that `epg prepare --help` does not pay for importing Lightning.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function, one-line help)
TOOLS: dict[str, tuple[str, str, str]] = {
    "prepare": ("epg.data.prepare", "main", "turn an image tree (or the embedded demo digits) into WebDataset shards"),
    "sample": ("epg.sample", "main", "write N samples (PNG + ADM .npz) from a checkpoint"),
    "fid": ("epg.eval.cli", "main", "FID/IS/precision-recall: ref | gen | calc | weights | sweep"),
    "convert": ("epg.convert", "main", "turn an official EPG checkpoint into a file epg commands accept"),
    "bench": ("epg.bench", "main", "measure img/s, TFLOP/s and MFU; writes JSON"),
    "demo": ("epg.demo", "main", "the whole pipeline on the embedded MNIST digits"),
    "ema": ("epg.commands.ema", "main", "post-hoc EMA: reconstruct σ_rel profiles from a run's snapshots"),
}
LIGHTNING_SUBCOMMANDS = {
    "fit": "train (resumes from the run's last checkpoint)",
    "validate": "the validation metrics of a checkpoint on the val split (--ckpt_path CKPT)",
    "predict": "write samples like `epg sample` (--ckpt_path CKPT; options --sample.*)",
}
# There is no test split (ImageNet's val split is the FID reference and the only held-out data): say what to run.
NO_TEST = (
    "epg test: there is no test split; `epg validate -c CONFIG --ckpt_path CKPT` reports the val-split metrics "
    "(stage 2: val/loss of the online and val/ema_loss of the EMA weights; stage 1: val/knn_acc) and "
    "`epg predict` + `epg fid calc` score samples"
)


def _usage() -> str:
    lines = ["usage: epg <command> [options]", "", "training (LightningCLI; -c CONFIG.yaml):"]
    lines += [f"  {name:<10} {help_}" for name, help_ in LIGHTNING_SUBCOMMANDS.items()]
    lines += ["", "tools:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in TOOLS.items()]
    return "\n".join(lines)


def _run_lightning(command: str, rest: list[str]) -> int:
    """LightningCLI; a bad config value (exit status 2) or a NaN/inf loss (1) is one line on stderr, no traceback."""
    from epg.lightning.cli import run_lightning_cli
    from epg.lightning.faults import ConfigError, NonFiniteLossError

    try:
        run_lightning_cli([command, *rest])
    except ConfigError as err:
        print(f"epg {command}: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"epg {command}: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch `epg <command> ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command in TOOLS:
        module, func, _ = TOOLS[command]
        result = getattr(importlib.import_module(module), func)(rest)
        return int(result or 0)
    if command in LIGHTNING_SUBCOMMANDS:
        return _run_lightning(command, rest)
    if command == "test":
        print(NO_TEST, file=sys.stderr)
        return 2
    print(f"epg: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

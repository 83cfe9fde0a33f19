"""The one `epg` command: LightningCLI subcommands (fit/validate/predict) plus the tools.

Tools are imported lazily so that `epg prepare --help` does not pay for importing Lightning; their front ends live
in :mod:`epg.commands`.
"""

from __future__ import annotations

import importlib
import sys

# tool -> one-line help; `epg NAME ARGS` runs epg.commands.NAME.main(ARGS)
TOOLS: dict[str, str] = {
    "prepare": "turn an image tree (or the embedded demo digits) into WebDataset shards",
    "sample": "write N samples (PNG + ADM .npz) from a checkpoint",
    "fid": "FID/IS/precision-recall: ref | gen | calc | weights | sweep",
    "convert": "turn an official EPG checkpoint into a file epg commands accept",
    "bench": "measure img/s, TFLOP/s and MFU; writes JSON",
    "demo": "the whole pipeline on the embedded MNIST digits",
    "ema": "post-hoc EMA: reconstruct σ_rel profiles from a run's snapshots",
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
    lines += [f"  {name:<10} {help_}" for name, help_ in TOOLS.items()]
    return "\n".join(lines)


def _run_lightning(command: str, rest: list[str]) -> int:
    """LightningCLI; a bad config value (exit status 2) or a NaN/inf loss (1) is one line on stderr, no traceback;
    a Ctrl-C exits with status 130 (the shell's 128 + SIGINT), also where Lightning's own handler would exit 1."""
    from epg.commands.train import run_lightning_cli
    from epg.lightning.faults import ConfigError, NonFiniteLossError

    try:
        run_lightning_cli([command, *rest])
    except ConfigError as err:
        print(f"epg {command}: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"epg {command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the Trainer ran (imports, config, model set-up): nothing was written
        print(f"epg {command}: interrupted (Ctrl-C) before the Trainer started; no checkpoint written", file=sys.stderr)
        return 130
    except SystemExit as err:
        if err.code == 1 and isinstance(err.__context__, KeyboardInterrupt):
            return 130  # Lightning's exit(1) after a Ctrl-C that it handled (SigtermCheckpoint said what was kept)
        raise
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch `epg <command> ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command in TOOLS:
        result = importlib.import_module(f"epg.commands.{command}").main(rest)
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

"""The demo's configs and its two training stages, each an `epg fit` subprocess (method.md §3, §4, §5).

A stage runs with its own thread settings; a finished stage is skipped and an interrupted one resumes from its last
checkpoint. The step counts of a config can be changed: its step-valued schedule (warm-up, LR steps, ECT stages,
post-hoc EMA snapshot interval, checkpoint interval) is rescaled with them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from epg.demo.settings import DemoError, DemoSettings, load_yaml


def checkpoint_state(path: Path) -> tuple[int, dict]:
    """The Lightning global step and hyper-parameters of a checkpoint ((-1, {}) when missing or unreadable)."""
    if not path.is_file():
        return -1, {}
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a truncated file counts as missing
        return -1, {}
    return int(ckpt.get("global_step", -1)), dict(ckpt.get("hyper_parameters") or {})


def checkpoint_step(path: Path) -> int:
    """The Lightning global step stored in a checkpoint (-1 when there is none or it cannot be read)."""
    return checkpoint_state(path)[0]


def checkpoint_every(steps: int, every: int) -> int:
    """The largest checkpoint interval ≤ ``every`` that divides ``steps`` (so the last step is always saved)."""
    return max(d for d in range(1, min(every, steps) + 1) if steps % d == 0)


def run_length(cfg: dict) -> int:
    """A config's steps: its ``trainer.max_steps``, which defaults to the model's ``total_steps``."""
    return int(cfg["trainer"].get("max_steps") or cfg["model"]["init_args"]["total_steps"])


def schedule_args(cfg: dict, steps: int) -> list[str]:
    """Overrides that rescale a config's step-valued schedule (warm-up, LR steps, ECT stages) to ``steps``."""
    init, planned = cfg["model"]["init_args"], run_length(cfg)
    loss = (init.get("loss") or {}).get("init_args") or {}  # the ECT stages are the loss object's (ConsistencyLoss)
    scale = steps / planned
    args = []
    for prefix, options, keys in (("", init, ("warmup_steps",)), ("loss.init_args.", loss, ("ect_d0", "ect_d1"))):
        for key in keys:
            if key in options and steps != planned:
                args += [f"--model.init_args.{prefix}{key}", str(max(1, round(options[key] * scale)))]
    if "lr_milestones" in init and steps != planned:
        milestones = [max(1, round(m * scale)) for m in init["lr_milestones"]]
        args += ["--model.init_args.lr_milestones", json.dumps(milestones)]
    phema = init.get("phema") or {}
    if phema.get("snapshot_every") and steps != planned:  # post-hoc EMA snapshots (method.md §13): as many as planned
        every = max(1, round(phema["snapshot_every"] * scale))
        args += ["--model.init_args.phema", json.dumps({**phema, "snapshot_every": every})]
    callbacks = cfg["trainer"].get("callbacks") or []
    every = next((c["init_args"].get("every_n_train_steps") for c in callbacks if "every_n_train_steps" in str(c)), 0)
    args += ["--trainer.callbacks.init_args.every_n_train_steps", str(checkpoint_every(steps, every or steps))]
    return args


def fit_args(
    config: Path,
    run_dir: Path,
    data_dir: Path,
    steps: int,
    accelerator: str | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
) -> list[str]:
    """`epg fit` arguments that point a demo config at ``run_dir``/``data_dir`` and set its length."""
    args = ["-c", str(config), "--trainer.max_steps", str(steps), "--model.init_args.total_steps", str(steps)]
    args += schedule_args(load_yaml(config), steps)
    args += ["--trainer.default_root_dir", str(run_dir)]  # the checkpoints and TensorBoard logs go in it
    args += ["--data.train_shards", str(data_dir / "train"), "--data.val_shards", str(data_dir / "val")]
    if batch_size is not None:
        args += ["--data.global_batch_size", str(batch_size), "--data.val_batch_size", str(batch_size)]
    if num_workers is not None:
        args += ["--data.num_workers", str(num_workers)]
    if accelerator is not None:
        args += ["--trainer.accelerator", accelerator]
        if accelerator == "cpu":
            args += ["--trainer.precision", "32-true"]
    return args


def run_fit(args: list[str], threads: int, log_file: Path) -> None:
    """Run `epg fit ARGS` in a subprocess with ``threads`` intra-op threads; raise DemoError on failure."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("PYTHONWARNINGS", "ignore")
    command = [sys.executable, "-m", "epg.cli", "fit", *args]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as log:
        done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-15:])
        raise DemoError(f"`epg fit {' '.join(args)}` failed (exit {done.returncode}); log {log_file}:\n{tail}")


def run_stage(
    name: str, config: Path, run_dir: Path, data_dir: Path, steps: int, extra: list[str], settings: DemoSettings
) -> str:
    """Fit one stage unless its last checkpoint is complete; resume an interrupted run. Returns what was done."""
    last = run_dir / "checkpoints" / "last.ckpt"
    done, hparams = checkpoint_state(last)
    init = load_yaml(config)["model"]["init_args"]
    for key in ("preset", "network"):
        if done >= 0 and key in init and hparams.get(key) != init[key]:
            raise DemoError(
                f"{name}: {last} was trained with {key}={hparams.get(key)!r}, but {config} has {init[key]!r}; "
                "rerun with --fresh (or another --out) to train from the start"
            )
    if done >= steps:
        return f"skipped ({last} is complete at step {done})"
    overrides = (settings.accelerator, settings.batch_size, settings.num_workers)
    args = fit_args(config, run_dir, data_dir, steps, *overrides) + extra
    if done >= 0:
        args += ["--ckpt_path", str(last)]
    run_fit(args, settings.threads, run_dir / "fit.log")
    if checkpoint_step(last) < steps:
        raise DemoError(f"{name}: `epg fit` ended without a complete {last}; see {run_dir / 'fit.log'}")
    return f"trained {steps} steps" + (f" (resumed from step {done})" if done >= 0 else "")

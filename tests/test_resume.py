"""Killed and pre-empted CPU runs continue exactly: SIGKILL, SIGTERM, then a rerun of the same command.

The reference is an uninterrupted run of the same command. Compared exactly (``torch.equal``): global step, applied
updates, every module tensor (online weights, EMA copies / stage-1 target, BN buffers) and every optimizer state
tensor (AdamW step, exp_avg, exp_avg_sq). The runs use tests/scripts/fault_fit.py (one batch per epoch, so the
data order is exact too, and a DataLoader worker); signals go to the whole process group, as SLURM sends them.
test_epg_fit_interrupted_then_rerun_is_exact checks the same through `epg fit` on the demo shards, with
EPGDataModule's WebDataset stream (worker processes, several batches per epoch, kills mid-epoch): exact as well.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "fault_fit.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
STEPS = 10


def start(args: list[str], log: Path) -> subprocess.Popen:
    """Start ``python ARGS`` in the repository root in its own process group, output to ``log``."""
    with open(log, "ab") as f:
        return subprocess.Popen(
            [sys.executable, *args], cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def saved_steps(folder: Path) -> list[int]:
    """Steps of the complete step checkpoints (``...step=N.ckpt``) in ``folder``."""
    names = os.listdir(folder) if folder.is_dir() else []
    return [int(m.group(1)) for n in names if (m := re.search(r"step=(\d+)\.ckpt$", n))]


def wait_for_step(proc: subprocess.Popen, folder: Path, step: int, log: Path, timeout: float = 90.0) -> int:
    """Poll until a checkpoint of at least ``step`` exists (while ``proc`` runs); return its step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [s for s in saved_steps(folder) if s >= step]
        if steps:
            return max(steps)
        if proc.poll() is not None:
            pytest.fail(f"run ended (exit {proc.returncode}) before step {step}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no checkpoint of step {step} within {timeout} s:\n{log.read_text()[-3000:]}")


def finish(proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"run did not end within {timeout} s:\n{log.read_text()[-3000:]}")


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_run(ref: dict, got: dict) -> None:
    assert (got["global_step"], got["updates"], got["epoch"]) == (ref["global_step"], ref["updates"], ref["epoch"])
    assert got["state_dict"].keys() == ref["state_dict"].keys()
    diff = [k for k in ref["state_dict"] if not torch.equal(ref["state_dict"][k], got["state_dict"][k])]
    assert not diff, f"module tensors differ after resume: {diff[:8]}"
    ref_opt, got_opt = ref["optimizer"]["state"], got["optimizer"]["state"]
    assert ref_opt.keys() == got_opt.keys() and len(ref_opt) > 0
    for i, state in ref_opt.items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(got_opt[i][name])), (i, name)
    assert got["lr"] == ref["lr"]


SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}


def interrupt(run: subprocess.Popen, how: str, folder: Path, step: int, log: Path) -> int:
    """Send SIGKILL, SIGTERM or SIGINT (Ctrl-C) once a checkpoint of ``step`` exists; check the exit; return
    last.ckpt's step."""
    seen = wait_for_step(run, folder, step, log)
    os.killpg(run.pid, SIGNALS[how])  # every process, as SLURM (or a terminal's Ctrl-C) does
    code = finish(run, log)
    last = load(folder / "last.ckpt")["global_step"]  # loadable even when the kill hit a save
    if how == "kill":
        assert code == -signal.SIGKILL
        assert last >= seen - 1  # last.ckpt is written just after step=N.ckpt
    else:  # SIGTERM / Ctrl-C: last.ckpt at the step where it stopped, exit status 0 / 130
        assert code == (0 if how == "term" else 130), log.read_text()[-3000:]
        assert f"{'SIGTERM' if how == 'term' else 'Ctrl-C'}: saved" in log.read_text() and last >= seen
    return last


@pytest.mark.parametrize(
    "mode, signals",
    [
        ("finetune", ["kill"]),
        pytest.param("finetune", ["kill", "term"], marks=pytest.mark.slow),
        pytest.param("pretrain", ["kill", "term"], marks=pytest.mark.slow),
    ],
    ids=["finetune-kill", "finetune-kill-term", "pretrain-kill-term"],
)
def test_interrupted_then_rerun_is_exact(tmp_path, mode, signals):
    """Each interruption lands >= 2 steps after the previous one; the final rerun equals an uninterrupted run."""
    ref_log, log = tmp_path / "ref.log", tmp_path / "run.log"
    options = ["--steps", str(STEPS), "--workers", "1"]  # a worker process that must survive SIGTERM
    ref = start([str(SCRIPT), mode, str(tmp_path / "ref"), *options], ref_log)
    command = [str(SCRIPT), mode, str(tmp_path / "run"), *options, "--delay", "0.2"]
    folder, step = tmp_path / "run" / "checkpoints", 1
    for how in signals:  # the same command each time: it resumes from last.ckpt when there is one
        step = interrupt(start(command, log), how, folder, step + 2, log)
        assert step < STEPS and not (tmp_path / "run" / "final.pt").exists()
    run = start(command, log)
    assert finish(run, log) == 0, log.read_text()[-3000:]
    assert log.read_text().count("Restored all states from the checkpoint") == len(signals)
    assert finish(ref, ref_log) == 0, ref_log.read_text()[-3000:]
    assert_same_run(load(tmp_path / "ref" / "final.pt"), load(tmp_path / "run" / "final.pt"))


CONFIG = """\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: {steps}
  accumulate_grad_batches: {accumulate}
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  limit_val_batches: 0
  num_sanity_val_steps: 0
  default_root_dir: {root}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        dirpath: {root}/checkpoints
        every_n_train_steps: 1
        save_last: true
    - class_path: tests.scripts.fault_fit.Delay
      init_args:
        seconds: {delay}
model:
  class_path: {module}
  init_args:
    preset: EPG-Nano/4
    warmup_steps: 1
    total_steps: {steps}
{model_args}
data:
  train_shards: {data}/train
  stage: {stage}
  image_size: 16
  global_batch_size: 8
  num_workers: {workers}
  num_classes: 10
  samples_per_epoch: {samples}
  shuffle_buffer: 64
"""
MODULES = {
    "finetune": ("epg.lightning.finetune.FinetuneModule", "    ema_rates: [0.9]\n    sample_every_n_val: 0"),
    "pretrain": ("epg.lightning.pretrain.PretrainModule", "    seed: 0"),
}
BATCHES_PER_EPOCH = 7  # with accumulate_grad_batches 2: steps end at batches 2, 4, 6, 7 of each epoch


PHEMA_ARGS = "\n    phema: {sigma_rels: [0.05, 0.1], snapshot_every: 2, snapshot_dtype: float32}"


def write_config(
    path: Path, root: Path, data: Path, steps: int = 8, delay: float = 0.3, phema: bool = False, **layout: Any
) -> Path:
    """An `epg fit` config of EPG-Nano/4 on the demo shards, 8-sample batches, BATCHES_PER_EPOCH per epoch;
    ``layout`` may set stage ("finetune"), workers (0) and accumulate (1); ``phema`` adds post-hoc EMA copies."""
    layout = {"stage": "finetune", "workers": 0, "accumulate": 1} | layout
    module, model_args = MODULES[layout["stage"]]
    model_args += PHEMA_ARGS if phema else ""
    options = dict(module=module, model_args=model_args, samples=8 * BATCHES_PER_EPOCH, **layout)
    path.write_text(CONFIG.format(root=root, data=data, steps=steps, delay=delay, **options))
    return path


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    from epg.data.demo import prepare_demo

    out = tmp_path_factory.mktemp("demo")
    prepare_demo(out)
    return out


def run_state(path: Path) -> dict:
    """What assert_same_run compares, from an `epg fit` checkpoint."""
    ckpt = load(path)
    optimizer = ckpt["optimizer_states"][0]
    return {
        "global_step": ckpt["global_step"],
        "updates": ckpt["epg_updates"],
        "epoch": ckpt["epoch"],
        "state_dict": ckpt["state_dict"],
        "optimizer": optimizer,
        "lr": optimizer["param_groups"][0]["lr"],
    }


@pytest.mark.parametrize(
    "stage, signals, workers, accumulate",
    [("finetune", ["kill", "term"], 2, 1), pytest.param("pretrain", ["kill"], 1, 2, marks=pytest.mark.slow)],
    ids=["finetune-kill-term", "pretrain-kill-accumulate"],
)
def test_epg_fit_interrupted_then_rerun_is_exact(tmp_path, demo_data, stage, signals, workers, accumulate):
    """`epg fit -c X` on the demo shards (worker processes, several batches per epoch) killed mid-epoch, rerun:
    equals an uninterrupted run bitwise, the data stream included (EPGCLI resumes from last.ckpt by default)."""
    ref_log, log = tmp_path / "ref.log", tmp_path / "run.log"
    options = dict(data=demo_data, stage=stage, workers=workers, accumulate=accumulate)
    ref_config = write_config(tmp_path / "ref.yaml", tmp_path / "ref", steps=STEPS, delay=0.0, **options)
    ref = start(["-m", "epg.cli", "fit", "-c", str(ref_config)], ref_log)
    config = write_config(tmp_path / "run.yaml", tmp_path / "run", steps=STEPS, delay=0.3, **options)
    command, folder = ["-m", "epg.cli", "fit", "-c", str(config)], tmp_path / "run" / "checkpoints"
    step, batches = 1, []
    for how in signals:
        step = interrupt(start(command, log), how, folder, step + 2, log)
        assert step < STEPS
        batches.append(load(folder / "last.ckpt")["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["ready"])
    assert batches[0] % BATCHES_PER_EPOCH, f"the first interruption fell on an epoch boundary: {batches}"
    run = start(command, log)
    assert finish(run, log) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "starting at step 0" in text and text.count(f"resuming from {folder / 'last.ckpt'}") == len(signals)
    assert "dataloader is not resumable" not in text
    assert finish(ref, ref_log) == 0, ref_log.read_text()[-3000:]
    ref_state, got = run_state(tmp_path / "ref" / "checkpoints" / "last.ckpt"), run_state(folder / "last.ckpt")
    assert got["global_step"] == STEPS
    assert_same_run(ref_state, got)
    assert not list(folder.glob("*.tmp*"))  # epg.io's hidden .NAME.tmp-PID siblings included


def test_epg_fit_with_phema_killed_then_rerun_is_exact(tmp_path, demo_data):
    """Post-hoc EMA on (method.md §13): SIGKILL mid-run, rerun; the copies are bitwise those of an uninterrupted
    run, and the snapshots (every 2 updates) are the same files with the same tensors: none lost, none extra."""
    ref_log, log = tmp_path / "ref.log", tmp_path / "run.log"
    ref_config = write_config(tmp_path / "ref.yaml", tmp_path / "ref", demo_data, steps=STEPS, delay=0.0, phema=True)
    ref = start(["-m", "epg.cli", "fit", "-c", str(ref_config)], ref_log)
    config = write_config(tmp_path / "run.yaml", tmp_path / "run", demo_data, steps=STEPS, delay=0.3, phema=True)
    command, folder = ["-m", "epg.cli", "fit", "-c", str(config)], tmp_path / "run" / "checkpoints"
    assert interrupt(start(command, log), "kill", folder, 3, log) < STEPS
    run = start(command, log)
    assert finish(run, log) == 0, log.read_text()[-3000:]
    assert finish(ref, ref_log) == 0, ref_log.read_text()[-3000:]
    ref_state, got = run_state(tmp_path / "ref" / "checkpoints" / "last.ckpt"), run_state(folder / "last.ckpt")
    assert any(k.startswith("phema.nets.1.") for k in got["state_dict"])
    assert_same_run(ref_state, got)
    names = sorted(p.name for p in (tmp_path / "ref" / "phema").iterdir())
    assert names == [f"phema-{u:09d}.pt" for u in range(2, STEPS + 1, 2)]
    assert sorted(p.name for p in (tmp_path / "run" / "phema").iterdir()) == names  # no .tmp leftovers either
    for name in names:
        a, b = load(tmp_path / "ref" / "phema" / name), load(tmp_path / "run" / "phema" / name)
        assert a["updates"] == b["updates"]
        for x, y in zip(a["state_dicts"], b["state_dicts"], strict=True):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


def test_ctrl_c_saves_like_sigterm(tmp_path, demo_data):
    """Ctrl-C during `epg fit` (SIGINT to the process group, as a terminal sends it, DataLoader worker included):
    last.ckpt at the step where it stopped, exit status 130 and no traceback."""
    log = tmp_path / "run.log"
    config = write_config(tmp_path / "run.yaml", tmp_path / "run", demo_data, steps=STEPS, delay=0.3, workers=1)
    step = interrupt(
        start(["-m", "epg.cli", "fit", "-c", str(config)], log), "int", tmp_path / "run" / "checkpoints", 2, log
    )
    assert step < STEPS and "Traceback" not in log.read_text()


def test_ctrl_c_before_the_first_step_stops_cleanly(tmp_path, demo_data):
    """Ctrl-C inside `epg fit` before any step (Lightning's own KeyboardInterrupt handler, which exits 1): a one-line
    message, exit status 130, no checkpoint or temporary file; the same command then starts at step 0."""
    log, marker, root = tmp_path / "run.log", tmp_path / "in_setup", tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", root, demo_data, steps=2, delay=0.0)
    pause = f"    - class_path: tests.scripts.fault_fit.PauseAtSetup\n      init_args:\n        marker: {marker}\n"
    paused = tmp_path / "paused.yaml"
    paused.write_text(config.read_text().replace("  callbacks:\n", "  callbacks:\n" + pause, 1))
    run = start(["-m", "epg.cli", "fit", "-c", str(paused)], log)
    deadline = time.monotonic() + 90
    while not marker.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), log.read_text()[-3000:]
    os.killpg(run.pid, signal.SIGINT)
    assert finish(run, log) == 130, log.read_text()[-3000:]
    text = log.read_text()
    assert "Ctrl-C before training started (step 0): stopped, no checkpoint written" in text
    assert "Traceback" not in text
    assert not [p for p in root.rglob("*") if p.is_file()], "an interrupted set-up left files behind"
    run = start(["-m", "epg.cli", "fit", "-c", str(config)], log)  # the same run, not paused: starts afresh
    assert finish(run, log) == 0, log.read_text()[-3000:]
    assert load(root / "checkpoints" / "last.ckpt")["global_step"] == 2

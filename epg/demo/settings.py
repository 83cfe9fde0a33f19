"""What `epg demo` runs: :class:`DemoSettings` (objective, device, lengths, evaluation sizes) and its configs."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from epg.method.phema import gamma_of_sigma_rel

OBJECTIVES = {"diffusion": "finetune_dm", "consistency": "finetune_cm"}
DEVICES = ("cpu", "gpu")
# Per device: FID sample count, reference size (the val split has 500 digits), eval batch.
DEFAULTS = {
    "cpu": {"fid_samples": 500, "fid_ref": 500, "batch": 100},
    "gpu": {"fid_samples": 2000, "fid_ref": 500, "batch": 500},
}
VAL_DIGITS = 500  # the embedded digits' val split
GRID_SEED = 0
FID_SEED = 1


class DemoError(RuntimeError):
    """A demo step failed or a setting is wrong; the message says which and what to look at."""


def default_config_dir() -> Path:
    """configs/demo of the source tree this package lives in, else of the working directory."""
    here = Path(__file__).resolve().parents[2] / "configs" / "demo"
    return here if here.is_dir() else Path.cwd() / "configs" / "demo"


def load_yaml(path: Path) -> dict:
    """A YAML file as a dict."""
    import yaml

    with open(path) as f:
        return yaml.safe_load(f)


def log(message: str, start: float) -> None:
    """One progress line with the seconds since ``start``."""
    print(f"[epg demo {time.perf_counter() - start:7.1f}s] {message}", flush=True)


@dataclass
class DemoSettings:
    """What `epg demo` runs; the None defaults are filled in per device on construction.

    Args:
        objective: the stage-2 model, "diffusion" (method.md §4) or "consistency" (§5).
        device: "cpu" (the ~10-min demo) or "gpu" (``configs/demo/gpu``: the CPU recipe trained longer).
        out: folder for data, checkpoints, logs, samples, summary.json (runs/demo or runs/demo_gpu).
        fresh: retrain both stages even when their checkpoints exist.
        config_dir: folder with pretrain.yaml, finetune_dm.yaml, finetune_cm.yaml and gpu/.
        pretrain_steps, finetune_steps: stage lengths (None: the configs').
        fid_samples: class-balanced samples for FID and class accuracy (cpu 500, gpu 2000).
        fid_ref: val digits in the FID reference (at most 500, all by default).
        threads: torch threads of each step (default: all cores, at most 8 on cpu, 16 on gpu).
        batch_size, num_workers, accelerator: overrides of the configs' data loading and accelerator.
        sigma_rels: the post-hoc EMA σ_rel profiles reconstructed and scored when stage 2 kept snapshots
            (method.md §13); empty: none.
    """

    objective: str = "diffusion"
    device: str = "cpu"
    out: Path | None = None
    fresh: bool = False
    config_dir: Path | None = None
    pretrain_steps: int | None = None
    finetune_steps: int | None = None
    fid_samples: int | None = None
    fid_ref: int | None = None
    threads: int | None = None
    batch_size: int | None = None
    num_workers: int | None = None
    accelerator: str | None = None
    sigma_rels: tuple[float, ...] = (0.03, 0.06, 0.10)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES or self.device not in DEVICES:
            choices = f"objective one of {list(OBJECTIVES)}, device one of {list(DEVICES)}"
            raise DemoError(f"objective {self.objective!r}, device {self.device!r}: choose {choices}")
        defaults = DEFAULTS[self.device]
        self.out = Path(self.out or ("runs/demo" if self.device == "cpu" else "runs/demo_gpu"))
        self.config_dir = Path(self.config_dir) if self.config_dir else default_config_dir()
        self.fid_samples = self.fid_samples or defaults["fid_samples"]
        self.fid_ref = min(self.fid_ref or defaults["fid_ref"], VAL_DIGITS)
        if self.fid_samples < 2 or self.fid_ref < 2:
            raise DemoError("--fid-samples and --fid-ref must be at least 2 (a covariance needs 2 images)")
        for sigma_rel in self.sigma_rels:
            try:
                gamma_of_sigma_rel(sigma_rel)  # the range of a power-function profile, method.md §13
            except ValueError as err:
                raise DemoError(f"--sigma-rel: {err}") from None
        cores = os.cpu_count() or 1
        self.threads = self.threads or (min(cores, 8) if self.device == "cpu" else min(cores, 16))

    @property
    def configs(self) -> Path:
        """The folder of the configs this device uses."""
        return self.config_dir / "gpu" if self.device == "gpu" else self.config_dir

    @property
    def pretrain_config(self) -> Path:
        """The stage-1 config."""
        return self.configs / "pretrain.yaml"

    @property
    def finetune_config(self) -> Path:
        """The stage-2 config of the objective."""
        return self.configs / f"{OBJECTIVES[self.objective]}.yaml"

    @property
    def eval_batch(self) -> int:
        """Images per sampling and Inception batch of the evaluation."""
        return DEFAULTS[self.device]["batch"]

    @property
    def eval_device(self) -> str:
        """Where the evaluation runs: the GPU for device "gpu" (unless accelerator "cpu"), else the CPU."""
        from epg.io import pick_device

        return str(pick_device("auto" if self.device == "gpu" and self.accelerator != "cpu" else "cpu"))

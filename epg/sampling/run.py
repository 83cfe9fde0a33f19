"""A folder of N samples from a checkpoint: PNGs plus an ADM-style ``<folder>.npz``, resumable (method.md §6, §8).

:class:`SampleRun` declares the folder with typed fields and fills it. Image i's noise and label depend only on
(seed, i), so a rerun fills in exactly the missing files and any number of devices produces the same set. `epg sample`
(:mod:`epg.commands.sample`), `epg predict` (:class:`epg.lightning.predict.SampleWriter`) and the final run of
`epg fid sweep` (:mod:`epg.eval.sweep`) all go through it: the folder's settings record (``sample_config.json``) is
the same for all three, so any of them resumes a folder that another started.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from epg.checkpoint import default_sampler, load_denoiser, read_global_step, read_hyper_parameters
from epg.data.shards import read_class_counts
from epg.io import write_json
from epg.sampling.entry import default_steps
from epg.sampling.files import png_name, write_adm_npz, write_png
from epg.sampling.generate import SampleSettings, generate_batches, image_labels
from epg.sampling.guidance import Guidance
from epg.sampling.options import AUTOCAST, SamplingOptions, format_interval, settings_diff

CONFIG_NAME = "sample_config.json"
STOCHASTIC_FIELDS = ("s_churn", "s_min", "s_max", "s_noise", "stochastic_variant")


class SampleRunError(ValueError):
    """Settings that do not fit together, the network or the folder; the message says what to change."""


def label_counts(source: str, checkpoint: str | os.PathLike) -> tuple[list[int] | None, str]:
    """Training-set class counts for random labels (method.md §6.4) and a line saying where they come from.

    ``source`` names training shards or their dataset.json, "uniform" (None: equal frequencies), or "auto": the
    ``data.train_shards`` that a Lightning checkpoint records, read relative to the working directory. Where "auto"
    finds no counts (an official or converted checkpoint, shards elsewhere) the frequencies are uniform, with a note.
    """
    if source == "uniform":
        return None, "random labels drawn uniformly over the classes (--label-counts uniform)"
    spec = read_hyper_parameters(checkpoint)[1].get("train_shards") if source == "auto" else source
    counts = None
    if spec:
        try:
            counts = read_class_counts(str(spec))
        except (FileNotFoundError, ValueError):
            counts = None
    if counts is not None:
        return counts, f"random labels from the class frequencies of {spec} ({min(counts)}-{max(counts)} per class)"
    if source != "auto":
        raise SampleRunError(
            f"--label-counts {source}: no dataset.json with class counts there; point it at training "
            "shards made by `epg prepare` (or their dataset.json), or pass 'uniform'"
        )
    found = f"its training shards {spec} have no dataset.json here" if spec else "it records no training shards"
    return None, (
        f"note: random labels are uniform over the classes: {found}; pass --label-counts TRAIN_SHARDS for the "
        "training set's class frequencies (method.md §6.4)"
    )


def counts_digest(counts: list[int] | None) -> str:
    """A short fingerprint of the label counts for a folder's settings ("uniform" for None)."""
    return "uniform" if counts is None else hashlib.sha256(json.dumps(counts).encode()).hexdigest()[:16]


@dataclass
class SampleRun:
    """``num`` samples of ``checkpoint`` into the folder ``out`` (PNGs, then ``<out>.npz``) and what decides them.

    The fields are `epg sample`'s options (errors name them as ``--option``). A sampler or step count left None in
    ``options`` is filled in on construction: the checkpoint objective's sampler (heun for a diffusion, consistency
    for a consistency model) and that sampler's default steps.

    Args:
        checkpoint: EPG network file, FinetuneModule checkpoint, or official file (with ``preset``).
        out: folder of 000000.png …; the npz goes next to it as ``<out>.npz``.
        num: number of images (50000 for FID-50K).
        options: sampler, steps, CFG scale and interval, label mode, seed.
        ema: EMA copy index of a Lightning checkpoint, or None for the online weights.
        batch: images per device batch (100 as in the paper).
        autocast: "none" (fp32 sampling, §8), "bf16" or "fp16".
        preset, parameterization: the architecture of an official file; an override of the output form.
        autoguidance, poor: autoguidance scale w in D_c + w·(D_c − D_poor) and the weaker checkpoint.
        clamp: clamp x̂0 to [−1, 1] (method.md §6.1).
        label_counts: class frequencies of random labels (see :func:`label_counts`).
        num_classes: classes to draw labels from (None: the network's).
        append_zero, s_churn, s_min, s_max, s_noise, stochastic_variant, sigma_mid: options of the samplers.
        npz: also write ``<out>.npz`` once every PNG exists.
        prog: the command named in messages.
    """

    checkpoint: str | os.PathLike
    out: Path
    num: int
    options: SamplingOptions = field(default_factory=SamplingOptions)
    ema: int | None = 0
    batch: int = 100
    autocast: str = "none"
    preset: str | None = None
    parameterization: str | None = None
    autoguidance: float | None = None
    poor: str | os.PathLike | None = None
    clamp: bool = True
    label_counts: str = "auto"
    num_classes: int | None = None
    append_zero: bool = False
    s_churn: float | None = None
    s_min: float | None = None
    s_max: float | None = None
    s_noise: float | None = None
    stochastic_variant: str | None = None
    sigma_mid: tuple[float, ...] | None = None
    npz: bool = True
    prog: str = "epg sample"
    settings: SampleSettings | None = field(default=None, init=False, repr=False, compare=False)  # set by open()

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        sampler = self.options.sampler or default_sampler(self.checkpoint, self.parameterization)
        steps = self.options.steps or default_steps(sampler)
        self.options = dataclasses.replace(self.options, sampler=sampler, steps=steps)  # a copy: the caller's stays
        if self.num < 1 or self.batch < 1:
            raise SampleRunError(f"--num and --batch must be ≥ 1, got {self.num} and {self.batch}")
        if self.autocast not in AUTOCAST:
            raise SampleRunError(f"--autocast takes one of {sorted(AUTOCAST)}, got {self.autocast!r}")
        if self.options.cfg is not None and self.autoguidance is not None:
            raise SampleRunError("choose one of --cfg and --autoguidance")
        if (self.autoguidance is None) != (self.poor is None):
            raise SampleRunError("--autoguidance W and --poor CKPT go together")
        stochastic = [f for f in STOCHASTIC_FIELDS if getattr(self, f) is not None]
        if stochastic and sampler != "stochastic":
            raise SampleRunError(f"--{stochastic[0].replace('_', '-')} is an option of --sampler stochastic")
        if self.sigma_mid and sampler != "consistency":
            raise SampleRunError("--sigma-mid is an option of --sampler consistency")
        if self.append_zero and sampler == "consistency":
            raise SampleRunError("--append-zero does not apply to --sampler consistency")

    # ---- what decides the images ---------------------------------------------------------------------------------
    def sampler_options(self) -> dict:
        """The keyword options of the sampler (:func:`epg.sampling.sample`)."""
        options = {f: getattr(self, f) for f in STOCHASTIC_FIELDS if getattr(self, f) is not None}
        if "stochastic_variant" in options:
            options["variant"] = options.pop("stochastic_variant")
        if self.append_zero:
            options["append_zero"] = True
        if self.sigma_mid:
            options["sigma_mid"] = list(self.sigma_mid)
        return options

    def identity(self, num_classes: int | None, counts: list[int] | None) -> dict:
        """The folder's settings record: what determines the images; a rerun into the same folder must match it."""
        options = self.options
        identity = {
            "ema": "none" if self.ema is None else str(self.ema),
            "preset": self.preset,
            "parameterization": self.parameterization,
            "sampler": options.sampler,
            "steps": options.steps,
            "cfg": None if options.cfg is None else float(options.cfg),
            "autoguidance": self.autoguidance,
            "poor": None if self.poor is None else os.path.abspath(self.poor),
            "interval": format_interval(options.interval),
            "no_clamp": not self.clamp,
            "labels": options.labels,
            "seed": options.seed,
            "autocast": self.autocast,
            "append_zero": self.append_zero,
            **{f: getattr(self, f) for f in STOCHASTIC_FIELDS[:-1]},
            "sigma_mid": None if not self.sigma_mid else ",".join(map(str, self.sigma_mid)),
        }
        if options.sampler == "stochastic":  # the default variant changed from edm to official: older folders differ
            identity["stochastic_variant"] = self.stochastic_variant or "official"
        identity.update(checkpoint=os.path.abspath(self.checkpoint), num_classes=num_classes)
        # A checkpoint path such as last.ckpt is rewritten while training goes on: its step tells the weights apart.
        identity["checkpoint_step"] = read_global_step(self.checkpoint)
        if options.labels == "balanced":
            identity["num"] = self.num  # balanced labels depend on N
        else:
            identity["label_counts"] = counts_digest(counts)
        return identity

    def command_line(self) -> str:
        """The `epg sample` command that fills this folder with the same images (for messages)."""
        options = self.options
        argv = [str(self.checkpoint), "--out", str(self.out), "--num", str(self.num)]
        argv += ["--ema", "none" if self.ema is None else str(self.ema), "--batch", str(self.batch)]
        argv += ["--sampler", options.sampler, "--steps", str(options.steps)]
        argv += ["--interval", format_interval(options.interval), "--labels", options.labels]
        argv += ["--seed", str(options.seed), "--label-counts", self.label_counts, "--autocast", self.autocast]
        flags = {
            "--cfg": options.cfg,
            "--preset": self.preset,
            "--parameterization": self.parameterization,
            "--autoguidance": self.autoguidance,
            "--poor": self.poor,
            "--num-classes": self.num_classes,
            **{f"--{f.replace('_', '-')}": getattr(self, f) for f in STOCHASTIC_FIELDS},
            "--sigma-mid": ",".join(map(str, self.sigma_mid)) if self.sigma_mid else None,
        }
        argv += [str(v) for flag, value in flags.items() if value is not None for v in (flag, value)]
        switches = {"--no-clamp": not self.clamp, "--append-zero": self.append_zero, "--no-npz": not self.npz}
        argv += [flag for flag, on in switches.items() if on]
        return "epg sample " + shlex.join(argv)

    # ---- the folder ----------------------------------------------------------------------------------------------
    def open(self, denoiser: torch.nn.Module, rank: int = 0) -> SampleRun:
        """Fix the settings for ``denoiser`` (on its device) and create the folder, or check it against them.

        Raises :class:`SampleRunError` on settings that do not fit the network or a folder made with others.
        """
        num_classes = self.num_classes or denoiser.null_label  # None: an unconditional network, no labels
        if self.num_classes and (denoiser.null_label is None or self.num_classes > denoiser.null_label):
            raise SampleRunError(f"--num-classes {self.num_classes} but the network has {denoiser.null_label}")
        counts = None
        if num_classes is not None and self.options.labels == "random":
            counts, where = label_counts(self.label_counts, self.checkpoint)
            if counts is not None and len(counts) != num_classes:
                raise SampleRunError(
                    f"{where}, but labels are drawn from {num_classes} classes; pass training shards of "
                    f"the same classes to --label-counts, or 'uniform'"
                )
            if rank == 0:
                print(f"{self.prog}: {where}", file=sys.stderr)
        self._check_folder(self.identity(num_classes, counts), rank)
        self.out.mkdir(parents=True, exist_ok=True)
        self.settings = self.options.settings(
            guidance=self._guidance(next(denoiser.parameters()).device),
            clamp=1.0 if self.clamp else None,
            autocast=AUTOCAST[self.autocast],
            num_classes=num_classes,
            class_counts=counts,
            options=self.sampler_options(),
        )
        return self

    def _guidance(self, device: torch.device) -> Guidance | None:
        if self.autoguidance is not None:
            poor = load_denoiser(self.poor, ema=self.ema, preset=self.preset).denoiser.to(device)
            return Guidance(self.autoguidance, self.options.interval, kind="autoguidance", poor=poor)
        return self.options.guidance

    def _check_folder(self, identity: dict, rank: int) -> None:
        path = self.out / CONFIG_NAME
        if path.exists():
            diff = settings_diff(json.loads(path.read_text()), identity)
            if diff:
                raise SampleRunError(
                    f"{self.out} holds samples made with different settings ({', '.join(diff)}); "
                    f"use a fresh --out folder, or delete {path} if the change does not alter the images"
                )
        elif rank == 0:
            write_json(path, identity)

    def missing(self) -> list[int]:
        """Indices of the images not written yet."""
        existing = set(os.listdir(self.out))
        return [i for i in range(self.num) if png_name(i, self.num) not in existing]

    def write(self, indices: list[int], images: torch.Tensor) -> None:
        """Save uint8 images (B, H, W, 3) of image ``indices`` as PNGs (each atomically)."""
        for i, image in zip(indices, images.numpy(), strict=True):
            write_png(self.out / png_name(i, self.num), image)

    def finish(self, denoiser: torch.nn.Module) -> None:
        """Write ``<out>.npz`` (images + labels) once every PNG exists, unless it is newer than all of them."""
        if not self.npz:
            return
        npz = self.out.with_name(self.out.name + ".npz")
        names = [png_name(i, self.num) for i in range(self.num)]
        absent = [n for n in names if not (self.out / n).exists()]
        if absent:
            raise SampleRunError(f"{len(absent)} images are missing (e.g. {absent[0]}): rerun the same command")
        newest = max((self.out / n).stat().st_mtime for n in names)
        if npz.exists() and npz.stat().st_mtime >= newest:
            print(f"{self.prog}: {npz} is up to date")
            return
        write_adm_npz(self.out, self.num, npz, image_labels(denoiser, range(self.num), self.num, self.settings))
        print(f"{self.prog}: wrote {self.num} images to {self.out}/ and {npz}")

    # ---- the whole run -------------------------------------------------------------------------------------------
    def execute(
        self,
        device: torch.device | str,
        rank: int = 0,
        world: int = 1,
        barrier: Callable[[], object] | None = None,
        progress: bool = True,
    ) -> None:
        """Load the checkpoint on ``device``, write this rank's missing images, then (rank 0) the npz.

        With several ranks each writes the missing images i ≡ rank (mod world); ``barrier`` waits for all of them.
        """
        model = load_denoiser(self.checkpoint, ema=self.ema, preset=self.preset, parameterization=self.parameterization)
        denoiser = model.denoiser.to(device)
        self.open(denoiser, rank)
        missing = self.missing()
        mine = [i for i in missing if i % world == rank]  # fixed by index: ranks may list the folder at different times
        bar = _progress(len(missing), self.prog, disabled=rank != 0 or not progress)
        for batch, images in generate_batches(denoiser, mine, self.num, self.settings, model.normalization, self.batch):
            self.write(batch, images)
            bar.update(min(len(batch) * world, bar.total - bar.n))
        bar.close()
        if barrier is not None:
            barrier()
        if rank == 0:
            self.finish(denoiser)


def _progress(total: int, desc: str, disabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=disabled, file=sys.stderr)

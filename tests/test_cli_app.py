"""`epg fit|validate|test|predict` as a standard Lightning application (issue 14): modules by name, links, one run
folder, safe resume, one-line errors. In-process `epg.cli.main` runs of EPG-Nano/4 on the demo shards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from epg.cli import main
from epg.method.lr import warmup_cosine
from tests.test_finetune_module import write_stage1
from tests.test_resume import ENV, REPO, demo_data  # noqa: F401  (demo_data is a fixture)

ROOT = Path(__file__).resolve().parents[1]
# A shipped-style config: no max_steps (total_steps), no logger or dirpath (the run folder), no data image size or
# classes (the model's), the normalization once (data).
CONFIG = """\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  log_every_n_steps: 1
  limit_val_batches: 1
  val_check_interval: 2
  check_val_every_n_epoch: null
  num_sanity_val_steps: 0
  enable_progress_bar: false
  default_root_dir: {root}
  callbacks:
    - class_path: lightning.pytorch.callbacks.LearningRateMonitor  # train/lr/pg1, pg2 (the only LR source)
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        every_n_train_steps: 2
        save_last: true
        enable_version_counter: false
model:
  class_path: FinetuneModule
  init_args:
    preset: EPG-Nano/4
    lr: 1.0e-3
    warmup_steps: 1
    total_steps: {total_steps}
    ema_rates: [0.9]
    val_sigmas: [1.0]
    sample_every_n_val: 0
{model_args}
data:
  train_shards: {data}/train
  val_shards: {data}/val
  global_batch_size: 8
  val_batch_size: 8
  num_workers: 0
  samples_per_epoch: 64
  normalization: simple  # the model's follows (linked)
"""


def write(path: Path, root: Path, data: Path, total_steps: int = 2, **model_args: object) -> Path:
    args = "".join(f"    {k}: {json.dumps(v)}\n" for k, v in model_args.items())
    path.write_text(CONFIG.format(root=root, data=data, total_steps=total_steps, model_args=args.rstrip("\n")))
    return path


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def printed_config(capsys, *args: str) -> dict:
    """`epg fit ARGS --print_config` as a dict."""
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *args, "--print_config"])
    assert exit_.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_modules_by_name_typed_network_int_batch_limits_and_no_auto_optimizer(capsys):
    # In a fresh process, where nothing imported the modules before the parser was built.
    command = [sys.executable, "-m", "epg.cli", "fit", "--model.help", "FinetuneModule"]
    done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "--model.init_from" in done.stdout, done.stderr[-2000:]
    assert printed_config(capsys, "--model", "PretrainModule")["model"]["class_path"] == (
        "epg.lightning.pretrain.PretrainModule"
    )
    # One network field from the command line keeps the config's others (the CM's dropout 0.5).
    cm = str(ROOT / "configs/finetune/epg_l16_cm_in256.yaml")
    cfg = printed_config(capsys, "-c", cm, "--model.init_args.network.image_size", "64")
    assert {k: v for k, v in cfg["model"]["init_args"]["network"].items() if v is not None} == {
        "image_size": 64,
        "drop": 0.5,
    }
    # `1` is one batch (an int), `1.0` every batch; the demo configs' `limit_val_batches: 1` means one.
    assert (
        printed_config(capsys, "-c", str(ROOT / "configs/demo/finetune_dm.yaml"))["trainer"]["limit_val_batches"] == 1
    )
    cfg = printed_config(capsys, "--model", "FinetuneModule", "--trainer.limit_train_batches", "1.0")
    assert isinstance(cfg["trainer"]["limit_train_batches"], float)
    # The modules' configure_optimizers (no-decay groups, skip-aware schedule) is never replaced.
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--model", "FinetuneModule", "--optimizer", "AdamW", "--print_config"])
    assert exit_.value.code == 2 and "--optimizer" in capsys.readouterr().err


def test_run_folder_resume_rules_and_changed_lr(tmp_path, demo_data, capsys, caplog, recwarn):  # noqa: F811
    root = tmp_path / "run"
    # The model's seed is 1234: both seeds are kept (data/seed in the logs), no "Error while merging hparams".
    config = [str(write(tmp_path / "fit.yaml", root, demo_data)), "--data.seed", "7"]
    for command in ("validate", "predict"):  # no checkpoint yet: one line, not freshly initialised weights
        assert main([command, "-c", *config]) == 2
        assert last_line(capsys.readouterr().err) == (
            f"epg {command}: ckpt_path: no checkpoint of this run in {root}/checkpoints: train it first (epg fit "
            "with the same config) or pass --ckpt_path FILE"
        )
    assert main(["fit", "-c", *config]) == 0  # trainer.max_steps follows total_steps (2)
    ckpt = load(root / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2 and ckpt["hyper_parameters"]["normalization"] == "simple"  # linked to the data's
    assert ckpt["datamodule_hyper_parameters"]["seed"] == 7 and ckpt["hyper_parameters"]["seed"] == 1234
    assert yaml.safe_load((root / "lightning_logs/version_0/hparams.yaml").read_text())["data"]["seed"] == 7
    assert "Tip:" not in caplog.text and "Total Flops" not in caplog.text  # Lightning's expected notes are silenced
    assert not [w for w in recwarn if "in eval mode" in str(w.message)]  # the EMA copies

    # A changed lr (or total_steps) stops the resume, naming old and new values ...
    changed = ["--model.init_args.lr", "2e-3", "--model.init_args.total_steps", "6", "--trainer.max_steps", "4"]
    assert main(["fit", "-c", *config, *changed]) == 2
    assert last_line(capsys.readouterr().err) == (
        f"epg fit: ckpt_path: {root}/checkpoints/last.ckpt was trained with other hyper-parameters: "
        "model.init_args.lr 0.001 -> 0.002; model.init_args.total_steps 2 -> 6; pass --accept_changed_hparams to "
        "continue with the new values, or start a new run in another trainer.default_root_dir"
    )
    # ... a network change even with the option ...
    wider = ["--model.init_args.network.dec_dim", "64", "--accept_changed_hparams"]
    assert main(["fit", "-c", *config, *changed, *wider]) == 2
    assert "holds another network or stage than the config: model.init_args.network.dec_dim 32 -> 64" in (
        capsys.readouterr().err
    )
    # ... and with it the new values take effect: the optimizer steps with the new lr from the first resumed step.
    assert main(["fit", "-c", *config, *changed, "--accept_changed_hparams"]) == 0
    assert "with changed hyper-parameters (--accept_changed_hparams): model.init_args.lr 0.001 -> 0.002" in (
        caplog.text
    )
    ckpt = load(root / "checkpoints" / "last.ckpt")
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert ckpt["global_step"] == 4 and [g["initial_lr"] for g in groups] == [2e-3] * len(groups)
    assert ckpt["lr_schedulers"][0]["base_lrs"] == [2e-3] * len(groups)
    assert groups[0]["lr"] == pytest.approx(2e-3 * warmup_cosine(4, 1, 6))
    runs = sorted(p.name for p in (root / "lightning_logs").iterdir())
    assert runs == ["version_0"]  # the resume continued the same TensorBoard run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(root / "lightning_logs/version_0"))
    events.Reload()
    lrs = {e.step: e.value for e in events.Scalars("train/lr/pg1")}
    assert lrs[1] == pytest.approx(1e-3 * warmup_cosine(1, 1, 2)) and lrs[2] == pytest.approx(
        2e-3 * warmup_cosine(2, 1, 6)
    )

    # validate without --ckpt_path scores the run's last checkpoint.
    assert main(["validate", "-c", *config, *changed]) == 0
    assert f"epg validate: {root}/checkpoints/last.ckpt (--ckpt_path last)" in caplog.text
    # Another run folder is another run: nothing is resumed from (or written to) the first.
    other = tmp_path / "other"
    assert main(["fit", "-c", *config, "--trainer.default_root_dir", str(other)]) == 0
    assert f"no last checkpoint in {other}/checkpoints: starting at step 0" in caplog.text
    assert load(other / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert load(root / "checkpoints" / "last.ckpt")["global_step"] == 4


def test_consistency_run_resumes_without_its_stage1_file_and_samples_in_one_step(tmp_path, demo_data, capsys):  # noqa: F811
    stage1 = tmp_path / "stage1.ckpt"
    pre = write_stage1(stage1, network={"enc_dim": 48})  # stage 2 takes this width without retyping it
    root = tmp_path / "cm"
    loss = {"class_path": "epg.method.objectives.ConsistencyLoss"}
    args = {"loss": loss, "init_from": str(stage1), "network": {"drop": 0.5}}
    config = str(write(tmp_path / "cm.yaml", root, demo_data, total_steps=4, **args))
    assert main(["fit", "-c", config, "--trainer.max_steps", "2"]) == 0
    ckpt = load(root / "checkpoints" / "last.ckpt")
    assert ckpt["hyper_parameters"]["network"] == {"drop": 0.5, "enc_dim": 48}
    stage1.unlink()  # the frozen stage-1 network and the encoder are in the checkpoint
    assert main(["fit", "-c", config]) == 0, capsys.readouterr().err
    ckpt = load(root / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4
    for key, value in pre.online.state_dict().items():
        assert torch.equal(ckpt["state_dict"][f"aux_net.{key}"], value), key
    out = tmp_path / "samples"  # epg sample: the consistency model's 1-step sampler, not Heun-32
    assert (
        main(["sample", str(root / "checkpoints" / "last.ckpt"), "--out", str(out), "--num", "2", "--no-progress"]) == 0
    )
    settings = json.loads((out / "sample_config.json").read_text())
    assert (settings["sampler"], settings["steps"]) == ("consistency", 1)


def test_config_mistakes_and_missing_gpus_are_one_line_errors(tmp_path, demo_data, capsys, monkeypatch):  # noqa: F811
    config = str(write(tmp_path / "fit.yaml", tmp_path / "run", demo_data))
    cases = {
        ("--data.num_classes", "4"): "epg fit: data.num_classes: 4, but the model (EPG-Nano/4, network overrides None) "
        "has 10 classes (its CFG null label is the class count); set data.num_classes: 10 (or leave it out) or "
        "model.init_args.network.num_classes: 4",
        ("--trainer.accelerator", "mps"): "epg fit: trainer.accelerator: `MPSAccelerator` can not run on your system",
    }
    for args, message in cases.items():
        assert main(["fit", "-c", config, "--trainer.max_steps", "1", *args]) == 2
        assert last_line(capsys.readouterr().err).startswith(message)
    text = (
        Path(config)
        .read_text()
        .replace("    preset: EPG-Nano/4\n", "    preset: EPG-Nano/4\n    normalization: simple\n")
    )
    (tmp_path / "both.yaml").write_text(text)
    assert main(["fit", "-c", str(tmp_path / "both.yaml"), "--trainer.max_steps", "1"]) == 2
    assert last_line(capsys.readouterr().err) == (
        "epg fit: model.init_args.normalization: follows data.normalization (they must agree), so set "
        f"data.normalization instead (given in {tmp_path / 'both.yaml'})"
    )
    # The unmodified paper config on a machine without a GPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "-c", str(ROOT / "configs/finetune/epg_xl16_dm_in256.yaml")]) == 2
    assert last_line(capsys.readouterr().err) == (
        "epg fit: trainer.accelerator: gpu with 8 device(s), but this machine has 0 CUDA GPU(s); on the CPU run "
        "with --trainer.accelerator cpu --trainer.devices 1 --trainer.strategy auto --trainer.precision 32-true"
    )


def test_resume_compares_grid_sampling_options_field_by_field():
    """A checkpoint's `sampling` against the config's: compared field by field, so an unchanged setting resumes
    and a changed one is named."""
    from epg.lightning.resume import hparam_changes

    saved = {"init_from": None, "sampling": {"cfg": 2.0, "steps": 16, "interval": [0.19, 1.61]}}
    same = {"init_from": None, "sampling": {"cfg": 2.0, "steps": 16}}
    assert hparam_changes(same, {}, {}, saved, {}) == []
    changed = hparam_changes({**same, "sampling": {"cfg": 3.0, "steps": 16, "interval": None}}, {}, {}, saved, {})
    assert [(c.option, c.old, c.new) for c in changed] == [
        ("model.init_args.sampling.cfg", 2.0, 3.0),
        ("model.init_args.sampling.interval", [0.19, 1.61], None),
    ]


def test_moved_keys_are_refused_naming_the_new_key(tmp_path, capsys):
    """The flat loss and grid-sampling keys of unreleased versions: one line naming the new key, nothing moved."""
    model = {"class_path": "epg.lightning.finetune.FinetuneModule", "init_args": {"ect_d0": 500}}
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"model": model}))
    assert main(["fit", "-c", str(old)]) == 2
    assert last_line(capsys.readouterr().err) == (
        f"epg fit: model.init_args.ect_d0: moved: set model.init_args.loss.init_args.ect_d0 (given in {old})"
    )
    for flag, new in [
        ("--model.init_args.loss_weighting=uniform", "model.init_args.loss.init_args.weighting"),
        ("--model.sample_steps=4", "model.init_args.sampling.steps"),
        ("--model.init_args.curriculum_n0=2", "model.init_args.loss.init_args.curriculum_n0"),
        ("--model.init_args.objective=consistency", "model.init_args.loss.class_path"),
    ]:
        assert main(["fit", "--model", "FinetuneModule", flag, "--print_config"]) == 2
        key = flag.split("=")[0][2:].replace("model.sample", "model.init_args.sample")
        assert last_line(capsys.readouterr().err) == f"epg fit: {key}: moved: set {new} (given in {flag})"

"""Every paper config goes through LightningCLI: class paths, callbacks, logger and data args resolve.

The network is swapped for EPG-Nano/4 and the device for the CPU so that instantiation is cheap.
"""

from pathlib import Path

import pytest

from epg.commands.train import run_lightning_cli

ROOT = Path(__file__).parents[1]
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*/*.yaml"))


@pytest.mark.parametrize("config", CONFIGS)
def test_config_instantiates(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative run folders land in tmp
    text = (ROOT / config).read_text()
    args = ["-c", str(ROOT / config), "--model.init_args.preset=EPG-Nano/4", "--trainer.accelerator=cpu"]
    args += ["--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32"]
    if "FinetuneModule" in text:
        args += ["--model.init_args.init_from=null"]
        args += ["--model.init_args.loss=null"]  # the default loss: DiffusionLoss
        args += ["--model.init_args.network={num_classes: 10}"]
    cli = run_lightning_cli(args, run=False)
    assert cli.model.hparams.preset == "EPG-Nano/4"
    names = {type(c).__name__ for c in cli.trainer.callbacks}
    if "Throughput" in text:
        assert "Throughput" in names
    assert cli.datamodule.hparams.global_batch_size > 0

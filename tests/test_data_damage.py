"""Damaged shards through `epg fit`: a truncated shard stops the run at setup, naming it and the repair command; a
byte-flipped one (same size) is named while reading and counted in TensorBoard (data/lost_samples).

The run reads in the main process (num_workers 0): under pytest, warnings of worker processes are recorded in the
worker's copy of pytest's list and never shown; test_data_datamodule checks the counts over worker processes."""

from __future__ import annotations

import shutil

import pytest

from epg import cli
from tests.test_data_prepare import flip, truncate
from tests.test_resume import demo_data, write_config  # noqa: F401  (demo_data is a fixture)

TENSORBOARD = """  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args:
      save_dir: {root}
      name: tb
  log_every_n_steps: 1
"""


def test_epg_fit_names_damaged_shards(tmp_path, demo_data, capfd):  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    truncate(data / "train" / "train-000001.tar")
    flip(data / "train" / "train-000003.tar", 30_000)  # the header of the 6th sample
    config = write_config(tmp_path / "fit.yaml", tmp_path / "run", data, steps=3, delay=0.0)
    config.write_text(config.read_text().replace("  logger: false\n", TENSORBOARD.format(root=tmp_path / "run")))

    assert cli.main(["fit", "-c", str(config)]) == 2
    assert capfd.readouterr().err.strip().splitlines()[-1] == (
        f"epg fit: data.train_shards: 1 of the train_shards in {data / 'train'} differ from their records: "
        "train-000001.tar (truncated to 2,309,120 of 4,618,240 bytes); repair them with "
        f"`epg prepare demo {data}` (check with `epg prepare --verify`), or set data.allow_damaged_shards: true "
        "to train on what they still hold"
    )

    flipped = data / "train" / "train-000003.tar"
    with pytest.warns(UserWarning) as caught:
        assert cli.main(["fit", "-c", str(config), "--data.train_shards", str(flipped)]) == 0
    damage = [str(w.message) for w in caught if "damaged shard" in str(w.message)]
    assert len(damage) == 1, damage  # once per shard, however often the stream draws it
    assert damage[0].startswith(
        f"damaged shard {flipped}: tar stream has a damaged member header (bad checksum) after 5 samples "
        "(895 samples lost); check with `epg prepare --verify`"
    )
    events = EventAccumulator(str(max((tmp_path / "run" / "tb").iterdir()))).Reload()  # the second run's
    lost = [event.value for event in events.Scalars("data/lost_samples")]
    assert len(lost) == 3 and lost[-1] >= 895 and lost[-1] % 895 == 0
    assert [event.value for event in events.Scalars("data/skipped_samples")] == [0.0] * 3

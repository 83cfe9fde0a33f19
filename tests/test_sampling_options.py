"""SamplingOptions (the one sampling-settings object of every surface) and the one sample-grid maker."""

from __future__ import annotations

import pytest
import torch

from epg.method.denoiser import Denoiser
from epg.nn.network import build_network
from epg.sampling.grid import GUIDANCE_INTERVAL
from epg.sampling.image_grid import grid_labels, pick_grid, sample_grid, tile
from epg.sampling.options import (
    AUTOCAST,
    SamplingOptions,
    SamplingOptionsError,
    format_interval,
    parse_ema,
    parse_interval,
    settings_diff,
)


def test_interval_parsing_is_one_function():
    assert parse_interval("0.19,1.61") == GUIDANCE_INTERVAL == parse_interval([0.19, 1.61])
    assert parse_interval("none") is None and parse_interval(None) is None and parse_interval("NONE") is None
    assert parse_interval("default") == GUIDANCE_INTERVAL
    for bad in ("1", "1,2,3", "a,b", "2,1"):
        with pytest.raises(SamplingOptionsError, match="interval"):
            parse_interval(bad)
    assert parse_interval(format_interval(GUIDANCE_INTERVAL)) == GUIDANCE_INTERVAL
    assert format_interval(None) == "none"


def test_ema_parsing():
    assert parse_ema("0") == 0 and parse_ema("12") == 12 and parse_ema("none") is None and parse_ema(None) is None
    with pytest.raises(SamplingOptionsError, match="EMA index"):
        parse_ema("-1")


def test_options_check_and_build_settings():
    options = SamplingOptions(steps=8, cfg=2.5, interval="none", labels="random", seed=3)
    assert options.interval is None and options.guidance.scale == 2.5 and options.guidance.interval is None
    settings = options.settings("consistency", class_counts=[1, 2], autocast=AUTOCAST["bf16"])
    assert (settings.sampler, settings.steps, settings.labels, settings.seed) == ("consistency", 8, "random", 3)
    assert settings.class_counts == [1, 2] and settings.autocast is torch.bfloat16
    assert SamplingOptions(sampler="euler").settings("heun").sampler == "euler"
    assert SamplingOptions(cfg=1.0).guidance is None and SamplingOptions().guidance is None
    assert SamplingOptions().interval == GUIDANCE_INTERVAL  # the paper's by default (method.md §6.2)
    for bad in ({"sampler": "ddim"}, {"labels": "odd"}, {"steps": 0}, {"seed": -1}, {"interval": (2.0, 1.0)}):
        with pytest.raises(SamplingOptionsError):
            SamplingOptions(**bad)
    with pytest.raises(SamplingOptionsError, match="unknown sampling option"):
        SamplingOptions.of({"guidance": 2.0})
    # A checkpoint's plain fields round-trip.
    assert SamplingOptions.of(options.as_dict()) == options and SamplingOptions.of(None) == SamplingOptions()


def test_settings_diff_names_the_changed_keys():
    assert settings_diff({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == ["b", "c"]
    assert settings_diff({"a": 1}, {"a": 1}) == []


def test_sample_grid_rows_of_one_class_and_fixed_noise():
    torch.manual_seed(0)
    denoiser = Denoiser(build_network("EPG-Nano/4").eval())
    settings = SamplingOptions(steps=2, seed=4).settings("heun")
    grid = sample_grid(denoiser, settings, 6, per_class=3)
    assert grid.shape == (3, 2 * 16 + 3 * 2, 3 * 16 + 4 * 2) and 0 <= grid.min() and grid.max() <= 1
    assert torch.equal(grid, sample_grid(denoiser, settings, 6, per_class=3))  # noise fixed by (seed, i)
    assert grid_labels(6, 10, per_class=3).tolist() == [0, 0, 0, 1, 1, 1]
    assert grid_labels(4, 3).tolist() == [0, 1, 2, 0] and grid_labels(4, None) is None
    picked = pick_grid(torch.zeros(10, 16, 16, 3, dtype=torch.uint8), 4)
    assert picked.shape == tile(torch.zeros(4, 3, 16, 16)).shape == (3, 2 * 16 + 3 * 2, 2 * 16 + 3 * 2)

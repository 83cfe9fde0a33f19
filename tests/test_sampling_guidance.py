"""CFG on the interval (0.19·s_H, 1.61·s_H], autoguidance and the NFE count of method.md §6.2–§6.3."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from epg.commands.sample import build_parser, sample_run
from epg.method.denoiser import Denoiser
from epg.sampling import Guidance, GuidedDenoiser, sample, sampling_sigmas
from epg.sampling.grid import GUIDANCE_INTERVAL

NULL = 10


class SpyNet(nn.Module):
    """F = `cond` for real labels and `uncond` for the null label, logging (σ', label) of every row it sees."""

    def __init__(self, image_size: int = 256, cond: float = 0.3, uncond: float = 0.1) -> None:
        super().__init__()
        self.config = SimpleNamespace(image_size=image_size)
        self.null_label = NULL
        self.cond, self.uncond = cond, uncond
        self.calls: list[tuple[int, list[float], list[int]]] = []

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.calls.append((x_in.shape[0], torch.exp(c_noise / 250).tolist(), y.tolist()))
        value = torch.where(y == NULL, self.uncond, self.cond).view(-1, 1, 1, 1)
        return value.expand_as(x_in).clone()


def _uncond_sigmas(net: SpyNet) -> list[float]:
    return [s for _, sigmas, ys in net.calls for s, y in zip(sigmas, ys, strict=True) if y == NULL]


@pytest.mark.parametrize("image_size", [256, 512])
def test_cfg_runs_on_exactly_the_six_interval_levels_and_counts_74_nfe(image_size: int) -> None:
    net = SpyNet(image_size)
    z, y = torch.randn(2, 3, 4, 4), torch.tensor([3, 7])
    result = sample(Denoiser(net, "x0"), z, y, guidance=2.5, return_info=True)
    shift = image_size / 64
    grid = sampling_sigmas(shift, 32)
    inside = [i for i, s in enumerate(grid) if 0.19 * shift < s <= 1.61 * shift]
    assert inside == [17, 18, 19, 20, 21, 22]
    if image_size == 256:
        assert [round(grid[i], 2) for i in inside] == [6.43, 4.70, 3.38, 2.39, 1.66, 1.13]
    uncond = _uncond_sigmas(net)
    # each interior level is evaluated twice (corrector of one step, predictor of the next), each row once
    assert len(uncond) == 2 * 6 * 2
    for i in inside:
        assert sum(math.isclose(s, grid[i], rel_tol=1e-5) for s in uncond) == 2 * 2
    assert result.nfe == 74
    # cond and uncond halves go through the network as one batch
    assert sorted({n for n, _, _ in net.calls}) == [2, 4]


def test_edm_form_counts_75_nfe_and_no_guidance_62() -> None:
    z, y = torch.randn(1, 3, 4, 4), torch.tensor([1])
    d = Denoiser(SpyNet(), "x0")
    assert sample(d, z, y, guidance=2.5, append_zero=True, return_info=True).nfe == 75
    assert sample(d, z, y, return_info=True).nfe == 62
    assert sample(d, z, y, guidance=1.0, return_info=True).nfe == 62  # w = 1 is a no-op: no extra calls
    assert sample(d, z, y, sampler="euler", steps=32, guidance=2.5, return_info=True).nfe == 31 + 6


def test_cfg_combines_raw_outputs_before_the_clamp() -> None:
    net = SpyNet(cond=0.3, uncond=0.1)
    fn = GuidedDenoiser(Denoiser(net, "x0"), torch.tensor([2]), Guidance(2.5), clamp=None)
    x = torch.zeros(1, 3, 2, 2)
    torch.testing.assert_close(fn(x, 4.0), torch.full_like(x, 0.1 + 2.5 * (0.3 - 0.1)))
    torch.testing.assert_close(fn(x, 10.0), torch.full_like(x, 0.3))  # outside (0.76, 6.44]: conditional only
    fn_clamped = GuidedDenoiser(Denoiser(SpyNet(cond=0.9, uncond=0.5), "x0"), torch.tensor([2]), Guidance(2.5))
    assert fn_clamped(x, 4.0).max().item() == 1.0  # 0.5 + 2.5·0.4 = 1.5, clamped afterwards
    assert fn.nfe == 3


def test_cfg_on_the_edm_parameterisation_equals_guiding_d() -> None:
    d = Denoiser(SpyNet(cond=0.3, uncond=0.1), "edm")
    x, s, w = torch.randn(1, 3, 2, 2), 2.0, 1.7
    fn = GuidedDenoiser(d, torch.tensor([4]), Guidance(w), clamp=None)
    sig = torch.full((1,), s)
    d_c = d(x, sig, torch.tensor([4]))
    d_u = d(x, sig, torch.tensor([NULL]))
    torch.testing.assert_close(fn(x, s), d_u + w * (d_c - d_u))


def test_interval_none_guides_every_level_and_custom_interval_is_shifted() -> None:
    d = Denoiser(SpyNet(), "x0")
    z, y = torch.randn(1, 3, 4, 4), torch.tensor([0])
    assert sample(d, z, y, guidance=Guidance(2.0, interval=None), steps=8, return_info=True).nfe == 2 * 2 * 7
    fn = GuidedDenoiser(d, y, Guidance(2.0, interval=(1.0, 2.0)))
    assert [fn.guided(s) for s in (4.0, 4.01, 8.0, 8.01)] == [False, True, True, False]


def test_autoguidance_uses_the_poor_model() -> None:
    good, poor = Denoiser(SpyNet(cond=0.4), "x0"), Denoiser(SpyNet(cond=0.1), "x0")
    y, x = torch.tensor([5]), torch.zeros(1, 3, 2, 2)
    fn = GuidedDenoiser(good, y, Guidance(0.5, kind="autoguidance", poor=poor), clamp=None)
    torch.testing.assert_close(fn(x, 2.0), torch.full_like(x, 0.4 + 0.5 * (0.4 - 0.1)))
    assert fn.nfe == 2 and len(poor.network.calls) == 1


def test_autoguidance_guides_every_level_by_default_and_cfg_only_in_the_band() -> None:
    """Official code: autog_forward guides every call, cfg_forward only inside (0.19, 1.61]·s_H (method.md §6.2)."""
    good, poor = Denoiser(SpyNet(cond=0.4), "x0"), Denoiser(SpyNet(cond=0.1), "x0")
    y, z = torch.tensor([5]), torch.randn(1, 3, 2, 2)
    auto = Guidance(0.5, kind="autoguidance", poor=poor)
    assert auto.interval is None and Guidance(2.0).interval == GUIDANCE_INTERVAL
    assert sample(good, z, y, guidance=auto, return_info=True).nfe == 2 * 62  # both models at all 62 evaluations
    banded = Guidance(0.5, GUIDANCE_INTERVAL, kind="autoguidance", poor=poor)
    assert sample(good, z, y, guidance=banded, return_info=True).nfe == 74  # as CFG: 12 extra calls in the band
    assert sample(good, z, y, guidance=Guidance(2.0), return_info=True).nfe == 74
    with pytest.raises(ValueError, match="must be"):
        Guidance(2.0, interval="paper")
    # epg sample: the default --interval follows the kind; an explicit one is kept
    common = ["ckpt", "--out", "o", "--num", "1", "--sampler", "heun"]

    def interval(argv: list[str]) -> tuple[float, float] | None:
        return sample_run(build_parser().parse_args(argv)).options.interval

    assert interval([*common, "--cfg", "2"]) == GUIDANCE_INTERVAL
    auto_args = [*common, "--autoguidance", "1", "--poor", "p"]
    assert interval(auto_args) is None
    assert interval([*auto_args, "--interval", "0.19,1.61"]) == GUIDANCE_INTERVAL


def test_guidance_errors_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="poor denoiser"):
        Guidance(2.0, kind="autoguidance")
    with pytest.raises(ValueError, match="unknown guidance kind"):
        Guidance(2.0, kind="pag")
    net = SpyNet()
    net.null_label = None
    with pytest.raises(ValueError, match="class-conditional"):
        sample(Denoiser(net, "x0"), torch.randn(1, 3, 2, 2), None, guidance=2.0)

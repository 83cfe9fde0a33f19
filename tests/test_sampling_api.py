"""The `epg.sampling.sample` entry point on a real (tiny) network: outputs, options, determinism, errors."""

from __future__ import annotations

import pytest
import torch

from epg.method.denoiser import Denoiser
from epg.nn.network import build_network
from epg.sampling import SampleResult, default_steps, sample, sampler_options


@pytest.fixture(scope="module")
def nets() -> dict[str, Denoiser]:
    torch.manual_seed(0)
    net = build_network("EPG-Nano/4").eval()
    return {"x0": Denoiser(net, "x0"), "edm": Denoiser(net, "edm")}


def _z(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_default_returns_a_tensor_and_info_on_request(nets: dict[str, Denoiser]) -> None:
    y = torch.tensor([0, 4, 9])
    x = sample(nets["x0"], _z(), y, steps=4)
    assert isinstance(x, torch.Tensor) and x.shape == (3, 3, 16, 16) and x.dtype == torch.float32
    info = sample(nets["x0"], _z(), y, steps=4, return_info=True, keep_trajectory=True)
    assert isinstance(info, SampleResult) and info.nfe == 6 and info.steps == 4 and info.sampler == "heun"
    torch.testing.assert_close(info.images, x)  # deterministic
    sigmas = [s for s, _ in info.trajectory]
    assert len(sigmas) == 3 and sigmas == sorted(sigmas, reverse=True) and sigmas[0] == pytest.approx(20.0)
    assert all(e.abs().max() <= 1.0 for _, e in info.trajectory)  # x̂0 estimates are clamped (§6.1)
    assert sample(nets["x0"], _z(), 4, steps=4, return_info=True).trajectory is None


def test_int_label_broadcasts(nets: dict[str, Denoiser]) -> None:
    y = torch.full((3,), 7)
    torch.testing.assert_close(sample(nets["x0"], _z(), 7, steps=3), sample(nets["x0"], _z(), y, steps=3))


def test_defaults_and_options_per_sampler() -> None:
    assert [default_steps(s) for s in ("heun", "euler", "stochastic", "consistency")] == [32, 50, 32, 1]
    assert sampler_options("heun") == {"append_zero": False}
    assert set(sampler_options("stochastic")) == {"append_zero", "s_churn", "s_min", "s_max", "s_noise", "variant"}
    assert sampler_options("stochastic")["variant"] == "official"
    assert sampler_options("consistency") == {"sigma_mid": None}


def test_stochastic_sampler_is_seeded_and_per_sample_generators_are_batch_independent(
    nets: dict[str, Denoiser],
) -> None:
    d, y = nets["x0"], torch.tensor([1, 2, 3])

    def run(z, y, gen):
        return sample(d, z, y, sampler="stochastic", steps=3, s_min=0.0, generator=gen)

    a = run(_z(), y, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, run(_z(), y, torch.Generator().manual_seed(5)))
    assert not torch.allclose(a, run(_z(), y, torch.Generator().manual_seed(6)))
    gens = [torch.Generator().manual_seed(100 + i) for i in range(3)]
    batch = run(_z(), y, gens)
    alone = run(_z()[1:2], y[1:2], [torch.Generator().manual_seed(101)])
    torch.testing.assert_close(batch[1:2], alone, atol=1e-4, rtol=1e-4)


def test_consistency_one_and_two_steps(nets: dict[str, Denoiser]) -> None:
    d, y = nets["edm"], torch.tensor([0, 1, 2])
    one = sample(d, _z(), y, sampler="consistency", return_info=True)
    assert one.nfe == 1 and one.images.abs().max() <= 1.0
    two = sample(
        d, _z(), y, sampler="consistency", steps=2, generator=torch.Generator().manual_seed(0), return_info=True
    )
    assert two.nfe == 2
    three = sample(d, _z(), y, sampler="consistency", steps=3, sigma_mid=[2.0, 0.5], return_info=True)
    assert three.nfe == 3
    with pytest.raises(ValueError, match="σ_mid"):
        sample(d, _z(), y, sampler="consistency", steps=3)
    with pytest.raises(ValueError, match="inside"):
        sample(d, _z(), y, sampler="consistency", steps=2, sigma_mid=100.0)


def test_autocast_runs_and_returns_float32(nets: dict[str, Denoiser]) -> None:
    x = sample(nets["x0"], _z(), torch.tensor([0, 1, 2]), steps=3, autocast=torch.bfloat16)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()


def test_sampling_loop_never_reads_device_values() -> None:
    # Meta tensors hold no values, so any .item()/bool()/.tolist() in the loop (a device sync on GPU) would raise.
    d = Denoiser(build_network("EPG-Nano/4").eval().to("meta"), "x0")
    z, y = torch.randn(3, 3, 16, 16, device="meta"), torch.tensor([0, 1, 2], device="meta")
    assert sample(d, z, y, steps=4, guidance=2.0, return_info=True).nfe == 8
    assert sample(d, z, y, sampler="stochastic", steps=4, s_min=0.0, return_info=True).nfe == 5  # last step Euler
    assert sample(d, z, y, sampler="stochastic", steps=4, variant="edm", return_info=True).nfe == 6
    assert sample(d, z, y, sampler="consistency", steps=2, return_info=True).images.device.type == "meta"


def test_errors_name_the_fix(nets: dict[str, Denoiser]) -> None:
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(nets["x0"], _z(), 0, sampler="dpm")
    with pytest.raises(ValueError, match="append_zero"):
        sample(nets["x0"], _z(), 0, sampler="heun", s_churn=10)
    with pytest.raises(TypeError, match="Denoiser"):
        sample(nets["x0"].network, _z(), 0)

"""Denoiser preconditioning and output parameterisations (method.md §1.3, §1.5)."""

import pytest
import torch

from epg import Denoiser
from epg.method.noise import c_in, c_noise


class Recorder(torch.nn.Module):
    """Fake raw network: returns a fixed tensor and records its inputs."""

    null_label = 7

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x_in, cn, y):
        self.seen = (x_in, cn, y)
        return self.out


def test_preconditioning_and_x0_output():
    out = torch.randn(2, 3, 8, 8)
    net = Recorder(out)
    den = Denoiser(net, "x0", image_size=256)
    x = torch.randn(2, 3, 8, 8)
    sigma = torch.tensor([0.5, 300.0])
    d = den(x, sigma, torch.tensor([1, 7]))
    assert torch.equal(d, out)
    x_in, cn, y = net.seen
    assert torch.allclose(x_in, x * c_in(sigma)[:, None, None, None])
    assert torch.allclose(cn, c_noise(sigma))
    assert den.shift == 4 and den.sigma_min == pytest.approx(0.008) and den.sigma_max == pytest.approx(320)
    assert den.null_label == 7


def test_edm_output_and_scalar_sigma():
    out = torch.randn(2, 3, 8, 8)
    den = Denoiser(Recorder(out), "edm", image_size=512)
    x = torch.randn(2, 3, 8, 8)
    s = 3.0
    d = den(x, torch.tensor(s), None)
    smin = 8 * 0.002
    c_skip = 0.25 / ((s - smin) ** 2 + 0.25)
    c_out = 0.5 * (s - smin) / (s**2 + 0.25) ** 0.5
    assert torch.allclose(d, c_skip * x + c_out * out, atol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="unknown parameterization"):
        Denoiser(Recorder(None), "eps", image_size=64)
    with pytest.raises(ValueError, match="pass image_size"):
        Denoiser(Recorder(None), "x0")

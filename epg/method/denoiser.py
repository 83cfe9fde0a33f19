"""Preconditioned denoiser D(x, σ') around a raw network F (method.md §1.3, §1.5)."""

from __future__ import annotations

import torch
from torch import nn

from epg.method.noise import (
    SIGMA_DATA,
    SIGMA_MAX,
    SIGMA_MIN,
    append_dims,
    c_in,
    c_noise,
    edm_coefficients,
    resolution_shift,
)

PARAMETERIZATIONS = ("x0", "edm")


class Denoiser(nn.Module):
    """D(x_noisy, σ', y) in data space from F(c_in·x, c_noise, y) with "x0" or "edm" output (method.md §1.5).

    ``sigma`` is the actual noise std in the image, i.e. shifted units (up to s_H·σ_max = 320 at 256 px).
    """

    def __init__(
        self,
        network: nn.Module,
        parameterization: str = "x0",
        image_size: int | None = None,
        sigma_data: float = SIGMA_DATA,
        sigma_min: float = SIGMA_MIN,
        sigma_max: float = SIGMA_MAX,
    ) -> None:
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {parameterization!r}: choose one of {PARAMETERIZATIONS}")
        if image_size is None:
            image_size = getattr(getattr(network, "config", None), "image_size", None)
            if image_size is None:
                raise ValueError("pass image_size: the network does not say its resolution")
        self.network = network
        self.parameterization = parameterization
        self.image_size = image_size
        self.sigma_data = sigma_data
        self.shift = resolution_shift(image_size)
        self.sigma_min = self.shift * sigma_min  # shifted σ'_min
        self.sigma_max = self.shift * sigma_max  # shifted σ'_max

    @property
    def null_label(self) -> int | None:
        """The network's unconditional label (None when it has no class table)."""
        return getattr(self.network, "null_label", None)

    def raw(self, x_noisy: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The network output F for a noisy image at shifted σ' (before the output parameterisation)."""
        sigma = self._per_sample(sigma, x_noisy)
        x_in = append_dims(c_in(sigma, self.sigma_data), x_noisy.ndim) * x_noisy
        return self.network(x_in.to(x_noisy.dtype), c_noise(sigma), y)

    def output(self, x_noisy: torch.Tensor, sigma: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """Apply the output parameterisation to a raw output F (x0: D = F; edm: c_skip·x + c_out·F)."""
        if self.parameterization == "x0":
            return raw
        sigma = self._per_sample(sigma, x_noisy)
        c_skip, c_out = edm_coefficients(sigma, self.sigma_min, self.sigma_data)
        return append_dims(c_skip, x_noisy.ndim) * x_noisy + append_dims(c_out, x_noisy.ndim) * raw

    def forward(self, x_noisy: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Denoised estimate D(x, σ') in data space."""
        return self.output(x_noisy, sigma, self.raw(x_noisy, sigma, y))

    @staticmethod
    def _per_sample(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.float()

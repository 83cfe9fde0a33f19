"""Post-hoc EMA with power-function profiles (method.md §13; EDM2, Karras et al. 2024, §3 and Appendix C).

A power-function EMA averages the weights θ_1..θ_t of the first t applied updates with the profile
p_t(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t]; its width relative to t is σ_rel. Training keeps a few such averages and
saves them now and then ("snapshots"); afterwards a least-squares combination of the snapshots approximates an
average of any other σ_rel (or length), using the closed-form inner products of power profiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def sigma_rel_of_gamma(gamma: float) -> float:
    """σ_rel of the profile τ^γ: its standard deviation over its length, √((γ+1) / ((γ+2)² (γ+3))) (EDM2 Eq. 3)."""
    if gamma <= -1:
        raise ValueError(f"a power-function EMA needs γ > −1, got {gamma}")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


# σ_rel(γ) rises from 0 at γ = −1 to its maximum here, then falls towards 0: the EMA branch is γ above it.
_GAMMA_AT_MAX = (math.sqrt(5) - 3) / 2  # root of d/dγ log σ_rel² = 1/(γ+1) − 2/(γ+2) − 1/(γ+3)
SIGMA_REL_MAX = math.sqrt((_GAMMA_AT_MAX + 1) / ((_GAMMA_AT_MAX + 2) ** 2 * (_GAMMA_AT_MAX + 3)))


def gamma_of_sigma_rel(sigma_rel: float) -> float:
    """γ with σ_rel(γ) = ``sigma_rel``: the largest root of γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²) = 0 (EDM2 App. C.2),
    i.e. σ² (γ+2)² (γ+3) = γ + 1 expanded; found by bisection on the falling branch γ ≥ (√5 − 3)/2."""
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(f"σ_rel must lie in (0, {SIGMA_REL_MAX:.4f}) for a power-function EMA, got {sigma_rel}")
    lo, hi = _GAMMA_AT_MAX, 1.0
    while sigma_rel_of_gamma(hi) > sigma_rel:
        lo, hi = hi, 2 * hi + 1
    for _ in range(200):  # σ_rel falls monotonically on [lo, hi]
        mid = (lo + hi) / 2
        if sigma_rel_of_gamma(mid) > sigma_rel:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-14 * max(1.0, hi):
            break
    return (lo + hi) / 2


def power_beta(t: int, gamma: float) -> float:
    """Decay of the update that makes the t-th average: β_t = (1 − 1/t)^(γ+1) (EDM2 Eq. 96); β_1 = 0 copies θ_1."""
    if t < 1:
        raise ValueError(f"the applied-update count starts at 1, got {t}")
    return (1.0 - 1.0 / t) ** (gamma + 1)


@torch.no_grad()
def power_ema_update_(target: nn.Module, online: nn.Module, t: int, gamma: float) -> None:
    """θ̂_t ← β_t θ̂_{t−1} + (1 − β_t) θ_t over parameters (buffers untouched), with t the applied-update count."""
    t_params = list(target.parameters())
    o_params = [p.detach() for p in online.parameters()]
    if len(t_params) != len(o_params):
        raise ValueError(f"EMA target has {len(t_params)} parameters but the online model {len(o_params)}")
    torch._foreach_lerp_(t_params, o_params, 1.0 - power_beta(t, gamma))


def discrete_weights(t: int, gamma: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Weights (w_1..w_t) of θ_1..θ_t in the t-th average: w_s = (s^(γ+1) − (s−1)^(γ+1)) / t^(γ+1), the mass of the
    continuous profile on [s−1, s] (unrolling the β_t recursion: ∏_{k>s} β_k = (s/t)^(γ+1))."""
    s = torch.arange(t + 1, dtype=dtype) / t
    cdf = s ** (gamma + 1)
    return cdf[1:] - cdf[:-1]


def profile_dot(t_a: torch.Tensor, gamma_a: torch.Tensor, t_b: torch.Tensor, gamma_b: torch.Tensor) -> torch.Tensor:
    """⟨p_a, p_b⟩ = ∫ p_a p_b dτ of two power profiles p(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t] (EDM2 App. C.3):

    (γ_a+1)(γ_b+1) m^(γ_a+γ_b+1) / ((γ_a+γ_b+1) t_a^(γ_a+1) t_b^(γ_b+1)) with m = min(t_a, t_b),
    computed in log space (t^γ overflows for long runs); arguments broadcast.
    """
    t_a, gamma_a, t_b, gamma_b = (torch.as_tensor(v, dtype=torch.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    m = torch.minimum(t_a, t_b)
    g = gamma_a + gamma_b + 1
    log = (
        torch.log(gamma_a + 1)
        + torch.log(gamma_b + 1)
        - torch.log(g)
        + g * torch.log(m)
        - (gamma_a + 1) * torch.log(t_a)
        - (gamma_b + 1) * torch.log(t_b)
    )
    return torch.exp(log)


DISCRETE_LIMIT = 20_000_000  # snapshots × updates up to which the exact discrete inner products are used


def gram(
    in_t: Sequence[float], in_sigma_rel: Sequence[float], out_t: float, out_sigma_rel: float, discrete: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, b, c): A_ij = ⟨p_i, p_j⟩, b_i = ⟨p_i, p_out⟩, c = ⟨p_out, p_out⟩ of the snapshot profiles and the target;
    closed form (:func:`profile_dot`) or, ``discrete``, the dot products of the per-update weights
    (:func:`discrete_weights`), which are the exact weights of the β_t recursion."""
    if len(in_t) != len(in_sigma_rel) or not len(in_t):
        raise ValueError(f"need one σ_rel per snapshot time, got {len(in_t)} times and {len(in_sigma_rel)} σ_rel")
    t = torch.tensor([float(v) for v in in_t], dtype=torch.float64)
    gamma = torch.tensor([gamma_of_sigma_rel(s) for s in in_sigma_rel], dtype=torch.float64)
    g_out = torch.tensor(gamma_of_sigma_rel(out_sigma_rel), dtype=torch.float64)
    t_out = torch.tensor(float(out_t), dtype=torch.float64)
    if not discrete:
        a = profile_dot(t[:, None], gamma[:, None], t[None, :], gamma[None, :])
        return a, profile_dot(t, gamma, t_out, g_out), profile_dot(t_out, g_out, t_out, g_out)
    length = int(max(t.max(), t_out))
    rows = torch.zeros(len(in_t) + 1, length, dtype=torch.float64)
    for i, (ti, gi) in enumerate([*zip(in_t, gamma.tolist(), strict=True), (out_t, float(g_out))]):
        rows[i, : int(ti)] = discrete_weights(int(ti), gi)
    full = rows @ rows.T
    return full[:-1, :-1], full[:-1, -1], full[-1, -1]


def solve_coefficients(
    in_t: Sequence[float],
    in_sigma_rel: Sequence[float],
    out_t: float,
    out_sigma_rel: float,
    discrete: bool | None = None,
) -> torch.Tensor:
    """Weights x of the snapshots (length t_i, width σ_rel,i) whose sum Σ x_i p_i best matches the profile of
    (``out_t``, ``out_sigma_rel``) in L2: A x = b with A_ij = ⟨p_i, p_j⟩, b_i = ⟨p_i, p_out⟩ (EDM2 App. C.3),
    solved by least squares in float64 (A is near-singular when snapshots are alike). ``discrete`` None uses the
    exact discrete inner products while snapshots × updates ≤ :data:`DISCRETE_LIMIT`, else the closed form (the
    two agree to O(γ/t), see the tests)."""
    if discrete is None:
        discrete = len(in_t) * max(max(in_t), out_t) <= DISCRETE_LIMIT
    a, b, _ = gram(in_t, in_sigma_rel, out_t, out_sigma_rel, discrete)
    return torch.linalg.lstsq(a, b[:, None], driver="gelsd").solution[:, 0]


def profile_error(
    coefficients: torch.Tensor,
    in_t: Sequence[float],
    in_sigma_rel: Sequence[float],
    out_t: float,
    out_sigma_rel: float,
    discrete: bool = False,
) -> float:
    """Relative L2 error ‖Σ x_i p_i − p_out‖ / ‖p_out‖ of a reconstruction's profile (closed form or discrete)."""
    a, b, c = gram(in_t, in_sigma_rel, out_t, out_sigma_rel, discrete)
    x = coefficients.to(torch.float64)
    return float(torch.sqrt(torch.clamp(x @ a @ x - 2 * x @ b + c, min=0.0)) / torch.sqrt(c))

"""Stage 2b: the ECT consistency (CM) loss: (t, r) pairs, ECT stage, pseudo-Huber metric, weight and the auxiliary
InfoNCE of the frozen stage-1 network (method.md §5.2–§5.4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from epg.method.curriculum import ect_sample_tr, ect_stage
from epg.method.denoiser import Denoiser
from epg.method.losses import gather_local_first, info_nce, pseudo_huber
from epg.method.noise import SIGMA_DATA, append_dims, c_in, c_noise
from epg.method.objectives.base import FinetuneLoss, Terms, class_labels, gaussian_like, nonfinite_span

CM_WEIGHTINGS = ("inverse_gap", "inverse_gap_scaled")


def consistency_weight(t: torch.Tensor, r: torch.Tensor, shift: float, weighting: str) -> torch.Tensor:
    """w = 1/(t′ − r′) (0 where t′ = r′) for unshifted float64 (t, r), as float32 (method.md §5.4).

    "inverse_gap" is the paper's w; "inverse_gap_scaled" multiplies it by √(t′² + σ_d²)/σ_d = 1/(σ_d·c_in(t′)), an
    option for short runs: the pseudo-Huber metric is essentially a norm, so the gradient reaching the network output
    F at t′ scales as w·c_out(t′) = σ_d·c_in(t′) for the denoising-like pairs (r′ = σ′_min), 40x smaller at t′ = 20
    than near t′ = 0; the factor makes it the same at every t′.
    """
    if weighting not in CM_WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}: choose one of {CM_WEIGHTINGS}")
    gap = shift * (t - r)  # shifted units, float64 so tiny gaps at late stages stay exact
    weight = torch.where(gap > 0, 1.0 / gap.clamp(min=1e-30), torch.zeros_like(gap))
    if weighting == "inverse_gap_scaled":
        weight = weight / (SIGMA_DATA * c_in(shift * t))
    return weight.float()


def _rng_devices(x: torch.Tensor) -> list[int]:
    """CUDA device indices whose RNG state must be forked along with the CPU's."""
    if x.device.type != "cuda":
        return []
    return [x.device.index if x.device.index is not None else torch.cuda.current_device()]


def shared_dropout_pair(
    online: Denoiser,
    target: Denoiser,
    x_t: torch.Tensor,
    t: torch.Tensor,
    x_r: torch.Tensor,
    r: torch.Tensor,
    y: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(D_θ(x_t, t′), sg[D_θ⁻(x_r, r′)]) with identical dropout masks in both passes (method.md §5.2).

    The RNG state is forked around the online pass and restored for the target pass, so the target draws the same
    masks (both networks must be in train mode and call dropout in the same order on same-shaped tensors).
    """
    with torch.random.fork_rng(devices=_rng_devices(x_t)):
        d_t = online(x_t, t, y)
    with torch.no_grad():
        d_r = target(x_r, r, y)
    return d_t, d_r


def aux_features(aux_net: nn.Module, x: torch.Tensor, sigma_min_shifted: float) -> torch.Tensor:
    """Projector output z of the frozen stage-1 network at time σ′_min: W(c_in(σ′_min)·x, c_noise(σ′_min)) (§5.4)."""
    sigma = torch.full((x.shape[0],), sigma_min_shifted, device=x.device, dtype=torch.float32)
    x_in = append_dims(c_in(sigma), x.ndim) * x
    z, _ = aux_net(x_in.to(x.dtype), c_noise(sigma))
    return z


@dataclass(kw_only=True)
class ConsistencyTerms(Terms):
    """One ECT loss evaluation (``loss``: the batch mean of w·ℓ + aux_weight·ℓ_aux) and its per-sample
    diagnostics."""

    consistency: torch.Tensor  # (B,) w·ℓ (pseudo-Huber metric times 1/(t′ − r′))
    aux: torch.Tensor  # (B,) InfoNCE of the frozen stage-1 features (zeros when there is no aux net)
    weight: torch.Tensor  # (B,) 1/(t′ − r′), 0 where t′ = r′
    t: torch.Tensor  # (B,) unshifted t
    r: torch.Tensor  # (B,) unshifted r
    stage: int  # the ECT stage a of this evaluation
    per_sample: torch.Tensor  # (B,) w·ℓ + aux_weight·ℓ_aux


class ConsistencyLoss(FinetuneLoss):
    """The ECT loss mean(w·ℓ + aux_weight·ℓ_aux) of method.md §5.3–§5.4; the defaults are the paper's.

    Args:
        p_mean, p_std: ln t ~ N(p_mean, p_std²), unshifted (§5.3).
        ect_d0, ect_d1, ect_delta: ECT stage a = δ + ⌊(k − (d₀ − d₁))/d₁⌋ for k ≥ d₀ applied updates, else δ
            (:func:`~epg.method.curriculum.ect_stage`); ``ect_delta`` 0 makes the pure denoising warm-up a = 0
            reachable (r = σ_min, no auxiliary term).
        ect_q, ect_kappa, ect_b: r = max(σ_min, t(1 − q^−a(1 + κ·sig(−b·t)))) (§5.3).
        huber_c: c of the pseudo-Huber metric (§5.4).
        weighting: "inverse_gap" (the paper's 1/(t′ − r′)) or "inverse_gap_scaled" (:func:`consistency_weight`).
        aux_weight, aux_tau: weight and temperature of the auxiliary InfoNCE on the frozen stage-1 network (§5.4).
    """

    parameterization = "edm"
    sampler = "consistency"  # one step (method.md §6.5)
    needs_target = True  # stop-gradient target D_θ⁻, a copy of the online weights (§5.2)
    needs_aux = True  # the frozen stage-1 encoder + projector of the auxiliary InfoNCE (§5.4)
    betas = (0.9, 0.99)  # §5.5
    weight_decay = 0.03
    lr_schedule = "steps"
    grad_clip = None

    def __init__(
        self,
        p_mean: float = -0.4,
        p_std: float = 1.6,
        ect_d0: int = 100_000,
        ect_d1: int = 100_000,
        ect_delta: int = 1,
        ect_q: float = 2.0,
        ect_kappa: float = 8.0,
        ect_b: float = 1.0,
        huber_c: float = 0.06,
        weighting: str = "inverse_gap",
        aux_weight: float = 1.0,
        aux_tau: float = 0.1,
    ) -> None:
        if weighting not in CM_WEIGHTINGS:
            raise ValueError(f"weighting must be one of {CM_WEIGHTINGS}, got {weighting!r}")
        self.p_mean, self.p_std = p_mean, p_std
        self.ect_d0, self.ect_d1, self.ect_delta = ect_d0, ect_d1, ect_delta
        self.ect_q, self.ect_kappa, self.ect_b = ect_q, ect_kappa, ect_b
        self.huber_c, self.weighting, self.aux_weight, self.aux_tau = huber_c, weighting, aux_weight, aux_tau

    def stage(self, updates: int) -> int:
        """The ECT stage a after ``updates`` applied optimizer updates (method.md §5.3)."""
        return ect_stage(updates, self.ect_d0, self.ect_d1, self.ect_delta)

    def __call__(
        self, module: nn.Module, batch: tuple[torch.Tensor, ...], updates: int, generator: torch.Generator
    ) -> ConsistencyTerms:
        """The loss of ``batch`` = (x0, y, …) at the ECT stage of ``updates``, with the online denoiser, the target
        ``module.target_net`` and the frozen stage-1 ``module.aux_net`` (:meth:`terms`)."""
        target = module.denoiser(module.target_net)
        x0, y = batch[0], class_labels(module, batch)
        return self.terms(module.denoiser(), target, module.aux_net, x0, y, self.stage(updates), generator)

    def terms(
        self,
        denoiser: Denoiser,
        target: Denoiser,
        aux_net: nn.Module | None,
        x0: torch.Tensor,
        y: torch.Tensor | None,
        stage: int,
        generator: torch.Generator | None = None,
    ) -> ConsistencyTerms:
        """The loss at ECT stage ``stage`` (see :meth:`stage`).

        ``denoiser`` and ``target`` use the "edm" output; ``target`` holds a copy of the online weights (stop-gradient).
        ``aux_net`` is the frozen stage-1 encoder + projector (eval mode); None, ``aux_weight`` 0 or stage a = 0 drops
        that term. Negatives of the auxiliary InfoNCE are gathered across ranks.
        """
        t, r = ect_sample_tr(
            x0.shape[0], stage, self.p_mean, self.p_std, self.ect_q, self.ect_kappa, self.ect_b,
            generator=generator, device=x0.device,
        )  # fmt: skip
        t_shifted, r_shifted = (denoiser.shift * t).float(), (denoiser.shift * r).float()
        eps = gaussian_like(x0, generator)  # one ε shared by both points (§5.4 step 1)
        x_t = x0 + append_dims(t_shifted, x0.ndim) * eps
        x_r = x0 + append_dims(r_shifted, x0.ndim) * eps
        d_t, d_r = shared_dropout_pair(denoiser, target, x_t, t_shifted, x_r, r_shifted, y)
        sq_dist = (d_t.float() - d_r.float()).square().flatten(1).sum(1)
        weight = consistency_weight(t, r, denoiser.shift, self.weighting)
        consistency = weight * pseudo_huber(sq_dist, self.huber_c)
        if aux_net is not None and self.aux_weight != 0 and stage != 0:  # active whenever a ≠ 0 (§5.4 step 6)
            f1 = aux_features(aux_net, d_t, denoiser.sigma_min)
            with torch.no_grad():
                f2 = aux_features(aux_net, x0, denoiser.sigma_min)
            aux = info_nce(f1, gather_local_first(f2), self.aux_tau)
        else:
            aux = torch.zeros_like(consistency)
        per_sample = consistency + self.aux_weight * aux
        t, r = t.float(), r.float()
        logs = {"ect_stage": float(stage), "consistency": consistency.detach().mean(), "aux": aux.detach().mean()}
        span = nonfinite_span(per_sample, denoiser.shift * t)
        return ConsistencyTerms(
            loss=per_sample.mean(), logs=logs, span=span, label="t'", consistency=consistency, aux=aux,
            weight=weight, t=t, r=r, stage=stage, per_sample=per_sample,
        )  # fmt: skip

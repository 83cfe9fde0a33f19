"""Stage 1: the representation-consistency (RCM) loss, contrastive + consistency InfoNCE on noisy pixels, with its
curriculum, pair draw and temperatures (method.md §3.2–§3.8)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from epg.method.curriculum import cosine_tau_max, interpolated_tau, num_scales, pair_sigmas
from epg.method.losses import gather_local_first, info_nce
from epg.method.noise import c_in, c_noise
from epg.method.objectives.base import Objective, Terms, gaussian_like, seeded_generator

TAU_SCHEDULES = ("constant", "interpolated", "cosine")


def represent(net: nn.Module, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """h of a stage-1 network for noisy images ``x`` at per-sample shifted levels ``sigma`` (method.md §1.5, §3.4)."""
    return net.encoder.representation(x * c_in(sigma).to(x.dtype).view(-1, 1, 1, 1), c_noise(sigma))


def contrastive_terms(
    z1: torch.Tensor, z2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, tau: float
) -> torch.Tensor:
    """Per-sample NCE(z1 → k2) + NCE(z2 → k1) of the two views against the target's keys (method.md §3.4, §3.6)."""
    return info_nce(z1, gather_local_first(k2), tau) + info_nce(z2, gather_local_first(k1), tau)


def consistency_terms(h_a: torch.Tensor, h_b: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-sample NCE(h_a → sg[h_b]) between the adjacent noise levels σ_a > σ_b (method.md §3.4, §3.6)."""
    return info_nce(h_a, gather_local_first(h_b), tau)


@dataclass(kw_only=True)
class RCMTerms(Terms):
    """One stage-1 loss evaluation (``loss``: the batch mean of contrastive + consistency) and the two terms' batch
    means."""

    contrastive: torch.Tensor  # detached batch mean
    consistency: torch.Tensor  # detached batch mean


class RCMLoss(Objective):
    """Contrastive + representation-consistency InfoNCE of method.md §3; the defaults are the released config's.

    Args:
        tau_contrastive: τ_c of the contrastive term (method.md §3.6).
        tau_consistency: τ_r of the consistency term when ``tau_schedule`` is "constant".
        tau_schedule: "constant" (τ_r), "interpolated" (τ(σ_a) from tau_min to tau_max) or "cosine" (interpolated
            with τ_max cosine-annealed from tau_start to tau_end) (method.md §3.6; the paper's values are unknown).
        curriculum_n0, curriculum_n1: N₀ and N₁ of the discretization curriculum (method.md §3.2); its K is the
            module's ``total_steps``.
    """

    def __init__(
        self,
        tau_contrastive: float = 0.2,
        tau_consistency: float = 0.1,
        tau_schedule: str = "constant",
        tau_min: float = 0.1,
        tau_max: float = 0.2,
        tau_start: float = 0.4,
        tau_end: float = 0.2,
        curriculum_n0: int = 20,
        curriculum_n1: int = 1280,
    ) -> None:
        if tau_schedule not in TAU_SCHEDULES:
            raise ValueError(f"tau_schedule must be one of {TAU_SCHEDULES}, got {tau_schedule!r}")
        if not 0 < curriculum_n0 <= curriculum_n1:
            raise ValueError(f"need 0 < curriculum_n0 <= curriculum_n1, got {curriculum_n0} and {curriculum_n1}")
        self.tau_contrastive, self.tau_consistency, self.tau_schedule = tau_contrastive, tau_consistency, tau_schedule
        self.tau_min, self.tau_max, self.tau_start, self.tau_end = tau_min, tau_max, tau_start, tau_end
        self.curriculum_n0, self.curriculum_n1 = curriculum_n0, curriculum_n1

    # ---- schedules and draws ----
    def num_scales(self, updates: int, total_steps: int) -> int:
        """N(k) of the curriculum after ``updates`` applied updates of a ``total_steps`` run (method.md §3.2)."""
        return num_scales(updates, total_steps, self.curriculum_n0, self.curriculum_n1)

    def consistency_tau(self, sigma_a: float, updates: int, total_steps: int) -> float:
        """τ_r for the unshifted noisier level σ_a after ``updates`` applied updates (method.md §3.6)."""
        if self.tau_schedule == "constant":
            return self.tau_consistency
        tau_max = self.tau_max
        if self.tau_schedule == "cosine":
            tau_max = cosine_tau_max(updates, total_steps, self.tau_start, self.tau_end)
        return float(interpolated_tau(sigma_a, self.tau_min, tau_max))

    @staticmethod
    def draw_pair_index(n_scales: int, seed: int, step: int, device: torch.device | str = "cpu") -> int:
        """n ~ U{0, …, N−2}, seeded by (seed, step) and broadcast from rank 0 (method.md §3.3)."""
        index = int(torch.randint(n_scales - 1, (1,), generator=seeded_generator(seed, step, 0)))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            value = torch.tensor([index], device=device)  # on the device: NCCL broadcasts CUDA tensors only
            dist.broadcast(value, src=0)
            index = int(value.item())
        return index

    @staticmethod
    def noise_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """ε ~ N(0, I) shaped like ``x``: one draw per sample for all four noisy inputs (method.md §3.4)."""
        return gaussian_like(x, generator)

    # ---- the loss ----
    def represent(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """h of ``net`` at shifted levels ``sigma`` (:func:`represent`)."""
        return represent(net, x, sigma)

    def __call__(
        self, module: nn.Module, batch: tuple[torch.Tensor, ...], updates: int, generator: torch.Generator
    ) -> RCMTerms:
        """The loss of ``batch`` = (x0, v1, v2, …) for ``module.online`` and its EMA ``module.target``.

        The curriculum's N(k) and τ_r follow ``updates`` and ``module.hparams.total_steps``; the pair index is drawn
        per optimizer step (``module.global_step``, skipped steps included; the micro-batches of one step share it,
        as the paper's global batch does), the noise ε from ``generator``.
        """
        x0, v1, v2 = batch[0], batch[1], batch[2]
        total, shift = module.hparams.total_steps, module.shift
        n_scales = self.num_scales(updates, total)
        index = self.draw_pair_index(n_scales, module.hparams.seed, module.global_step, x0.device)
        sigma_a, sigma_b, sigma_0 = pair_sigmas(index, n_scales, shift)
        tau_r = self.consistency_tau(sigma_a / shift, updates, total)
        eps = self.noise_like(x0, generator)
        terms = self.terms(module.online, module.target, x0, v1, v2, eps, sigma_a, sigma_b, sigma_0, tau_r)
        scalars = {"num_scales": n_scales, "pair_index": index, "sigma_a": sigma_a, "sigma_b": sigma_b}
        terms.logs.update({name: float(value) for name, value in scalars.items()}, tau_consistency=float(tau_r))
        return terms

    def terms(
        self,
        online: nn.Module,
        target: nn.Module,
        x0: torch.Tensor,
        v1: torch.Tensor,
        v2: torch.Tensor,
        eps: torch.Tensor,
        sigma_a: float,
        sigma_b: float,
        sigma_0: float,
        tau_r: float,
    ) -> RCMTerms:
        """Batch means of the contrastive and consistency terms and their sum (method.md §3.4, §3.6, §3.8).

        Shifted noise levels; ``eps`` is the one noise draw per sample shared by u1, u2, x_a and x_b.
        """
        b = x0.shape[0]
        sig = lambda value, n: torch.full((n,), value, device=x0.device, dtype=torch.float32)  # noqa: E731
        u1, u2 = v1 + sigma_0 * eps, v2 + sigma_0 * eps
        x_a, x_b = x0 + sigma_a * eps, x0 + sigma_b * eps
        # One encoder pass for the three online inputs with gradient (the encoder has no batch statistics); the
        # projector sees each input separately, so its BN statistics are per input as in separate passes.
        h1, h2, h_a = self.represent(
            online, torch.cat([u1, u2, x_a]), torch.cat([sig(sigma_0, 2 * b), sig(sigma_a, b)])
        ).split(b)
        projector = online.projection_head
        z1, z2 = projector(h1), projector(h2)
        with torch.no_grad():
            h_b = self.represent(online, x_b, sig(sigma_b, b))  # key: online network, stop-gradient (§10.4)
            # The official online pass always ends in the projector, so x_a and x_b update its BN running
            # statistics too (u1, u2, x_a, x_b: method.md §3.8 step 4); the frozen auxiliary network of the CM uses
            # them (§5.4). Their z is unused, so these passes need no gradient and no output layer.
            projector.track_statistics(h_a)
            projector.track_statistics(h_b)
            t1, t2 = self.represent(target, torch.cat([u1, u2]), sig(sigma_0, 2 * b)).split(b)
            k1, k2 = target.projection_head(t1), target.projection_head(t2)
        contrastive = contrastive_terms(z1, z2, k1, k2, self.tau_contrastive)
        consistency = consistency_terms(h_a, h_b, tau_r)
        loss = (contrastive + consistency).mean()
        contrastive, consistency = contrastive.mean().detach(), consistency.mean().detach()
        logs: dict[str, torch.Tensor | float] = {"loss_contrastive": contrastive, "loss_consistency": consistency}
        span = (min(sigma_a, sigma_b), max(sigma_a, sigma_b))
        return RCMTerms(loss=loss, logs=logs, span=span, contrastive=contrastive, consistency=consistency)

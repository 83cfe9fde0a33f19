"""The training losses as small objects that own their hyper-parameters (the paper's values as defaults, given here
only), draws and weights, selected in a config by ``class_path`` under ``model.init_args.loss``; the loss class is
the objective. Both modules call them the same way, ``loss(module, batch, updates, generator) -> Terms``:

- :class:`RCMLoss` (stage 1, method.md §3), in :mod:`epg.method.objectives.rcm`;
- :class:`DiffusionLoss` (stage 2 DM, §4), in :mod:`epg.method.objectives.diffusion`;
- :class:`ConsistencyLoss` (stage 2 ECT CM, §5), in :mod:`epg.method.objectives.consistency`.

The schedules and draws they call (N(k), the stage-1 pair, the DM σ draw, the ECT stage and (t, r) sampler) are in
:mod:`epg.method.curriculum`; InfoNCE and the pseudo-Huber metric in :mod:`epg.method.losses`.
"""

from epg.method.objectives.base import (
    MOVED_KEYS,
    FinetuneLoss,
    Objective,
    Terms,
    build_loss,
    class_labels,
    gaussian_like,
    loss_class,
    nonfinite_span,
    seeded_generator,
)
from epg.method.objectives.consistency import (
    CM_WEIGHTINGS,
    ConsistencyLoss,
    ConsistencyTerms,
    aux_features,
    consistency_weight,
    shared_dropout_pair,
)
from epg.method.objectives.diffusion import (
    DM_WEIGHTINGS,
    SIGMA_BUCKETS,
    DiffusionLoss,
    DiffusionTerms,
    denoising_mse,
    diffusion_weight,
    dm_loss_weight,
    sigma_buckets,
)
from epg.method.objectives.rcm import TAU_SCHEDULES, RCMLoss, RCMTerms, consistency_terms, contrastive_terms, represent

FINETUNE_LOSSES: tuple[type[FinetuneLoss], ...] = (DiffusionLoss, ConsistencyLoss)  # the stage-2 losses shipped


def sampler_for(parameterization: str) -> str:
    """The default sampler of the shipped stage-2 loss that trains a ``parameterization`` ("x0" or "edm") network:
    what a network file or an official checkpoint, which name no loss, is sampled with."""
    for loss in FINETUNE_LOSSES:
        if loss.parameterization == parameterization:
            return loss.sampler
    raise ValueError(f"no stage-2 loss trains a {parameterization!r} output; choose one of x0, edm")


__all__ = [
    "CM_WEIGHTINGS",
    "DM_WEIGHTINGS",
    "FINETUNE_LOSSES",
    "MOVED_KEYS",
    "SIGMA_BUCKETS",
    "TAU_SCHEDULES",
    "ConsistencyLoss",
    "ConsistencyTerms",
    "DiffusionLoss",
    "DiffusionTerms",
    "FinetuneLoss",
    "Objective",
    "RCMLoss",
    "RCMTerms",
    "Terms",
    "aux_features",
    "build_loss",
    "class_labels",
    "consistency_terms",
    "consistency_weight",
    "contrastive_terms",
    "denoising_mse",
    "diffusion_weight",
    "dm_loss_weight",
    "gaussian_like",
    "loss_class",
    "nonfinite_span",
    "represent",
    "sampler_for",
    "seeded_generator",
    "shared_dropout_pair",
    "sigma_buckets",
]

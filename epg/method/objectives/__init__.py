"""The training losses as small objects that own their hyper-parameters (the paper's values as defaults, given here
only), noise draws and weights, selected in a config by ``class_path`` under ``model.init_args.loss``:

- :class:`RCMLoss` (stage 1, method.md §3), in :mod:`epg.method.objectives.rcm`;
- :class:`DiffusionLoss` (stage 2 DM, §4), in :mod:`epg.method.objectives.diffusion`;
- :class:`ConsistencyLoss` (stage 2 ECT CM, §5), in :mod:`epg.method.objectives.consistency`.

The schedules and draws they call (N(k), the stage-1 pair, the DM σ draw, the ECT stage and (t, r) sampler) are in
:mod:`epg.method.curriculum`; InfoNCE and the pseudo-Huber metric in :mod:`epg.method.losses`.
"""

from epg.method.objectives.base import (
    LEGACY_KEYS,
    FinetuneLoss,
    Objective,
    build_loss,
    gaussian_like,
    legacy_key_message,
    legacy_loss,
    loss_kind,
    loss_spec,
    migrate_hparams,
    split_legacy,
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
    DiffusionLoss,
    DiffusionTerms,
    denoising_mse,
    diffusion_weight,
    dm_loss_weight,
)
from epg.method.objectives.rcm import TAU_SCHEDULES, RCMLoss, RCMTerms, consistency_terms, contrastive_terms, represent

# The stage-2 loss of each objective string (checkpoints' hyper_parameters["objective"]).
OBJECTIVE_LOSSES: dict[str, type[FinetuneLoss]] = {"diffusion": DiffusionLoss, "consistency": ConsistencyLoss}

__all__ = [
    "CM_WEIGHTINGS",
    "DM_WEIGHTINGS",
    "LEGACY_KEYS",
    "OBJECTIVE_LOSSES",
    "TAU_SCHEDULES",
    "ConsistencyLoss",
    "ConsistencyTerms",
    "DiffusionLoss",
    "DiffusionTerms",
    "FinetuneLoss",
    "Objective",
    "RCMLoss",
    "RCMTerms",
    "aux_features",
    "build_loss",
    "consistency_terms",
    "consistency_weight",
    "contrastive_terms",
    "denoising_mse",
    "diffusion_weight",
    "dm_loss_weight",
    "gaussian_like",
    "legacy_key_message",
    "legacy_loss",
    "loss_kind",
    "loss_spec",
    "migrate_hparams",
    "represent",
    "shared_dropout_pair",
    "split_legacy",
]

"""The loss objects in modules, configs and checkpoints, and the flat loss keys of older versions (issue 13):
old keyword arguments and checkpoints map onto the loss objects (`epg fit` refuses the old keys: test_cli_app)."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
import yaml

from epg.checkpoint import load_denoiser
from epg.lightning.finetune import FinetuneModule
from epg.lightning.pretrain import PretrainModule
from epg.method.objectives import (
    LEGACY_KEYS,
    OBJECTIVE_LOSSES,
    ConsistencyLoss,
    DiffusionLoss,
    RCMLoss,
    migrate_hparams,
)
from tests.test_finetune_module import NANO, make, stage1  # noqa: F401  (stage1 is a fixture)


def old_hparams(module: L.LightningModule) -> dict:
    """The hyper-parameters a module of the flat-key version saved: every loss setting as a model argument (stage 2:
    both objectives' keys, the other objective's at its defaults), no ``loss``."""
    hp = {k: v for k, v in dict(module.hparams).items() if k != "loss"}
    if "objective" not in hp:
        return hp | module.loss.init_args()
    other = "diffusion" if hp["objective"] == "consistency" else "consistency"
    for objective in (other, hp["objective"]):  # p_mean, p_std: the module's objective's values (one key for both)
        loss = module.loss if objective == hp["objective"] else OBJECTIVE_LOSSES[objective]()
        hp |= {old: getattr(loss, new) for old, new in LEGACY_KEYS[objective].items()}
    return hp


def test_the_paper_values_are_the_loss_defaults():
    assert DiffusionLoss().init_args() == {
        "p_mean": -1.2,
        "p_std": 1.6,
        "sigma_grid": 1280,
        "weighting": "inverse_spacing",
    }
    cm = ConsistencyLoss()
    assert (cm.p_mean, cm.p_std, cm.ect_q, cm.ect_kappa, cm.ect_b, cm.huber_c) == (-0.4, 1.6, 2.0, 8.0, 1.0, 0.06)
    assert (cm.ect_d0, cm.ect_d1, cm.ect_delta, cm.weighting, cm.aux_weight, cm.aux_tau) == (
        100_000, 100_000, 1, "inverse_gap", 1.0, 0.1)  # fmt: skip
    rcm = RCMLoss()
    assert (rcm.tau_contrastive, rcm.tau_consistency, rcm.curriculum_n0, rcm.curriculum_n1) == (0.2, 0.1, 20, 1280)
    assert ConsistencyLoss(p_mean=1.0).spec() == {
        "class_path": "epg.method.objectives.ConsistencyLoss",
        "init_args": cm.init_args() | {"p_mean": 1.0},
    }


def test_modules_keep_the_loss_as_a_plain_spec_and_the_objective(stage1):  # noqa: F811
    path, _ = stage1
    cm = make(path, "consistency", loss=ConsistencyLoss(p_mean=1.0, ect_d0=4))
    assert cm.hparams.objective == "consistency" and cm.parameterization == "edm"
    assert cm.hparams.loss == ConsistencyLoss(p_mean=1.0, ect_d0=4).spec()
    assert not set(cm.hparams) & set(LEGACY_KEYS["consistency"])
    dm = make(path)  # no loss: the objective's, with the paper's values
    assert dm.loss == DiffusionLoss() and dm.parameterization == "x0"
    assert make(path, loss={"class_path": "epg.method.objectives.DiffusionLoss"}).loss == DiffusionLoss()
    pre = PretrainModule(preset=NANO, loss=RCMLoss(tau_contrastive=0.3))
    assert pre.hparams.loss == RCMLoss(tau_contrastive=0.3).spec()
    with pytest.raises(ValueError, match="objective: consistency"):
        make(path, "diffusion", loss=ConsistencyLoss())
    with pytest.raises(ValueError, match="must be a RCMLoss"):
        PretrainModule(preset=NANO, loss=DiffusionLoss())


def test_old_keyword_arguments_map_into_the_loss_with_a_deprecation_warning(stage1):  # noqa: F811
    path, _ = stage1
    with pytest.warns(DeprecationWarning, match="moved into the loss object"):
        m = make(path, "consistency", p_mean=1.0, ect_d0=4, ect_weighting="inverse_gap_scaled", loss_weighting="edm")
    assert m.loss == ConsistencyLoss(p_mean=1.0, ect_d0=4, weighting="inverse_gap_scaled")  # the DM's key is dropped
    with pytest.warns(DeprecationWarning):
        dm = make(path, p_mean=None, loss_weighting="uniform", huber_c=0.1)  # p_mean None: the objective's default
    assert dm.loss == DiffusionLoss(weighting="uniform")
    with pytest.warns(DeprecationWarning):
        pre = PretrainModule(preset=NANO, tau_schedule="cosine", curriculum_n0=2, curriculum_n1=16)
    assert pre.loss == RCMLoss(tau_schedule="cosine", curriculum_n0=2, curriculum_n1=16)
    with pytest.raises(ValueError, match="loss.init_args only"):
        make(path, loss=DiffusionLoss(), p_mean=0.0)
    with pytest.raises(TypeError, match="p_mena"):
        make(path, p_mena=0.0)
    with pytest.raises(TypeError, match="p_mean"):
        PretrainModule(preset=NANO, p_mean=0.0)  # a stage-2 key


def _fit_and_save(module: L.LightningModule, tmp_path, batch) -> str:
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*batch), batch_size=4)
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, data)
    path = str(tmp_path / "run.ckpt")
    trainer.save_checkpoint(path)
    return path


def _as_old_checkpoint(path: str, module: L.LightningModule, cli: bool = False) -> str:
    """Rewrite a checkpoint's hyper-parameters as the flat-key version wrote them (``cli``: as under LightningCLI)."""
    ckpt = torch.load(path, weights_only=True)
    ckpt["hyper_parameters"] = old_hparams(module)
    if cli:
        ckpt["hyper_parameters"] |= {
            "_class_path": f"{type(module).__module__}.{type(module).__name__}",
            "_instantiator": "lightning.pytorch.cli.instantiate_module",
        }
    old = path.replace(".ckpt", "_old.ckpt")
    torch.save(ckpt, old)
    return old


@pytest.mark.parametrize("objective", ["diffusion", "consistency"])
@pytest.mark.parametrize("cli", [False, True])
def test_checkpoints_of_the_flat_keys_still_load(tmp_path, stage1, objective, cli):  # noqa: F811
    path, _ = stage1
    loss = ConsistencyLoss(p_mean=1.0, ect_d0=2, ect_d1=2, weighting="inverse_gap_scaled", ect_delta=0)
    loss = loss if objective == "consistency" else DiffusionLoss(p_mean=0.0, weighting="uniform")
    torch.manual_seed(0)
    module = make(path, objective, loss=loss, sample_every_n_val=0)
    x = torch.randn(8, 3, 16, 16) * 0.5
    new = _fit_and_save(module, tmp_path, (x, torch.arange(8) % 10))
    old = _as_old_checkpoint(new, module, cli)
    # epg.checkpoint reads the objective, network and EMA rates, which did not move.
    a, b = load_denoiser(new, ema=0), load_denoiser(old, ema=0)
    a, b = a.denoiser.eval(), b.denoiser.eval()
    assert a.parameterization == b.parameterization == module.parameterization
    sigma, y = torch.full((2,), 0.5), torch.tensor([1, 2])
    assert torch.equal(a(x[:2], sigma, y), b(x[:2], sigma, y))
    # Lightning's load_from_checkpoint maps the flat keys into the loss object.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loaded = FinetuneModule.load_from_checkpoint(old)
    assert loaded.loss == loss and loaded.hparams.loss == loss.spec() and loaded.updates == module.updates
    assert torch.equal(loaded.net.decoder.out.weight, module.net.decoder.out.weight)


def test_stage1_checkpoints_of_the_flat_keys_still_load(tmp_path):
    torch.manual_seed(0)
    module = PretrainModule(preset=NANO, total_steps=8, warmup_steps=2, loss=RCMLoss(curriculum_n0=2, curriculum_n1=16))
    x = torch.randn(8, 3, 16, 16) * 0.5
    new = _fit_and_save(module, tmp_path, (x, x.flip(-1), x + 0.1, torch.arange(8) % 10))
    old = _as_old_checkpoint(new, module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loaded = PretrainModule.load_from_checkpoint(old)
    assert loaded.loss == module.loss and loaded.num_scales_at(3) == module.num_scales_at(3)
    assert migrate_hparams(torch.load(old, weights_only=True)["hyper_parameters"]) == dict(module.hparams)


def _printed(capsys, *args: str) -> dict:
    from epg.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["fit", *args, "--print_config"])
    assert exit_.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_shows_the_loss(capsys):
    from pathlib import Path

    root = Path(__file__).parents[1]
    cm = str(root / "configs/finetune/epg_l16_cm_in256.yaml")
    loss = _printed(capsys, "-c", cm)["model"]["init_args"]["loss"]
    assert loss["class_path"] == "epg.method.objectives.ConsistencyLoss"
    assert loss["init_args"] == ConsistencyLoss().init_args()  # the paper row: every value the paper's
    pre = _printed(capsys, "-c", str(root / "configs/pretrain/rcm_b16_in256.yaml"))["model"]["init_args"]["loss"]
    assert pre == RCMLoss().spec()

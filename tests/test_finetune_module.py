"""FinetuneModule without a Trainer: initialisation (§2.3), optimiser, clipping, EMA/target, modes, ECT wiring."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from epg.lightning.finetune import FinetuneModule
from epg.lightning.pretrain import PretrainModule
from epg.method.noise import edm_coefficients
from epg.method.objectives import ConsistencyLoss, RCMLoss, Terms
from epg.nn.official import CheckpointMismatchError

NANO = "EPG-Nano/4"


def write_stage1(
    path: str | os.PathLike, preset: str = NANO, seed: int = 0, network: dict | None = None
) -> PretrainModule:
    """A stage-1 hand-over file (PretrainModule.export_stage1) of a randomly initialised network."""
    torch.manual_seed(seed)
    module = PretrainModule(preset=preset, network=network, warmup_steps=1, total_steps=10)
    module.export_stage1(path)
    return module


def make(stage1: str | None, objective: str = "diffusion", **kwargs) -> FinetuneModule:
    """A Nano module of the DM or CM ``objective`` with the stage-1 weights loaded (as a Trainer's fit would)."""
    kwargs.setdefault("network", {"drop": 0.5} if objective == "consistency" else None)
    if objective == "consistency":
        kwargs.setdefault("loss", ConsistencyLoss())
    module = FinetuneModule(preset=NANO, init_from=stage1, warmup_steps=2, total_steps=20, **kwargs)
    if stage1 is not None:
        module.load_stage1()
    return module


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> tuple[str, PretrainModule]:
    path = tmp_path_factory.mktemp("stage1") / "stage1.ckpt"
    return str(path), write_stage1(path)


def _equal_states(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_diffusion_init_loads_encoder_and_starts_at_zero(stage1):
    path, pre = stage1
    m = make(path)
    assert _equal_states(m.net.encoder, pre.online.encoder)
    assert _equal_states(m.ema_nets[0], m.net)  # sampling EMA = online weights after loading (§4)
    assert m.target_net is None and m.aux_net is None
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(m.denoiser()(x, torch.tensor([1.0, 3.0]), torch.tensor([0, 10])), torch.zeros_like(x))
    hp = m.hparams
    assert (hp.preset, hp.loss["class_path"], hp.normalization, tuple(hp.ema_rates)) == (
        NANO,
        "epg.method.objectives.DiffusionLoss",
        "imagenet",
        (0.9999,),
    )


def test_consistency_init_has_target_and_frozen_aux(stage1):
    path, pre = stage1
    m = make(path, "consistency")
    assert _equal_states(m.target_net, m.net) and _equal_states(m.aux_net, pre.online)
    assert not any(p.requires_grad for p in [*m.aux_net.parameters(), *m.target_net.parameters()])
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 2.0])
    c_skip, _ = edm_coefficients(sigma, m.denoiser().sigma_min)
    d = m.denoiser().eval()(x, sigma, torch.tensor([1, 2]))
    assert torch.allclose(d, c_skip.view(-1, 1, 1, 1) * x)  # D = c_skip·x at initialisation (§2.3)


def test_from_scratch_warns_and_consistency_requires_stage1():
    module = make(None)
    with pytest.warns(UserWarning, match="from scratch"):
        module.check_weights()  # the Trainer's fit/validate/predict start, after any checkpoint was restored
    with pytest.raises(ValueError, match="init_from"):
        make(None, "consistency")


def test_mismatched_stage1_names_the_keys(tmp_path):
    path = tmp_path / "tiny.ckpt"
    write_stage1(path, preset="EPG-T/4")
    with pytest.raises(CheckpointMismatchError, match="pos_embed"):
        make(str(path), network={"enc_dim": 32})  # a width set in the config that is not the stage-1 encoder's


def test_encoder_shape_comes_from_the_stage1_file(tmp_path):
    """Nothing of the encoder is retyped: the EPG-T/4 stage-1 file gives a Nano stage 2 its 32-px, 4 x 128 encoder
    (and the decoder depth), and the hyper-parameters record what was taken, so a checkpoint rebuilds the network."""
    path = tmp_path / "t4.ckpt"
    pre = write_stage1(path, preset="EPG-T/4")
    m = make(str(path), "consistency", network={"drop": 0.5})
    cfg = m.net.config
    assert (cfg.image_size, cfg.enc_dim, cfg.enc_depth, cfg.enc_heads, cfg.dec_depth) == (32, 128, 4, 4, 4)
    assert (cfg.dec_dim, cfg.drop) == (32, 0.5)  # the preset's decoder width and the config's dropout stay
    assert m.hparams.network == {"drop": 0.5, "image_size": 32, "enc_dim": 128, "enc_depth": 4, "enc_heads": 4,
                                 "proj_hidden": 512, "proj_out": 128, "dec_depth": 4}  # fmt: skip
    assert _equal_states(m.net.encoder, pre.online.encoder) and _equal_states(m.aux_net, pre.online)


def test_bad_options_are_rejected(stage1):
    with pytest.raises(ValueError, match="FinetuneLoss"):
        make(stage1[0], loss=RCMLoss())  # a stage-1 loss is no stage-2 objective
    with pytest.raises(ValueError, match="lr_milestones"):
        make(stage1[0], lr_milestones=(10,), lr_factors=(0.3, 0.1))


def test_objective_defaults_and_optimizer_groups(stage1):
    dm, cm = make(stage1[0]), make(stage1[0], "consistency")
    assert (dm.betas, dm.weight_decay, dm.grad_clip, dm.loss.p_mean, dm.lr_schedule) == (
        (0.9, 0.999), 0.01, 0.5, -1.2, "cosine")  # fmt: skip
    assert (cm.betas, cm.weight_decay, cm.grad_clip, cm.loss.p_mean, cm.lr_schedule) == (
        (0.9, 0.99), 0.03, None, -0.4, "steps")  # fmt: skip
    opt = dm.configure_optimizers()["optimizer"]
    names = {id(p): n for n, p in dm.net.named_parameters()}
    plain = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert plain == {"encoder.pos_embed", "encoder.cls_token"}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(dm.net.parameters()))
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)


def test_lr_schedules(stage1):
    dm = FinetuneModule(preset=NANO, init_from=stage1[0], warmup_steps=10, total_steps=110)
    assert [dm.lr_multiplier(k) for k in (0, 5, 10, 60, 110)] == pytest.approx([0, 0.5, 1, 0.5, 0])
    cm = FinetuneModule(
        preset=NANO, loss=ConsistencyLoss(), init_from=stage1[0], warmup_steps=10, lr_milestones=(40, 50)
    )
    assert [cm.lr_multiplier(k) for k in (5, 10, 40, 41, 50, 51, 99)] == pytest.approx(
        [0.5, 1, 1, 0.3, 0.3, 0.08, 0.08]
    )


def test_gradient_clipping_only_after_warmup(stage1):
    """The clip the module asks for per update (applied in tests/test_grad_clip.py on every precision)."""
    calls = []
    for objective in ("diffusion", "consistency"):
        m = make(stage1[0], objective)
        for updates in (0, 1, 2, 3):
            m.updates = updates
            calls.append((objective, updates, m.grad_clip_value()))
    assert [c for c in calls if c[2] is not None] == [("diffusion", 2, 0.5), ("diffusion", 3, 0.5)]
    m = make(stage1[0], grad_clip=0)
    assert m.grad_clip is None and m.grad_clip_value() is None


def test_applied_update_moves_ema_and_copies_target(stage1):
    m = make(stage1[0], "consistency", ema_rates=(0.5, 0.0))
    before = [p.clone() for p in m.net.parameters()]
    with torch.no_grad():
        for p in m.net.parameters():
            p.add_(1.0)
    m.on_applied_update()
    for b, e0, e1, t, p in zip(
        before,
        m.ema_nets[0].parameters(),
        m.ema_nets[1].parameters(),
        m.target_net.parameters(),
        m.net.parameters(),
        strict=True,
    ):
        assert torch.allclose(e0, 0.5 * b + 0.5 * p)
        assert torch.equal(e1, p) and torch.equal(t, p)


def test_train_mode_keeps_ema_and_aux_in_eval(stage1):
    m = make(stage1[0], "consistency").train()
    assert m.net.training and m.target_net.training
    assert not m.ema_nets[0].training and not m.aux_net.training
    m.eval()
    assert not m.net.training and not m.target_net.training


def test_ect_stage_follows_applied_updates(stage1, monkeypatch):
    m = make(stage1[0], "consistency", loss=ConsistencyLoss(ect_d0=4, ect_d1=4))
    seen = []

    def fake_terms(self, denoiser, target, aux_net, x0, y, stage, generator=None):
        seen.append(stage)
        return Terms(loss=torch.zeros((), requires_grad=True), logs={}, span=(0.0, 0.0))

    monkeypatch.setattr(ConsistencyLoss, "terms", fake_terms)
    monkeypatch.setattr(m, "log", lambda *a, **k: None)
    batch = (torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    for updates in (0, 3, 4, 7, 8, 13):
        m.updates = updates
        m.training_step(batch, 0)
    assert seen == [1, 1, 2, 2, 3, 4]


def test_training_step_returns_finite_losses(stage1, monkeypatch):
    batch = (torch.randn(4, 3, 16, 16) * 0.5, torch.tensor([0, 1, 2, 10]))
    for objective in ("diffusion", "consistency"):
        m = make(stage1[0], objective).train()
        monkeypatch.setattr(m, "log", lambda *a, **k: None)
        loss = m.training_step(batch, 0)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is None for p in m.ema_nets.parameters())
        assert m.net.decoder.out.weight.grad is not None


def test_noise_draws_differ_per_micro_batch_and_repeat_per_key(stage1):
    m = make(stage1[0])
    draw = lambda micro: torch.randn(4, generator=m.noise_generator(torch.device("cpu"), micro))  # noqa: E731
    assert torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))


def test_grid_guidance_interval_defaults_to_the_paper_and_none_guides_every_level(stage1, monkeypatch):
    """sampling.interval: the paper's (0.19, 1.61] by default (method.md §6.2); None guides all levels."""
    from epg.sampling.grid import GUIDANCE_INTERVAL

    assert make(stage1[0]).sampling.guidance is None  # no scale: no guidance
    assert make(stage1[0], sampling={"cfg": 1.0}).sampling.guidance is None  # w = 1 is no guidance
    assert make(stage1[0], sampling={"cfg": 3.0}).sampling.guidance.interval == GUIDANCE_INTERVAL
    module = make(stage1[0], sampling={"cfg": 3.0, "interval": None, "steps": 4}, grid_size=4)
    assert module.sampling.guidance.scale == 3.0 and module.sampling.guidance.interval is None
    with pytest.raises(ValueError, match="interval"):
        make(stage1[0], sampling={"cfg": 3.0, "interval": (1.0, 0.5)})
    seen = []
    loop = importlib.import_module("epg.sampling.generate")  # the module (epg.sampling.generate is the function)
    real_sample = loop.sample
    monkeypatch.setattr(loop, "sample", lambda *a, **k: seen.append(k["guidance"]) or real_sample(*a, **k))
    grid = module.sample_grid(ema=False)
    assert seen == [module.sampling.guidance]
    assert grid.shape == (3, 2 * 16 + 3 * 2, 2 * 16 + 3 * 2) and 0 <= grid.min() and grid.max() <= 1

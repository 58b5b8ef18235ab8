"""Training objectives (K-sample ELBO and the IWAE bound), the IWAE paper's schedule and preset.

The float64 references below are written independently of fused_vae.models: plain torch
modules and torch.distributions on the same weights and the same noise
(``fv.standard_normal`` is the op's eps stream).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import fused_vae as fv
from fused_vae.models import MLPVAE
from fused_vae.training import TrainConfig, load_checkpoint, train
from fused_vae.training.config import ConfigError
from fused_vae.training.optim import iwae_schedule_epochs, iwae_stage, lr_factor
from fused_vae.training.presets import load_preset


def _model_and_data(seed=0, batch=6, d=(1, 4, 4), latent=3):
    torch.manual_seed(seed)
    model = MLPVAE(d, latent_dim=latent, hidden=(12,), backend="cpu")
    x = (torch.rand(batch, *d, generator=torch.Generator().manual_seed(seed + 1)) < 0.4).float()
    return model, x


def _reference_bound(model, x, k, seed):
    """Per-example L_K in float64 with plain torch on a float64 copy of the weights."""
    ref = copy.deepcopy(model).double()
    xd = x.double()
    h = ref.encoder(xd)
    mu, logvar = h.chunk(2, dim=-1)
    std = torch.exp(0.5 * logvar)
    eps = fv.standard_normal((k, *mu.shape), seed).double()
    z = mu + std * eps  # [K, B, L]
    logits = ref.decoder(z.reshape(-1, mu.shape[-1])).reshape(k, x.shape[0], -1)
    log_px_z = -F.binary_cross_entropy_with_logits(logits, xd.flatten(1).expand_as(logits), reduction="none").sum(-1)
    log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_qz = torch.distributions.Normal(mu, std).log_prob(z).sum(-1)
    bound = torch.logsumexp(log_px_z + log_pz - log_qz, dim=0) - math.log(k)
    return ref, bound


@pytest.mark.parametrize("k", [2, 7])
def test_iwae_bound_and_its_gradients_match_a_float64_reference(k):
    model, x = _model_and_data()
    out = model(x, objective="iwae", num_samples=k, seed=11)
    ref, bound = _reference_bound(model, x, k, 11)
    torch.testing.assert_close(out["bound"].double(), bound.mean(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out["loss"].double(), -bound.mean(), rtol=1e-5, atol=1e-4)
    # Gradients flow through z and through log q(z|x) = f((z - mu) / std): both paths must
    # match the reference that keeps eps.
    out["loss"].backward()
    (-bound.mean()).backward()
    for (name, p), pr in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.double(), pr.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_k_sample_elbo_is_the_mean_of_single_sample_elbos():
    model, x = _model_and_data(seed=3)
    k = 4
    out = model(x, objective="elbo", num_samples=k, seed=5)
    ref = copy.deepcopy(model).double()
    mu, logvar = ref.encoder(x.double()).chunk(2, dim=-1)
    z = mu + torch.exp(0.5 * logvar) * fv.standard_normal((k, *mu.shape), 5).double()
    logits = ref.decoder(z.reshape(-1, mu.shape[-1])).reshape(k, x.shape[0], -1)
    recon = F.binary_cross_entropy_with_logits(logits, x.double().flatten(1).expand_as(logits),
                                               reduction="none").sum(-1)
    kl = 0.5 * (mu**2 + logvar.exp() - logvar - 1).sum(-1)
    elbo = -(recon + kl).mean()  # mean over the K samples and the batch
    torch.testing.assert_close(out["elbo"].double(), elbo, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out["bound"], out["elbo"])
    out["loss"].backward()
    (-elbo).backward()
    for p, pr in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.double(), pr.grad, rtol=1e-4, atol=1e-5)


def test_with_one_sample_the_objectives_agree():
    model, x = _model_and_data(seed=4)
    a = model(x, objective="elbo", num_samples=1, seed=9)
    grads_a = torch.autograd.grad(a["loss"], list(model.parameters()))
    b = model(x, objective="iwae", num_samples=1, seed=9)
    grads_b = torch.autograd.grad(b["loss"], list(model.parameters()))
    for key in ("loss", "recon", "kl", "elbo", "bound"):
        assert torch.equal(a[key], b[key]), key
    assert all(torch.equal(ga, gb) for ga, gb in zip(grads_a, grads_b))
    # And L_1 itself (log p(x, z) - log q(z|x), no analytic KL) has the ELBO as its mean.
    with torch.no_grad():
        q = model.encode(x)
        log_w = model._log_weights(q, x, 4000, 2)
        z = q.sample(seed=2, num_samples=4000)  # the same draws
        elbo = model.elbo(x, seed=2)  # analytic KL; recon of a different draw
        recon = -model.likelihood.nll(model.decode(z), x).mean(0)
        mc_kl = -(log_w.mean(0) - recon)  # MC estimate of the KL from the same draws
        se = (log_w - log_w.mean(0)).std(0) / math.sqrt(4000)
    assert ((mc_kl - elbo["kl"]).abs() < 5 * se + 1e-3).all()


def test_objective_arguments_are_checked():
    model, x = _model_and_data()
    with pytest.raises(ValueError, match="objective must be one of elbo, iwae"):
        model(x, objective="vae")
    with pytest.raises(ValueError, match="K"):
        model(x, objective="iwae", num_samples=0)
    with pytest.raises(ValueError, match="beta = 1"):
        model(x, objective="iwae", num_samples=2, beta=0.5)
    with pytest.raises(ConfigError, match="iwae.*beta = 1"):
        TrainConfig(objective="iwae", kl_warmup_steps=10).validate()
    with pytest.raises(ConfigError, match="train_samples"):
        TrainConfig(train_samples=0).validate()
    with pytest.raises(ConfigError, match="adam_eps"):
        TrainConfig(adam_eps=0.0).validate()


# -- the paper's schedule -------------------------------------------------------------------
def test_iwae_schedule_learning_rates_at_stage_boundaries():
    starts = [iwae_schedule_epochs(i) for i in range(9)]
    assert starts == [0, 1, 4, 13, 40, 121, 364, 1093, 3280]
    spe = 3  # steps per epoch
    for i, first in enumerate(starts[:8]):
        expect = 10.0 ** (-i / 7)
        for epoch in (first, starts[i + 1] - 1):  # first and last epoch of stage i
            assert iwae_stage(epoch) == i
            for step in (epoch * spe, epoch * spe + spe - 1):
                f = lr_factor(step, total_steps=0, warmup_steps=0, schedule="iwae", min_ratio=0.0, steps_per_epoch=spe)
                assert f == pytest.approx(expect, rel=1e-12), (i, epoch, step)
    assert 1e-3 * lr_factor(3280 * spe - 1, total_steps=0, warmup_steps=0, schedule="iwae", min_ratio=0.0,
                            steps_per_epoch=spe) == pytest.approx(1e-4)


def tiny(tmp_path, **kw) -> TrainConfig:
    base = dict(max_train_examples=120, max_test_examples=40, batch_size=20, hidden=[24], latent_dim=4, epochs=3,
                eval_every=0, checkpoint_every=1, iwae_samples=0, log_every=1, progress=False,
                out_dir=str(tmp_path), name="run", backend="cpu", binarize="dynamic")
    base.update(kw)
    return TrainConfig(**base)


def _train_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def test_trainer_applies_the_schedule_per_epoch(tmp_path):
    cfg = tiny(tmp_path, lr_schedule="iwae", epochs=5, max_train_examples=60)  # 3 steps per epoch
    train(cfg)
    lrs = [r["lr"] for r in _train_records(cfg.run_dir)]  # lr after each step: the next step's
    expect = [1e-3 * 10 ** (-iwae_stage((s + 1) // 3) / 7) for s in range(15)]
    assert lrs == pytest.approx(expect, rel=1e-9)


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_a_short_run_of_each_objective_lowers_its_loss(tmp_path, objective):
    cfg = tiny(tmp_path, objective=objective, train_samples=3, epochs=6, lr=3e-3, log_every=6, iwae_samples=20)
    summary = train(cfg)
    recs = _train_records(cfg.run_dir)
    assert recs[-1]["loss"] < recs[0]["loss"] - 1.0
    assert all(r["objective"] == objective and r["train_samples"] == 3 for r in recs)
    if objective == "iwae":
        # The trained bound L_3 is above the ELBO of the same draws, and the loss is -L_3.
        assert all(r["bound"] >= r["elbo"] for r in recs)
        assert all(r["loss"] == pytest.approx(-r["bound"]) for r in recs)
    else:
        assert all(r["bound"] == r["elbo"] == pytest.approx(-r["loss"]) for r in recs)
    assert summary["objective"] == objective and summary["train_samples"] == 3
    assert cfg.updated({"name": None}).run_name == f"digits-mlp-{objective}3"


def test_an_iwae_trained_model_has_its_bound_above_its_elbo(tmp_path):
    cfg = tiny(tmp_path, objective="iwae", train_samples=5, epochs=4, lr=3e-3)
    train(cfg)
    from fused_vae.models import build_model
    from fused_vae.training import load_data

    ck = load_checkpoint(cfg.run_dir / "checkpoints" / "last.pt")
    model = build_model(ck["model_spec"])
    model.load_state_dict(ck["model"])
    x = load_data(cfg).test
    with torch.no_grad():
        l5 = torch.stack([model.iwae_log_likelihood(x, 5, seed=s) for s in range(20)]).mean()
        elbo = torch.stack([model.elbo(x, seed=100 + s)["elbo"] for s in range(20)]).mean()
    assert l5 > elbo


def test_resume_in_the_middle_of_a_stage_is_exact(tmp_path):
    # 6 steps per epoch; stage 1 is epochs 1..3. Stop at step 15 (epoch 2, batch 3) and resume.
    kw = dict(objective="iwae", train_samples=3, lr_schedule="iwae", epochs=4, adam_eps=1e-4)
    train(tiny(tmp_path / "a", **kw))
    cfg = tiny(tmp_path / "b", max_steps=15, **kw)
    train(cfg)
    ck = load_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "last.pt")
    assert (ck["step"], ck["epoch"], ck["batch_in_epoch"]) == (15, 2, 3)
    train(cfg.updated({"max_steps": None}), resume=True)
    pa = load_checkpoint(tmp_path / "a" / "run" / "checkpoints" / "last.pt")["model"]
    pb = load_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    ra, rb = _train_records(tmp_path / "a" / "run"), _train_records(tmp_path / "b" / "run")
    assert [(r["loss"], r["lr"]) for r in ra] == [(r["loss"], r["lr"]) for r in rb]


def test_the_paper_preset():
    p = load_preset("iwae-mnist")
    cfg = TrainConfig().updated({**p, "data_path": "MNIST"})
    assert (cfg.hidden, cfg.latent_dim, cfg.resolved_activation, cfg.binarize) == ([200, 200], 50, "tanh", "dynamic")
    assert (cfg.batch_size, cfg.lr, cfg.adam_eps, cfg.weight_decay, cfg.lr_schedule) == (20, 1e-3, 1e-4, 0.0, "iwae")
    assert (cfg.epochs, cfg.iwae_samples, cfg.grad_clip) == (3280, 5000, 0.0)
    with pytest.raises(ConfigError, match="preset must be one of iwae-mnist"):
        load_preset("iwae-cifar")


@pytest.mark.parametrize("kw", [dict(objective="elbo", num_samples=1, beta=0.5, free_bits=0.2),
                                dict(objective="elbo", num_samples=3),
                                dict(objective="iwae", num_samples=4)], ids=["elbo-fb", "elbo-K3", "iwae-K4"])
def test_return_stats_gives_the_dict_values_and_the_same_gradients(kw):
    """The trainer's form of forward: the same loss and gradients, and the dict's LOSS_STATS as a
    detached [5] tensor (no autograd graph for them)."""
    from fused_vae.models import LOSS_STATS

    model, x = _model_and_data(seed=6)
    out = model(x, seed=3, **kw)
    grads = torch.autograd.grad(out["loss"], list(model.parameters()))
    loss, stats = model(x, seed=3, return_stats=True, **kw)
    assert stats.shape == (5,) and stats.dtype == torch.float32 and not stats.requires_grad
    assert torch.equal(loss, out["loss"])
    torch.testing.assert_close(stats, torch.stack([out[k].detach() for k in LOSS_STATS]), rtol=1e-6, atol=1e-6)
    for g, h in zip(grads, torch.autograd.grad(loss, list(model.parameters()))):
        assert torch.equal(g, h)

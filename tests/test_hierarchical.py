"""Hierarchical VAEs (fused_vae/models/hierarchical.py): the IWAE paper's two-stochastic-layer
net and the top-down models. Their log weights and ELBO terms against plain PyTorch written
with torch.distributions on the same noise (fv.standard_normal), gradients included; training,
evaluation, images, per-layer KL statistics, resume, the captured step and the CLI preset."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

import fused_vae as fv
import test_cli
import test_training
from fused_vae.models import IWAETwoLayerVAE, TopDownConvVAE, TopDownVAE, build_model
from fused_vae.models.hierarchical import _layer_seeds
from fused_vae.training import load_checkpoint, train

SHAPE = (1, 8, 8)


def _x(n=6, seed=0):
    return (torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed)) < 0.4).float()


def _normal(h):
    mu, logvar = h.double().chunk(2, dim=1)
    return Normal(mu, (0.5 * logvar).exp())


def _bernoulli_log_lik(logits, x):
    return -F.binary_cross_entropy_with_logits(logits.double(), x.double().expand_as(logits), reduction="none").flatten(2).sum(-1)


def two_layer_log_weights(model: IWAETwoLayerVAE, x, k, seed):
    """log p(x|h1) + log p(h1|h2) + log p(h2) - log q(h1|x) - log q(h2|h1), [k, B], written with
    torch.distributions on the noise the model draws (its documented streams)."""
    s1, s2 = _layer_seeds(seed, 2, x.device)
    b, (d1, d2) = x.shape[0], model.latent_dims
    q1 = _normal(model.encoder(x))
    h1 = q1.loc + q1.scale * fv.standard_normal((k, b, d1), s1, dtype=torch.float64)
    flat = h1.reshape(-1, d1)
    q2 = _normal(model.encoder2(flat.float()))
    h2 = q2.loc + q2.scale * fv.standard_normal((k * b, d2), s2, dtype=torch.float64)
    p1 = _normal(model.decoder2(h2.float()))
    p2 = Normal(torch.zeros_like(h2), torch.ones_like(h2))
    log_px = _bernoulli_log_lik(model.decoder(h1.reshape(-1, d1).float()).reshape(k, b, *SHAPE), x)
    per_row = lambda t: t.sum(-1).reshape(k, b)  # noqa: E731
    return (log_px + per_row(p1.log_prob(flat)) + per_row(p2.log_prob(h2)) - q1.log_prob(h1).sum(-1)
            - per_row(q2.log_prob(h2)))  # fmt: skip


def top_down_terms(model: TopDownVAE, x, k, seed):
    """The log weights [k, B] and each layer's KL to its prior [L, k, B] of a top-down pass,
    written with torch.distributions on the model's noise streams (top layer draws the k samples)."""
    b = x.shape[0]
    feats = model.encoder(x)
    seeds = _layer_seeds(seed, len(model.blocks), x.device)
    state = model.top_state.expand(b, *model.top_state.shape[1:])
    log_w, kls = 0.0, []
    for l in reversed(range(len(model.blocks))):
        block = model.blocks[l]
        d = feats[l] if l == len(model.blocks) - 1 else feats[l].unsqueeze(0).expand(k, *feats[l].shape).flatten(0, 1)
        p, q = _normal(block.prior(state)), _normal(block.posterior(torch.cat([d, state], 1)))
        if l == len(model.blocks) - 1:
            z = q.loc + q.scale * fv.standard_normal((k, *q.loc.shape), seeds[l], dtype=torch.float64)
            kl = kl_divergence(q, p).flatten(1).sum(-1).expand(k, b)
            ratio = (q.log_prob(z) - p.log_prob(z)).flatten(2).sum(-1)
            z = z.flatten(0, 1)
            state = state.unsqueeze(0).expand(k, *state.shape).flatten(0, 1)
        else:
            z = q.loc + q.scale * fv.standard_normal(q.loc.shape, seeds[l], dtype=torch.float64)
            kl = kl_divergence(q, p).flatten(1).sum(-1).reshape(k, b)
            ratio = (q.log_prob(z) - p.log_prob(z)).flatten(1).sum(-1).reshape(k, b)
        log_w = log_w - ratio
        kls.append(kl)
        state = block.up(state + block.merge(torch.cat([state, z.float()], 1)))
    log_px = _bernoulli_log_lik(model.decoder(state).reshape(k, b, *SHAPE), x)
    return log_w + log_px, torch.stack(kls[::-1])


MODELS = {
    "mlp2": lambda: IWAETwoLayerVAE(SHAPE, latent_dims=(12, 6), hidden=(32, 32), upper_hidden=(16, 16)),
    "topdown": lambda: TopDownVAE(SHAPE, latent_dims=(8, 6, 4), hidden=32),
    "topdown-conv": lambda: TopDownConvVAE(SHAPE, latent_dims=(4, 2), channels=(8, 16)),
}


def _reference_log_weights(model, x, k, seed):
    if isinstance(model, IWAETwoLayerVAE):
        return two_layer_log_weights(model, x, k, seed)
    return top_down_terms(model, x, k, seed)[0]


@pytest.mark.parametrize("name", list(MODELS))
def test_log_weights_and_their_gradients_match_torch_distributions(name):
    torch.manual_seed(0)
    model, x = MODELS[name](), _x()
    got = model._log_weights(None, x, 5, 11)
    want = _reference_log_weights(model, x, 5, 11)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    params = list(model.parameters())
    g_got = torch.autograd.grad(torch.logsumexp(got, 0).mean(), params)
    g_want = torch.autograd.grad(torch.logsumexp(want, 0).mean(), params)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", ["topdown", "topdown-conv"])
def test_top_down_layer_kls_are_the_analytic_kls_to_the_learned_priors(name):
    torch.manual_seed(1)
    model, x = MODELS[name](), _x()
    out = model(x, objective="elbo", num_samples=3, seed=4)
    _, kls = top_down_terms(model, x, 3, 4)
    want = kls.flatten(1).mean(1)
    for i, layer in enumerate(model.layer_names):
        torch.testing.assert_close(out[f"kl_{layer}"].double(), want[i], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["kl"].double(), want.sum(), rtol=1e-5, atol=1e-5)


def test_the_two_layer_elbo_terms():
    """h2: the analytic KL to N(0, I); h1: the one-sample log q(h1|x) - log p(h1|h2)."""
    torch.manual_seed(2)
    model, x = MODELS["mlp2"](), _x()
    out = model(x, seed=3)
    s1, s2 = _layer_seeds(3, 2, x.device)
    q1 = _normal(model.encoder(x))
    h1 = q1.loc + q1.scale * fv.standard_normal(q1.loc.shape, s1, dtype=torch.float64)
    q2 = _normal(model.encoder2(h1.float()))
    h2 = q2.loc + q2.scale * fv.standard_normal(q2.loc.shape, s2, dtype=torch.float64)
    p1 = _normal(model.decoder2(h2.float()))
    kl2 = kl_divergence(q2, Normal(torch.zeros_like(q2.loc), torch.ones_like(q2.loc))).sum(-1).mean()
    kl1 = (q1.log_prob(h1) - p1.log_prob(h1)).sum(-1).mean()
    torch.testing.assert_close(out["kl_h2"].double(), kl2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["kl_h1"].double(), kl1, rtol=1e-4, atol=1e-4)
    recon = -_bernoulli_log_lik(model.decoder(h1.float())[None].reshape(1, -1, *SHAPE), x).mean()
    torch.testing.assert_close(out["recon"].double(), recon, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_objectives_statistics_and_outputs(name):
    torch.manual_seed(3)
    model, x = MODELS[name](), _x()
    for objective, k in (("elbo", 1), ("elbo", 3), ("iwae", 4)):
        out = model(x, objective=objective, num_samples=k, seed=5)
        loss, stats = model(x, objective=objective, num_samples=k, seed=5, return_stats=True)
        assert stats.shape == (len(model.stat_names),) and not stats.requires_grad
        torch.testing.assert_close(stats, torch.stack([out[n].detach() for n in model.stat_names]))
        torch.testing.assert_close(loss, out["loss"])
        assert torch.isclose(out["kl"], sum(out[f"kl_{n}"] for n in model.layer_names))
    iwae = model(x, objective="iwae", num_samples=1, seed=5)
    elbo = model(x, objective="elbo", num_samples=1, seed=5)
    assert torch.equal(iwae["loss"], elbo["loss"]), "L_1 is the ELBO"
    ll = model.iwae_log_likelihood(x, 40, seed=6, chunk_size=15)
    assert ll.shape == (x.shape[0],) and torch.isfinite(ll).all()
    torch.testing.assert_close(ll, model.iwae_log_likelihood(x, 40, seed=6, chunk_size=15), rtol=0, atol=0)
    e = model.elbo(x, seed=7)
    assert e["elbo"].shape == e["kl"].shape == (x.shape[0],)
    for img in (model.generate(5, seed=1), model.reconstruct(x), model.interpolate(x[0], x[1], 4)):
        assert img.shape[1:] == SHAPE and ((img >= 0) & (img <= 1)).all()
    assert torch.equal(model.generate(3, seed=2), model.generate(3, seed=2))
    copy = build_model(model.spec)
    copy.load_state_dict(model.state_dict())
    assert torch.equal(copy(x, seed=8)["loss"], model(x, seed=8)["loss"])


def test_free_bits_floor_each_layer():
    torch.manual_seed(4)
    model, x = MODELS["topdown"](), _x()
    out = model(x, seed=1, free_bits=0.5)
    layer = torch.stack([out[f"kl_{n}"] for n in model.layer_names])
    torch.testing.assert_close(out["kl_penalty"], layer.clamp(min=0.5).sum())
    assert out["loss"].item() == pytest.approx((out["recon"] + out["kl_penalty"]).item(), rel=1e-6)


def tiny(tmp_path, model, **kw):
    base = dict(model=model, max_train_examples=200, max_test_examples=60, batch_size=50, hidden=[32], epochs=3,
                upper_hidden=[16], conv_channels=[8, 16], iwae_samples=20)
    dims = {"mlp2": [12, 6], "topdown": [8, 6, 4], "topdown-conv": [4, 2]}[model]
    return test_training.tiny(tmp_path, **{**base, "latent_dims": dims, **kw})


@pytest.mark.parametrize("name", list(MODELS))
def test_training_lowers_the_loss_and_logs_each_layer(tmp_path, name):
    summary = train(tiny(tmp_path, name, objective="iwae", train_samples=3, lr=3e-3))
    run = tmp_path / "run"
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert train_recs[-1]["loss"] < train_recs[0]["loss"]
    layers = [k for k in train_recs[0] if k.startswith("kl_")]
    assert len(layers) == {"mlp2": 2, "topdown": 3, "topdown-conv": 2}[name]
    assert summary["test_iwae_nll"] <= -summary["test_elbo"] + 0.5
    for out in ("samples.png", "reconstructions.png", "interpolation.png", "loss_curves.png"):
        assert (run / out).is_file()
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert set(layers) <= set(header)


@pytest.mark.parametrize("name", ["mlp2", "topdown"])
def test_resume_is_exact(tmp_path, name, monkeypatch):
    kw = dict(epochs=3, lr_schedule="constant", eval_every=0, binarize="dynamic", objective="iwae", train_samples=2)
    train(tiny(tmp_path / "a", name, **kw))
    cfg = tiny(tmp_path / "b", name, max_steps=5, **kw)
    train(cfg)
    train(cfg.updated({"max_steps": None}), resume=True)
    pa = load_checkpoint(tmp_path / "a" / "run" / "checkpoints" / "last.pt")["model"]
    pb = load_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize("name", ["mlp2", "topdown-conv"])
def test_the_captured_step_is_the_eager_step_bit_for_bit(tmp_path, name, monkeypatch):
    from fused_vae.training import step as step_mod

    monkeypatch.setattr(step_mod.torch, "compile", lambda fn: fn)
    kw = dict(objective="iwae", train_samples=3, binarize="dynamic", device="cpu")
    eager = train(tiny(tmp_path / "e", name, **kw))
    captured = train(tiny(tmp_path / "c", name, compile=True, **kw))
    pe = load_checkpoint(tmp_path / "e" / "run" / "checkpoints" / "last.pt")["model"]
    pc = load_checkpoint(tmp_path / "c" / "run" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(pe[k], pc[k]) for k in pe)
    assert captured["test_elbo"] == eager["test_elbo"]


def test_the_two_layer_preset_in_one_command(tmp_path, capsys):
    data = test_cli._fake_mnist(tmp_path / "mnist")
    code, out, err = test_cli._run(capsys, "train", "--preset", "iwae-mnist-2layer", "--data", "mnist", "--data-path",
                                   str(data), "--objective", "iwae", "--train-samples", "5", "--epochs", "1",
                                   "--max-train-examples", "200", "--iwae-samples", "20", "--out-dir", str(tmp_path),
                                   "--no-progress")  # fmt: skip
    assert code == 0, err
    cfg = json.loads((tmp_path / "mnist-mlp2-iwae5" / "config.json").read_text())
    assert (cfg["model"], cfg["latent_dims"], cfg["hidden"], cfg["upper_hidden"]) == ("mlp2", [100, 50], [200, 200], [100, 100])
    assert (cfg["activation"], cfg["batch_size"], cfg["adam_eps"], cfg["lr_schedule"]) == ("tanh", 20, 1e-4, "iwae")
    assert "test NLL (IWAE, k=20)" in out


def test_bad_hierarchy_options_are_clear_errors(tmp_path):
    from fused_vae.training.config import ConfigError

    with pytest.raises(ConfigError, match="latent_dims is for the hierarchical models"):
        test_training.tiny(tmp_path, latent_dims=[4, 2]).validate()
    with pytest.raises(ConfigError, match="model mlp2 has two stochastic layers"):
        test_training.tiny(tmp_path, model="mlp2", latent_dims=[4, 2, 2]).validate()
    with pytest.raises(ConfigError, match="one conv_channels value per layer"):
        test_training.tiny(tmp_path, model="topdown-conv", latent_dims=[4, 2, 2], conv_channels=[8, 8]).validate()
    with pytest.raises(ValueError, match="latent_dims must be at least 2 sizes"):
        TopDownVAE(SHAPE, latent_dims=[4])

"""Models: distribution object, likelihoods, losses, MLP and conv VAEs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_vae as fv
from fused_vae.models import (
    BernoulliLikelihood,
    ConvVAE,
    DiagonalGaussian,
    GaussianLikelihood,
    MLPVAE,
    build_likelihood,
    build_model,
    derive_seed,
    free_bits_kl,
    kl_warmup_beta,
    vae_loss,
)


def _pair(shape=(6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


# -- DiagonalGaussian --------------------------------------------------------------------------
def test_distribution_sample_is_the_fused_noise_stream():
    mu, lv = _pair()
    q = DiagonalGaussian(mu, lv)
    z = q.sample(seed=7)
    expect = mu + torch.exp(0.5 * lv) * fv.standard_normal(mu.shape, 7)
    torch.testing.assert_close(z, expect, rtol=1e-5, atol=1e-5)
    assert q.sample(seed=7, num_samples=3).shape == (3, *mu.shape)
    torch.testing.assert_close(q.mode(), mu)
    torch.testing.assert_close(q.mean, mu)
    torch.testing.assert_close(q.std, torch.exp(0.5 * lv))
    torch.testing.assert_close(q.var, torch.exp(lv))


def test_distribution_kl_and_sample_with_kl_agree_with_torch_distributions():
    mu, lv = _pair()
    q = DiagonalGaussian(mu, lv)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, torch.exp(0.5 * lv)), torch.distributions.Normal(0.0, 1.0)
    )
    torch.testing.assert_close(q.kl("none"), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.kl("per_sample"), ref.sum(1), rtol=1e-5, atol=1e-5)
    z, kl = q.sample_with_kl(seed=3)
    torch.testing.assert_close(kl, ref.sum() / mu.shape[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z, q.sample(seed=3))


def test_distribution_log_prob_and_nll():
    mu, lv = _pair()
    q = DiagonalGaussian(mu, lv)
    z = torch.randn(4, *mu.shape)  # leading sample dim
    ref = torch.distributions.Normal(mu, torch.exp(0.5 * lv)).log_prob(z).sum(-1)
    torch.testing.assert_close(q.log_prob(z), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(q.nll(z[0]), -ref[0], rtol=1e-5, atol=1e-4)


def test_distribution_clamp_and_errors():
    mu, lv = _pair()
    lv = lv * 100
    q = DiagonalGaussian(mu, lv, logvar_clamp=(-2.0, 2.0))
    assert q.var.max() <= math.exp(2.0) + 1e-4
    torch.testing.assert_close(q.kl("none"), fv.gaussian_kl(mu, lv.clamp(-2, 2), reduction="none"))
    with pytest.raises(ValueError, match="shape"):
        DiagonalGaussian(mu, lv[:, :2])
    with pytest.raises(TypeError):
        DiagonalGaussian(mu, "x")


def test_distribution_gradients_flow_through_fused_op():
    mu, lv = _pair()
    mu.requires_grad_(True)
    lv.requires_grad_(True)
    z, kl = DiagonalGaussian(mu, lv).sample_with_kl(seed=1)
    (z.sum() + kl).backward()
    eps = fv.standard_normal(mu.shape, 1)
    torch.testing.assert_close(mu.grad, 1 + mu.detach() / mu.shape[0], rtol=1e-5, atol=1e-5)
    expect_lv = 0.5 * torch.exp(0.5 * lv.detach()) * eps + 0.5 * (torch.exp(lv.detach()) - 1) / mu.shape[0]
    torch.testing.assert_close(lv.grad, expect_lv, rtol=1e-4, atol=1e-5)


# -- likelihoods ----------------------------------------------------------------------------------
def test_bernoulli_nll_is_bce_with_logits():
    logits = torch.randn(2, 3, 1, 4, 4)  # [S, B, C, H, W]
    x = torch.rand(3, 1, 4, 4)
    nll = BernoulliLikelihood().nll(logits, x)
    assert nll.shape == (2, 3) and nll.dtype == torch.float32
    ref = F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum((2, 3, 4))
    torch.testing.assert_close(nll, ref)
    torch.testing.assert_close(BernoulliLikelihood().mean(logits), torch.sigmoid(logits))


@pytest.mark.parametrize("lik", [BernoulliLikelihood(), GaussianLikelihood(sigma=0.7)], ids=["bernoulli", "gaussian"])
@pytest.mark.parametrize("lead", [(3,), (2, 3)], ids=["B", "KxB"])
def test_mean_nll_is_the_mean_of_the_per_example_nll(lik, lead):
    params = torch.randn(*lead, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    got = lik.mean_nll(params.float(), x.float())
    ref = lik.nll(params, x).double().mean()
    assert got.shape == () and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    g_got, = torch.autograd.grad(got, params)
    g_ref, = torch.autograd.grad(ref, params)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("learn", [False, True])
def test_gaussian_nll_fixed_and_learned_sigma(learn):
    lik = GaussianLikelihood(sigma=0.3, learn_sigma=learn)
    mean = torch.randn(5, 1, 2, 3)
    x = torch.randn(5, 1, 2, 3)
    ref = -torch.distributions.Normal(mean, 0.3).log_prob(x).sum((1, 2, 3))
    torch.testing.assert_close(lik.nll(mean, x), ref, rtol=1e-5, atol=1e-5)
    params = dict(lik.named_parameters())
    assert ("log_sigma" in params) == learn
    if learn:
        lik.nll(mean, x).sum().backward()
        assert lik.log_sigma.grad is not None
    with pytest.raises(ValueError, match="sigma"):
        GaussianLikelihood(sigma=0.0)
    with pytest.raises(ValueError, match="likelihood"):
        build_likelihood("poisson")


# -- losses ---------------------------------------------------------------------------------------
def test_kl_warmup_and_free_bits():
    assert kl_warmup_beta(0, 2.0, 10) == 0.0
    assert kl_warmup_beta(5, 2.0, 10) == 1.0
    assert kl_warmup_beta(50, 2.0, 10) == 2.0
    assert kl_warmup_beta(0, 2.0, 0) == 2.0
    kl = torch.tensor([[0.1, 2.0], [0.3, 4.0]])  # batch mean per dim: 0.2, 3.0
    torch.testing.assert_close(free_bits_kl(kl, 0.5), torch.tensor(3.5))
    torch.testing.assert_close(free_bits_kl(kl, 0.0), torch.tensor(3.2))
    out = vae_loss(torch.tensor([10.0, 20.0]), kl, beta=0.5, free_bits=0.5)
    torch.testing.assert_close(out["kl"], torch.tensor(3.2))
    torch.testing.assert_close(out["kl_penalty"], torch.tensor(3.5))
    torch.testing.assert_close(out["loss"], torch.tensor(15.0 + 0.5 * 3.5))
    torch.testing.assert_close(out["elbo"], torch.tensor(-18.2))
    with pytest.raises(ValueError, match="free bits"):
        vae_loss(torch.ones(2), kl.sum(1), free_bits=0.1)


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    seeds = {derive_seed(0, 1, s, m) for s in range(50) for m in range(4)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(TypeError):
        derive_seed(1.5)


# -- models ---------------------------------------------------------------------------------------
def test_mlp_defaults_are_the_iwae_paper_net():
    m = MLPVAE((1, 28, 28))
    enc = [l for l in m.encoder.modules() if isinstance(l, nn.Linear)]
    dec = [l for l in m.decoder.modules() if isinstance(l, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in enc] == [(784, 200), (200, 200), (200, 100)]
    assert [(l.in_features, l.out_features) for l in dec] == [(50, 200), (200, 200), (200, 784)]
    assert sum(isinstance(l, nn.Tanh) for l in m.modules()) == 4
    assert m.latent_dim == 50


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 7, 5)])
def test_conv_vae_shapes(shape):
    m = ConvVAE(shape, latent_dim=4, channels=(4, 8), hidden=16)
    x = torch.rand(3, *shape)
    q = m.encode(x)
    assert q.mu.shape == (3, 4)
    assert m.decode(torch.randn(2, 3, 4)).shape == (2, 3, *shape)
    out = m(x, seed=0)
    out["loss"].backward()
    assert all(p.grad is not None for p in m.parameters())
    with pytest.raises(ValueError, match="C, H, W"):
        ConvVAE((64,))


def test_forward_elbo_iwae_and_images():
    torch.manual_seed(0)
    m = MLPVAE((1, 4, 4), latent_dim=3, hidden=(16,))
    x = torch.rand(5, 1, 4, 4)
    out = m(x, seed=1)
    assert set(out) == {"loss", "recon", "kl", "kl_penalty", "elbo", "bound"}
    el = m.elbo(x, seed=1)
    torch.testing.assert_close(el["elbo"].mean(), out["elbo"])
    ll = m.iwae_log_likelihood(x, 40, seed=2, chunk_size=7)
    assert ll.shape == (5,)
    # Deterministic for a fixed seed; L_k is on average above the single-sample ELBO.
    torch.testing.assert_close(ll, m.iwae_log_likelihood(x, 40, seed=2, chunk_size=7))
    elbo_avg = torch.stack([m.elbo(x, seed=s)["elbo"] for s in range(20)]).mean(0)
    assert (ll >= elbo_avg - 1e-3).all()
    assert m.generate(6, seed=0).shape == (6, 1, 4, 4)
    assert m.reconstruct(x).shape == x.shape
    assert m.interpolate(x[0], x[1], steps=5).shape == (5, 1, 4, 4)
    with pytest.raises(ValueError, match="shape"):
        m(torch.rand(5, 16))


def test_free_bits_path_and_bf16_autocast():
    m = MLPVAE((1, 4, 4), latent_dim=3, hidden=(8,))
    x = torch.rand(4, 1, 4, 4)
    out = m(x, seed=0, free_bits=1.0)
    assert out["kl_penalty"] >= 3.0 - 1e-6  # three dims, each floored at 1 nat
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, seed=0)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()


def test_build_model_round_trip():
    for m in (MLPVAE((1, 4, 4), latent_dim=2, hidden=(8,)), ConvVAE((1, 8, 8), latent_dim=2, channels=(4,), hidden=8)):
        m2 = build_model(m.spec)
        m2.load_state_dict(m.state_dict())
        assert m2.spec == m.spec
    with pytest.raises(ValueError, match="kind"):
        build_model({"kind": "rnn"})
    with pytest.raises(ValueError, match="spec"):
        build_model({"kind": "mlp", "input_shape": [4], "bogus": 1})

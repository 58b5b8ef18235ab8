"""The Gaussian terms beyond the N(0, I) KL, on every backend: the KL to a learned prior,
each sample's log q(z|x) and log q(z|x) - log p(z) (``fv.sample_gaussian``) and
``fv.gaussian_log_prob``. Values and gradients against independent float64 math
(tests/independent.py) and torch.distributions; dtypes, shapes, strides, empty inputs,
IEEE special values, every autograd mode and the statistics of the samples' log densities.
"""

from __future__ import annotations

import math

import pytest
import torch

import fused_vae as fv
from helpers import (
    DTYPES,
    EMPTY_SHAPES,
    KL_TOL,
    LOG_DENSITY_TOL,
    REDUCED_KL_TOL,
    REDUCTIONS,
    Z_TOL,
    check_empty_reduced,
    gradcheck_shape,
    is_simulated,
    make_inputs,
)
from independent import log_prob64, reduce64, terms64

SHAPES = [(1,), (7,), (4, 3), (16, 37), (3, 4, 5), (2, 3, 2, 5)]
LONG_ROWS = [(2, 4500), (3, 2049), (700, 3)]  # rows split into chunks (CPU tiles of 2048), many rows per tile


def sample(backend, mu, lv, prior=None, **kw):
    return fv.sample_gaussian(mu, lv, prior=prior, backend=backend[0], **kw)


def check_terms(out, mu, lv, seed, prior, kl, log_density, num_samples, clamp=None):
    """Asserts a GaussianSample's dtypes, shapes and values against float64 math."""
    _, z64, kl64, log_q64, ratio64 = terms64(mu, lv, seed, num_samples, prior, clamp)
    acc = torch.float64 if mu.dtype == torch.float64 else torch.float32
    assert out.z.dtype == mu.dtype and out.z.shape == z64.shape
    torch.testing.assert_close(out.z.cpu().double(), z64.detach(), **Z_TOL[mu.dtype])
    if kl is None:
        assert out.kl is None
    else:
        want = reduce64(kl64.detach(), kl)
        assert out.kl.shape == want.shape and out.kl.dtype == (mu.dtype if kl == "none" else acc)
        tol = KL_TOL[mu.dtype] if kl == "none" else REDUCED_KL_TOL[mu.dtype]
        torch.testing.assert_close(out.kl.cpu().double(), want, **tol)
    if log_density is None:
        assert out.log_density is None
    else:
        want = (log_q64 if log_density == "q" else ratio64).detach()
        assert out.log_density.shape == want.shape and out.log_density.dtype == acc
        torch.testing.assert_close(out.log_density.cpu().double(), want, **LOG_DENSITY_TOL[mu.dtype])


def inputs_per_shape(backend, dtype, seed):
    """A pair of fresh inputs for each shape of SHAPES (the first four on the simulated devices)."""
    shapes = SHAPES[:4] if is_simulated(backend) else SHAPES
    return [make_inputs(shape, dtype, backend[1], seed=seed + i) for i, shape in enumerate(shapes)]


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kl", REDUCTIONS)
def test_prior_kl_and_log_densities_match_float64_math(backend, dtype, kl):
    for i, (mu, lv) in enumerate(inputs_per_shape(backend, dtype, 100)):
        prior = make_inputs(mu.shape, dtype, backend[1], seed=200 + i)
        log_density = ("q", "ratio")[i % 2]
        num_samples = (None, 3)[(i // 2) % 2]
        out = sample(backend, mu, lv, prior, kl=kl, log_density=log_density, num_samples=num_samples, seed=7 + i)
        check_terms(out, mu, lv, 7 + i, prior, kl, log_density, num_samples)
        out = sample(backend, mu, lv, None, kl=kl, log_density="ratio", num_samples=num_samples, seed=9 + i)
        check_terms(out, mu, lv, 9 + i, None, kl, "ratio", num_samples)
        kl_only = fv.gaussian_kl(mu, lv, prior=prior, reduction=kl, backend=backend[0])
        torch.testing.assert_close(kl_only, fv.reparameterize_kl(mu, lv, prior=prior, reduction=kl, seed=3,
                                                                 backend=backend[0])[1], rtol=0, atol=0)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gaussian_log_prob_matches_float64_math(backend, dtype, reduction):
    for i, (x, mu) in enumerate(inputs_per_shape(backend, dtype, 300)):
        lv = make_inputs(x.shape, dtype, backend[1], seed=400 + i)[0]
        lp = fv.gaussian_log_prob(x, mu, lv, reduction=reduction, backend=backend[0])
        want = reduce64(log_prob64(x, mu, lv)[1].detach(), reduction)
        assert lp.shape == want.shape
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert lp.dtype == (dtype if reduction == "none" else acc)
        tol = KL_TOL[dtype] if reduction == "none" else REDUCED_KL_TOL[dtype]
        torch.testing.assert_close(lp.cpu().double(), want, **tol)


@pytest.mark.parametrize("shape", LONG_ROWS, ids=str)
def test_long_and_short_rows(backend, shape):
    """Rows split over tiles, and many rows per tile, sum each row (and sample) apart."""
    if is_simulated(backend):
        shape = {(2, 4500): (2, 600), (3, 2049): (3, 257), (700, 3): (70, 3)}[shape]
    device = backend[1]
    mu, lv = make_inputs(shape, torch.float32, device, seed=11)
    prior = make_inputs(shape, torch.float32, device, seed=12)
    for kl in ("per_sample", "batchmean"):
        out = sample(backend, mu, lv, prior, kl=kl, log_density="ratio", num_samples=3, seed=13)
        check_terms(out, mu, lv, 13, prior, kl, "ratio", 3)
        lp = fv.gaussian_log_prob(mu, prior[0], prior[1], reduction=kl, backend=backend[0])
        want = reduce64(log_prob64(mu, *prior)[1].detach(), kl)
        torch.testing.assert_close(lp.cpu().double(), want, **REDUCED_KL_TOL[torch.float32])


def test_logvar_clamp_applies_to_both_logvars(backend):
    device = backend[1]
    mu, lv = make_inputs((6, 9), torch.float32, device, seed=14, lv_scale=40.0)
    prior = make_inputs((6, 9), torch.float32, device, seed=15, lv_scale=10.0)
    for clamp in [(-30.0, 20.0), (-1.0, 1.0), (None, 0.5), (-0.5, None)]:
        lo = -math.inf if clamp[0] is None else clamp[0]
        hi = math.inf if clamp[1] is None else clamp[1]
        out = sample(backend, mu, lv, prior, kl="none", log_density="ratio", seed=2, logvar_clamp=clamp)
        check_terms(out, mu, lv, 2, prior, "none", "ratio", None, clamp=(lo, hi))
        lp = fv.gaussian_log_prob(mu, *prior, reduction="none", logvar_clamp=clamp, backend=backend[0])
        torch.testing.assert_close(lp.cpu().double(), log_prob64(mu, *prior, clamp=(lo, hi))[1].detach(),
                                   **KL_TOL[torch.float32])  # fmt: skip


def test_strided_and_expanded_inputs(backend):
    """Transposed inputs and a prior expanded from one row (a learned prior shared by the batch)."""
    device = backend[1]
    base_mu, base_lv = make_inputs((5, 6), torch.float32, device, seed=16)
    mu, lv = base_mu.t(), base_lv.t()
    row_mu, row_lv = make_inputs((1, 5), torch.float32, device, seed=17)
    prior = (row_mu.expand(6, 5), row_lv.expand(6, 5))
    out = sample(backend, mu, lv, prior, kl="per_sample", log_density="ratio", num_samples=2, seed=18)
    contiguous = tuple(t.contiguous() for t in prior)
    check_terms(out, mu.contiguous(), lv.contiguous(), 18, contiguous, "per_sample", "ratio", 2)
    lp = fv.gaussian_log_prob(base_mu[:, ::2], base_lv[:, ::2], row_lv.expand(5, 5)[:, :3], backend=backend[0])
    want = reduce64(log_prob64(base_mu[:, ::2], base_lv[:, ::2], row_lv.expand(5, 5)[:, :3])[1].detach(), "per_sample")
    torch.testing.assert_close(lp.cpu().double(), want, **REDUCED_KL_TOL[torch.float32])


def test_a_standard_prior_equals_no_prior(backend):
    device = backend[1]
    mu, lv = make_inputs((5, 7), torch.float32, device, seed=19)
    zeros = torch.zeros_like(mu)
    a = sample(backend, mu, lv, (zeros, zeros), kl="none", log_density="ratio", num_samples=2, seed=20)
    b = sample(backend, mu, lv, None, kl="none", log_density="ratio", num_samples=2, seed=20)
    assert torch.equal(a.z, b.z)
    torch.testing.assert_close(a.kl, b.kl, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.log_density, b.log_density, rtol=1e-6, atol=1e-5)


def test_agrees_with_torch_distributions(backend):
    device = backend[1]
    D = torch.distributions
    mu, lv = make_inputs((4, 6), torch.float64, device, seed=21)
    pm, pl = make_inputs((4, 6), torch.float64, device, seed=22)
    q, p = D.Normal(mu, (0.5 * lv).exp()), D.Normal(pm, (0.5 * pl).exp())
    kl = fv.gaussian_kl(mu, lv, prior=(pm, pl), reduction="none", backend=backend[0])
    torch.testing.assert_close(kl, D.kl_divergence(q, p), rtol=1e-10, atol=1e-10)
    out = sample(backend, mu, lv, (pm, pl), log_density="q", num_samples=3, seed=23)
    torch.testing.assert_close(out.log_density, q.log_prob(out.z).sum(-1), rtol=1e-6, atol=1e-6)
    ratio = sample(backend, mu, lv, (pm, pl), log_density="ratio", num_samples=3, seed=23).log_density
    torch.testing.assert_close(ratio, (q.log_prob(out.z) - p.log_prob(out.z)).sum(-1), rtol=1e-6, atol=1e-6)
    x = make_inputs((4, 6), torch.float64, device, seed=24)[0]
    lp = fv.gaussian_log_prob(x, mu, lv, reduction="none", backend=backend[0])
    torch.testing.assert_close(lp, q.log_prob(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_inputs(backend, reduction):
    device = backend[1]
    for shape in EMPTY_SHAPES:
        mu = torch.empty(shape, device=device)
        prior = (mu.clone(), mu.clone())
        out = sample(backend, mu, mu.clone(), prior, kl=reduction, log_density="ratio", num_samples=2, seed=1)
        assert out.z.shape == (2, *shape) and out.log_density.shape == (2, shape[0])
        assert not out.log_density.any()
        check_empty_reduced(out.kl, shape, reduction)
        check_empty_reduced(fv.gaussian_log_prob(mu, mu.clone(), mu.clone(), reduction=reduction, backend=backend[0]),
                            shape, reduction)


def test_nan_and_inf_follow_ieee(backend):
    device = backend[1]
    nan, inf = math.nan, math.inf
    mu = torch.tensor([[0.1, 0.2, 0.3, 0.4]], device=device)
    lv = torch.zeros(1, 4, device=device)
    pm = torch.tensor([[nan, 0.0, inf, 0.0]], device=device)
    pl = torch.tensor([[0.0, -inf, 0.0, 200.0]], device=device)
    kl = fv.gaussian_kl(mu, lv, prior=(pm, pl), reduction="none", backend=backend[0])
    _, _, kl64, _, _ = terms64(mu, lv, 0, prior=(pm, pl))
    for got, want in ((kl.cpu().double(), kl64.detach()),):
        assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
        assert torch.equal(torch.isposinf(got), torch.isposinf(want)), (got, want)
    assert torch.isfinite(kl[0, 3]), "exp(-200) underflows to 0: the KL is finite (nothing clamped)"
    lp = fv.gaussian_log_prob(mu, pm, pl, reduction="none", backend=backend[0])
    assert torch.isnan(lp[0, 0]) and torch.isneginf(lp[0, 2])
    ratio = sample(backend, mu, lv, (pm, pl), log_density="ratio", seed=1).log_density
    assert torch.isnan(ratio[0]), "one NaN element makes the row's log density NaN"


# --------------------------------------------------------------------------- gradients


def _weights(outs, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]


@pytest.mark.parametrize("kl", ["none", "per_sample", "batchmean"])
@pytest.mark.parametrize("path", [False, True])
@pytest.mark.parametrize("prior", [False, True])
def test_float32_gradients_match_float64_autograd(backend, kl, path, prior):
    device = backend[1]
    shape = (6, 11)
    mu, lv = make_inputs(shape, torch.float32, device, seed=25, requires_grad=True)
    pr = make_inputs(shape, torch.float32, device, seed=26, requires_grad=True) if prior else None
    for log_density in ("q", "ratio"):
        out = sample(backend, mu, lv, pr, kl=kl, log_density=log_density, path_gradient=path, num_samples=2, seed=27)
        ws = _weights(out, 3)
        leaves = [mu, lv, *(pr or ())]
        got = torch.autograd.grad(sum((o.double() * w.to(device)).sum() for o, w in zip(out, ws)), leaves)
        ref_leaves, z64, kl64, log_q64, ratio64 = terms64(mu, lv, 27, 2, pr, path=path)
        outs64 = (z64, reduce64(kl64, kl), log_q64 if log_density == "q" else ratio64)
        want = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs64, ws)), ref_leaves, allow_unused=True)
        for g, w in zip(got, want):
            w = torch.zeros(shape, dtype=torch.float64) if w is None else w
            torch.testing.assert_close(g.cpu().double(), w, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_log_prob_gradients_match_float64_autograd(backend, reduction):
    device = backend[1]
    x, mu = make_inputs((5, 9), torch.float32, device, seed=28, requires_grad=True)
    lv = make_inputs((5, 9), torch.float32, device, seed=29, requires_grad=True)[0]
    lp = fv.gaussian_log_prob(x, mu, lv, reduction=reduction, logvar_clamp=(-1.5, None), backend=backend[0])
    (w,) = _weights((lp,), 4)
    got = torch.autograd.grad((lp.double() * w.to(device)).sum(), (x, mu, lv))
    leaves, lp64 = log_prob64(x, mu, lv, clamp=(-1.5, math.inf))
    want = torch.autograd.grad((reduce64(lp64, reduction) * w).sum(), leaves)
    for g, e in zip(got, want):
        torch.testing.assert_close(g.cpu().double(), e, rtol=1e-5, atol=1e-5)


def test_clamp_zeroes_both_logvar_gradients_outside(backend):
    device = backend[1]
    mu = torch.tensor([[0.1, 0.2, 0.3, 0.4]], device=device, requires_grad=True)
    lv = torch.tensor([[-50.0, -1.0, 1.0, 50.0]], device=device, requires_grad=True)
    pm = torch.zeros(1, 4, device=device, requires_grad=True)
    pl = torch.tensor([[50.0, 1.0, -1.0, -50.0]], device=device, requires_grad=True)
    out = sample(backend, mu, lv, (pm, pl), kl="sum", log_density="ratio", seed=1, logvar_clamp=(-1.0, 1.0))
    (out.z.sum() + out.kl + out.log_density.sum()).backward()
    assert lv.grad[0, 0] == 0 and lv.grad[0, 3] == 0 and pl.grad[0, 0] == 0 and pl.grad[0, 3] == 0
    assert lv.grad[0, 1] != 0 and pl.grad[0, 2] != 0, "the bounds themselves pass the gradient"


def test_gradcheck_and_gradgradcheck_float64(backend):
    device = backend[1]
    shape = gradcheck_shape(backend, (3, 5))
    fast = is_simulated(backend)
    check = dict(eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=fast)
    inputs = [t.requires_grad_() for t in (*make_inputs(shape, torch.float64, device, seed=30),
                                           *make_inputs(shape, torch.float64, device, seed=31))]  # fmt: skip

    def terms(m, v, a, b):
        s = fv.sample_gaussian(m, v, prior=(a, b), num_samples=2, kl="per_sample", log_density="ratio", seed=5,
                               backend=backend[0])
        return s.z, s.kl, s.log_density

    def density(m, v):
        return fv.sample_gaussian(m, v, num_samples=2, log_density="q", kl="sum", seed=6, backend=backend[0])[1:]

    def log_prob(x, m, v):
        return fv.gaussian_log_prob(x, m, v, reduction="batchmean", backend=backend[0])

    for fn, args in ((terms, inputs), (density, inputs[:2]), (log_prob, inputs[:3])):
        assert torch.autograd.gradcheck(fn, args, **check)
        assert torch.autograd.gradgradcheck(fn, args, **check)


def test_path_gradient_has_the_total_value_and_the_reference_derivatives(backend):
    """Sticking the landing: the same log q, its gradient through z only, and second
    derivatives equal to the reference's (q's parameters constant at every order)."""
    device = backend[1]
    results = []
    for name in (backend[0], "reference"):
        mu, lv = make_inputs((4, 6), torch.float64, device, seed=32, requires_grad=True)
        pm, pl = make_inputs((4, 6), torch.float64, device, seed=33, requires_grad=True)
        total = fv.sample_gaussian(mu, lv, prior=(pm, pl), num_samples=3, log_density="ratio", seed=8, backend=name)
        path = fv.sample_gaussian(mu, lv, prior=(pm, pl), num_samples=3, log_density="ratio", path_gradient=True,
                                  seed=8, backend=name)  # fmt: skip
        torch.testing.assert_close(total.log_density, path.log_density, rtol=0, atol=0)
        g = torch.autograd.grad(path.log_density.sum(), (mu, lv, pm, pl), create_graph=True)
        gg = torch.autograd.grad(sum((x * x).sum() for x in g), (mu, lv, pm, pl))
        results.append([t.detach() for t in (*g, *gg)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_forward_mode_and_func_transforms(backend):
    name, device = backend
    mu, lv = make_inputs((3, 5), torch.float64, device, seed=34)
    pm, pl = make_inputs((3, 5), torch.float64, device, seed=35)
    t_mu, t_lv = make_inputs((3, 5), torch.float64, device, seed=36)

    def ratio(m, v):
        return fv.sample_gaussian(m, v, prior=(pm, pl), num_samples=2, kl="sum", log_density="ratio", seed=9,
                                  backend=name)[1:]  # fmt: skip

    (kl, lr), (dkl, dlr) = torch.func.jvp(ratio, (mu, lv), (t_mu, t_lv))
    h = 1e-6
    plus, minus = ratio(mu + h * t_mu, lv + h * t_lv), ratio(mu - h * t_mu, lv - h * t_lv)
    torch.testing.assert_close(dkl, (plus[0] - minus[0]) / (2 * h), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dlr, (plus[1] - minus[1]) / (2 * h), rtol=1e-6, atol=1e-6)
    fused = ratio(mu, lv)
    torch.testing.assert_close(kl, fused[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lr, fused[1], rtol=1e-6, atol=1e-6)
    loss = lambda m, v: ratio(m, v)[1].sum()  # noqa: E731
    g_func = torch.func.grad(loss, argnums=(0, 1))(mu, lv)
    m2, v2 = mu.clone().requires_grad_(), lv.clone().requires_grad_()
    g_eager = torch.autograd.grad(loss(m2, v2), (m2, v2))
    for a, b in zip(g_func, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    x = make_inputs((4, 3, 5), torch.float64, device, seed=37)[0]
    lp = torch.vmap(lambda xi: fv.gaussian_log_prob(xi, mu, lv, reduction="sum", backend=name))(x)
    torch.testing.assert_close(lp, torch.stack([fv.gaussian_log_prob(xi, mu, lv, reduction="sum", backend=name)
                                                for xi in x]))  # fmt: skip
    per_example = torch.vmap(lambda m, v: fv.gaussian_kl(m, v, prior=(pm[0], pl[0]), reduction="sum", backend=name))
    torch.testing.assert_close(per_example(mu, lv), fv.gaussian_kl(mu, lv, prior=(pm[:1].expand(3, 5), pl[:1].expand(3, 5)),
                                                                  reduction="per_sample", backend=name))  # fmt: skip


def test_torch_export(backend):
    name, device = backend

    class Terms(torch.nn.Module):
        def forward(self, m, v, a, b, seed):
            s = fv.sample_gaussian(m, v, prior=(a, b), num_samples=2, kl="batchmean", log_density="ratio", seed=seed,
                                   backend=name)  # fmt: skip
            return s.z, s.kl, s.log_density, fv.gaussian_log_prob(s.z[0], a, b, backend=name)

    args = (*make_inputs((4, 6), torch.float32, device, seed=38), *make_inputs((4, 6), torch.float32, device, seed=39),
            torch.tensor(5, device=device))  # fmt: skip
    exported = torch.export.export(Terms(), args)
    for a, b in zip(exported.module()(*args), Terms()(*args)):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- statistics


def test_sample_log_densities_have_the_right_expectations(backend):
    """E_q[log q - log p] = KL(q || p) and -E_q[log q] = the entropy, per row, within
    4 standard errors of the Monte-Carlo means (fresh seeds, 4000 samples; 250 on the slow
    simulated devices, whose noise other tests hold to fv.standard_normal and whose log
    densities to float64 math)."""
    device = backend[1]
    mu, lv = make_inputs((3, 4), torch.float64, device, seed=40)
    pm, pl = make_inputs((3, 4), torch.float64, device, seed=41)
    n = 250 if is_simulated(backend) else 4000
    ratio = sample(backend, mu, lv, (pm, pl), log_density="ratio", num_samples=n, seed=42).log_density
    log_q = sample(backend, mu, lv, None, log_density="q", num_samples=n, seed=43).log_density
    kl = fv.gaussian_kl(mu, lv, prior=(pm, pl), reduction="per_sample", backend=backend[0])
    entropy = 0.5 * (lv + math.log(2 * math.pi) + 1).sum(-1)
    for values, expected in ((ratio, kl), (-log_q, entropy)):
        se = values.std(0) / math.sqrt(n)
        assert ((values.mean(0) - expected).abs() < 4 * se).all(), (values.mean(0), expected, se)

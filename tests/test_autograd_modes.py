"""Every autograd mode of docs/design.md section 7, on every backend, against the reference.

Double backward (gradgradcheck in float64), forward-mode AD against finite differences,
the torch.func transforms, vmap with each randomness mode, activation checkpointing and
torch.export. Each test holds a backend to an independent answer: finite differences,
the analytic derivatives, or a Python loop.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.utils.checkpoint import checkpoint

import fused_vae as fv
from helpers import REDUCTIONS, gradcheck_shape, is_simulated, make_inputs

SHAPE = (3, 5)


def gradgradcheck(backend, fn, inputs):
    """torch.autograd.gradgradcheck in float64; on the slow simulated devices in fast mode
    (random projections of the Jacobians instead of every column)."""
    return torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=is_simulated(backend))


def op(name, reduction="per_sample", num_samples=None, clamp=None, seed=77):
    def fn(m, v):
        return fv.reparameterize_kl(
            m, v, reduction=reduction, seed=seed, num_samples=num_samples, logvar_clamp=clamp, backend=name
        )

    return fn


def away_from_clamp_bounds(lv, bounds):
    with torch.no_grad():
        for b in bounds:
            lv[(lv - b).abs() < 1e-2] += 0.05


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("num_samples", [None, 2])
def test_gradgradcheck_float64(backend, reduction, num_samples):
    name, device = backend
    mu, lv = make_inputs(gradcheck_shape(backend, SHAPE), torch.float64, device, seed=31, requires_grad=True)
    fn = op(name, reduction, num_samples)
    assert gradgradcheck(backend, fn, (mu, lv))


def test_gradgradcheck_with_clamp_and_one_output(backend):
    name, device = backend
    mu, lv = make_inputs(gradcheck_shape(backend, SHAPE), torch.float64, device, seed=32, lv_scale=2.0, requires_grad=True)
    away_from_clamp_bounds(lv, (-1.0, 1.0))
    both = op(name, "sum", clamp=(-1.0, 1.0))
    assert gradgradcheck(backend, both, (mu, lv))
    z_only = lambda m, v: fv.reparameterize(m, v, seed=5, num_samples=2, backend=name)  # noqa: E731
    assert gradgradcheck(backend, z_only, (mu, lv))
    kl_only = lambda m, v: fv.gaussian_kl(m, v, reduction="batchmean", backend=name)  # noqa: E731
    assert gradgradcheck(backend, kl_only, (mu, lv))


def test_gaussian_kl_second_derivatives_are_analytic(backend):
    """d2KL/dmu2 = 1, d2KL/dlogvar2 = 0.5 exp(logvar), mixed = 0, per element."""
    name, device = backend
    mu, lv = make_inputs(SHAPE, torch.float64, device, seed=33, requires_grad=True)
    kl = fv.gaussian_kl(mu, lv, reduction="sum", backend=name)
    g_mu, g_lv = torch.autograd.grad(kl, (mu, lv), create_graph=True)
    torch.testing.assert_close(g_mu, mu.detach())
    torch.testing.assert_close(g_lv, 0.5 * (lv.detach().exp() - 1))
    h_mu_mu, h_mu_lv = torch.autograd.grad(
        g_mu.sum(), (mu, lv), retain_graph=True, allow_unused=True, materialize_grads=True
    )
    h_lv_mu, h_lv_lv = torch.autograd.grad(g_lv.sum(), (mu, lv), allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(h_mu_mu, torch.ones_like(mu))
    torch.testing.assert_close(h_lv_lv, 0.5 * lv.detach().exp())
    torch.testing.assert_close(h_mu_lv, torch.zeros_like(mu))
    torch.testing.assert_close(h_lv_mu, torch.zeros_like(mu))


def test_third_derivative_of_z(backend):
    """d3/dlogvar3 of sum(z) = (1/8) std * eps, where std * eps = z - mu."""
    name, device = backend
    mu, lv = make_inputs(SHAPE, torch.float64, device, seed=34, requires_grad=True)
    z = fv.reparameterize(mu, lv, seed=9, backend=name)
    (g,) = torch.autograd.grad(z.sum(), lv, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), lv, create_graph=True)
    (ggg,) = torch.autograd.grad(gg.sum(), lv)
    torch.testing.assert_close(ggg, (z - mu).detach() / 8)


def finite_difference_jvp(fn, primals, tangents, h=1e-6):
    plus = fn(*[p + h * t for p, t in zip(primals, tangents)])
    minus = fn(*[p - h * t for p, t in zip(primals, tangents)])
    return [(a - b) / (2 * h) for a, b in zip(plus, minus)]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("num_samples", [None, 2])
def test_func_jvp_matches_finite_differences(backend, reduction, num_samples):
    name, device = backend
    mu, lv = make_inputs(SHAPE, torch.float64, device, seed=35)
    t_mu, t_lv = make_inputs(SHAPE, torch.float64, device, seed=36)
    fn = op(name, reduction, num_samples)
    (z, kl), (dz, dkl) = torch.func.jvp(fn, (mu, lv), (t_mu, t_lv))
    fd_z, fd_kl = finite_difference_jvp(fn, (mu, lv), (t_mu, t_lv))
    torch.testing.assert_close(dz, fd_z, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dkl, fd_kl, atol=1e-6, rtol=1e-6)
    assert dkl.abs().sum() > 0 and dz.abs().sum() > 0  # a zero tangent would be the old silent bug
    ref_z, ref_kl = fn(mu, lv)  # the fused op's values: the composite path agrees
    torch.testing.assert_close(z, ref_z, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(kl, ref_kl, atol=1e-9, rtol=1e-9)


def test_forward_ad_dual_tensors(backend):
    """torch.autograd.forward_ad: tangent of z is dmu + 0.5 std eps dlogvar; of KL analytic."""
    name, device = backend
    mu, lv = make_inputs(SHAPE, torch.float64, device, seed=37)
    t_mu, t_lv = make_inputs(SHAPE, torch.float64, device, seed=38)
    with fwAD.dual_level():
        z, kl = op(name, "none")(fwAD.make_dual(mu, t_mu), fwAD.make_dual(lv, t_lv))
        z_p, dz = fwAD.unpack_dual(z)
        kl_p, dkl = fwAD.unpack_dual(kl)
    torch.testing.assert_close(dz, t_mu + 0.5 * (z_p - mu) * t_lv)
    torch.testing.assert_close(dkl, mu * t_mu + 0.5 * (lv.exp() - 1) * t_lv)


def test_func_grad_vjp_jacrev_jacfwd_hessian(backend):
    name, device = backend
    mu, lv = make_inputs((4,), torch.float64, device, seed=39)
    seed = 11

    def loss(m, v):
        z, kl = fv.reparameterize_kl(m, v, reduction="sum", seed=seed, backend=name)
        return (z * z).sum() + kl

    z = fv.reparameterize(mu, lv, seed=seed, backend=name)
    eps = (z - mu) / (0.5 * lv).exp()
    std = (0.5 * lv).exp()
    # analytic: d/dmu = 2z + mu, d/dlv = 2z * 0.5 std eps + 0.5 (e^lv - 1)
    g_mu = 2 * z + mu
    g_lv = z * std * eps + 0.5 * (lv.exp() - 1)
    gm, gl = torch.func.grad(loss, argnums=(0, 1))(mu, lv)
    torch.testing.assert_close(gm, g_mu)
    torch.testing.assert_close(gl, g_lv)
    _, vjp_fn = torch.func.vjp(loss, mu, lv)
    vm, vl = vjp_fn(torch.tensor(1.0, dtype=torch.float64, device=device))
    torch.testing.assert_close(vm, g_mu)
    torch.testing.assert_close(vl, g_lv)
    z_of_mu = lambda m: fv.reparameterize(m, lv, seed=seed, backend=name)  # noqa: E731
    torch.testing.assert_close(torch.func.jacrev(z_of_mu)(mu), torch.eye(4, dtype=torch.float64, device=device))
    torch.testing.assert_close(torch.func.jacfwd(z_of_mu)(mu), torch.eye(4, dtype=torch.float64, device=device))
    # d2/dmu2 = 2 + 1 on the diagonal; d2/dlv2 = 2 (0.5 std eps)^2 + 2 z 0.25 std eps + 0.5 e^lv
    h_mu = torch.func.hessian(loss, argnums=0)(mu, lv)
    torch.testing.assert_close(h_mu, torch.diag(torch.full_like(mu, 3.0)))
    h_lv = torch.func.hessian(loss, argnums=1)(mu, lv)
    half = 0.5 * std * eps
    torch.testing.assert_close(h_lv, torch.diag(2 * half * half + 2 * z * 0.5 * half + 0.5 * lv.exp()))


def test_vmap_equals_a_python_loop(backend):
    name, device = backend
    mu, lv = make_inputs((4, 3, 5), torch.float32, device, seed=40)

    def fn(m, v):
        return fv.reparameterize_kl(m, v, reduction="per_sample", seed=21, num_samples=2, backend=name)

    z, kl = torch.vmap(fn)(mu, lv)
    loop = [fn(mu[i], lv[i]) for i in range(4)]
    torch.testing.assert_close(z, torch.stack([zi for zi, _ in loop]), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(kl, torch.stack([ki for _, ki in loop]), atol=2e-5, rtol=2e-5)


def test_vmap_randomness_modes_for_seed_none(backend):
    name, device = backend
    mu = torch.zeros(3, 2, 8, device=device)  # zero mean, unit variance: z is the noise itself
    lv = torch.zeros(3, 2, 8, device=device)

    def fn(m, v):
        return fv.reparameterize(m, v, backend=name)

    with pytest.raises(RuntimeError, match="randomness"):
        torch.vmap(fn)(mu, lv)
    same = torch.vmap(fn, randomness="same")(mu, lv)
    torch.testing.assert_close(same[0], same[1])
    torch.testing.assert_close(same[0], same[2])
    different = torch.vmap(fn, randomness="different")(mu, lv)
    assert not torch.allclose(different[0], different[1])
    torch.manual_seed(3)
    again_a = torch.vmap(fn, randomness="different")(mu, lv)
    torch.manual_seed(3)
    again_b = torch.vmap(fn, randomness="different")(mu, lv)
    torch.testing.assert_close(again_a, again_b)


def test_activation_checkpointing_recomputes_the_same_noise(backend):
    name, device = backend
    mu, lv = make_inputs((4, 6), torch.float32, device, seed=41, requires_grad=True)
    w = torch.randn(6, 6, device=device)

    def block(m, v):
        z, kl = fv.reparameterize_kl(m, v, backend=name)  # seed=None: drawn from torch's generator
        return (torch.tanh(z @ w)).sum() + kl

    torch.manual_seed(7)
    plain = block(mu, lv)
    g_plain = torch.autograd.grad(plain, (mu, lv))
    torch.manual_seed(7)
    ckpt = checkpoint(block, mu, lv, use_reentrant=False)
    g_ckpt = torch.autograd.grad(ckpt, (mu, lv))
    torch.testing.assert_close(ckpt, plain)
    for a, b in zip(g_ckpt, g_plain):
        torch.testing.assert_close(a, b)


def test_torch_export(backend):
    name, device = backend

    class Posterior(torch.nn.Module):
        def forward(self, m, v, seed):
            return fv.reparameterize_kl(m, v, seed=seed, reduction="per_sample", backend=name)

    mu, lv = make_inputs((4, 6), torch.float32, device, seed=42)
    seed = torch.tensor(5, device=device)
    exported = torch.export.export(Posterior(), (mu, lv, seed))
    z, kl = exported.module()(mu, lv, seed)
    ref_z, ref_kl = Posterior()(mu, lv, seed)
    torch.testing.assert_close(z, ref_z)
    torch.testing.assert_close(kl, ref_kl)


def test_create_graph_gradient_penalty_trains_like_reference(backend):
    """A gradient penalty (create_graph=True) gives the reference backend's parameter gradient."""
    name, device = backend
    x = torch.randn(5, 4, device=device, dtype=torch.float64)
    results = []
    for which in (name, "reference"):
        torch.manual_seed(0)
        lin = torch.nn.Linear(4, 6, dtype=torch.float64, device=device)
        m, v = lin(x).chunk(2, dim=1)
        z, kl = fv.reparameterize_kl(m, v, seed=3, reduction="sum", backend=which)
        loss = (z**2).sum() + kl
        (g_m,) = torch.autograd.grad(loss, m, create_graph=True)
        penalty = (g_m**2).sum()
        results.append(torch.autograd.grad(loss + penalty, lin.weight)[0])
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-6)

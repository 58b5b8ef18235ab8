"""Gradients: gradcheck in float64, float32 against float64 math, partial outputs, clamp."""

from __future__ import annotations

import pytest
import torch

import fused_vae as fv
from helpers import REDUCTIONS, gradcheck_shape, is_simulated, make_inputs
from independent import math64


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("num_samples", [None, 3])
def test_gradcheck_float64(backend, reduction, num_samples):
    name, device = backend
    mu, lv = make_inputs(gradcheck_shape(backend, (3, 5)), torch.float64, device, seed=21, requires_grad=True)

    def fn(m, v):
        return fv.reparameterize_kl(m, v, reduction=reduction, seed=77, num_samples=num_samples, backend=name)

    assert torch.autograd.gradcheck(fn, (mu, lv), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=is_simulated(backend))


def test_gradcheck_with_clamp(backend):
    name, device = backend
    mu, lv = make_inputs(gradcheck_shape(backend, (4, 5)), torch.float64, device, seed=22, lv_scale=3.0, requires_grad=True)

    def fn(m, v):
        return fv.reparameterize_kl(m, v, reduction="sum", seed=5, logvar_clamp=(-1.5, 1.5), backend=name)

    # keep logvar away from the kinks at the bounds, where finite differences straddle them
    with torch.no_grad():
        near = (lv.abs() - 1.5).abs() < 1e-3
        lv[near] += 0.01
    assert torch.autograd.gradcheck(fn, (mu, lv), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=is_simulated(backend))


def expected_grads(mu, lv, seed, gz, gkl_elem, num_samples=None, clamp=None):
    """Analytic float64 gradients of sum(gz * z) + sum(gkl_elem * kl_elem)."""
    _, _, eps = math64(mu, lv, seed, num_samples, clamp)
    m, v = mu.detach().double().cpu(), lv.detach().double().cpu()
    vc = v.clamp(min=clamp[0], max=clamp[1]) if clamp else v
    gz = gz.double().cpu().reshape(eps.shape)
    gkl = gkl_elem.double().cpu()
    std = torch.exp(0.5 * vc)
    g_mu = gz.sum(0) + gkl * m
    g_lv = 0.5 * std * (gz * eps).sum(0) + gkl * 0.5 * (torch.exp(vc) - 1)
    if clamp:
        g_lv = torch.where((v >= clamp[0]) & (v <= clamp[1]), g_lv, torch.zeros_like(g_lv))
    return g_mu, g_lv


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("num_samples", [None, 2])
def test_float32_gradients_match_float64_math(backend, reduction, num_samples):
    name, device = backend
    shape = (6, 11)
    mu, lv = make_inputs(shape, torch.float32, device, seed=23, requires_grad=True)
    z, kl = fv.reparameterize_kl(mu, lv, reduction=reduction, seed=99, num_samples=num_samples, backend=name)
    g = torch.Generator().manual_seed(3)
    gz = torch.randn(z.shape, generator=g).to(device)
    gkl = torch.randn(kl.shape, generator=g).to(device)
    torch.autograd.backward((z, kl), (gz, gkl))
    if reduction == "none":
        gkl_elem = gkl
    elif reduction == "per_sample":
        gkl_elem = gkl[:, None].expand(shape)
    else:
        gkl_elem = gkl.expand(shape) / (shape[0] if reduction == "batchmean" else 1)
    g_mu, g_lv = expected_grads(mu, lv, 99, gz, gkl_elem.cpu(), num_samples)
    torch.testing.assert_close(mu.grad.cpu().double(), g_mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lv.grad.cpu().double(), g_lv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients(backend, dtype):
    name, device = backend
    mu, lv = make_inputs((5, 8), dtype, device, seed=24, requires_grad=True)
    z, kl = fv.reparameterize_kl(mu, lv, reduction="sum", seed=4, backend=name)
    gz = torch.randn(z.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    torch.autograd.backward((z, kl), (gz, torch.tensor(0.5, device=device)))
    assert mu.grad.dtype == dtype and lv.grad.dtype == dtype
    g_mu, g_lv = expected_grads(mu, lv, 4, gz, torch.full((5, 8), 0.5))
    tol = dict(rtol=1.6e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(mu.grad.cpu().double(), g_mu, **tol)
    torch.testing.assert_close(lv.grad.cpu().double(), g_lv, **tol)


def test_only_z_or_only_kl_used(backend):
    name, device = backend
    mu, lv = make_inputs((4, 6), torch.float32, device, seed=25, requires_grad=True)
    z, kl = fv.reparameterize_kl(mu, lv, seed=6, backend=name)
    z.sum().backward()
    g_mu, g_lv = expected_grads(mu, lv, 6, torch.ones(4, 6), torch.zeros(4, 6))
    torch.testing.assert_close(mu.grad.cpu().double(), g_mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lv.grad.cpu().double(), g_lv, rtol=1e-5, atol=1e-5)
    mu.grad = lv.grad = None
    z, kl = fv.reparameterize_kl(mu, lv, seed=6, backend=name)
    kl.backward()
    g_mu, g_lv = expected_grads(mu, lv, 6, torch.zeros(4, 6), torch.full((4, 6), 0.25))
    torch.testing.assert_close(mu.grad.cpu().double(), g_mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lv.grad.cpu().double(), g_lv, rtol=1e-5, atol=1e-5)


def test_clamp_zeroes_gradient_outside_bounds(backend):
    name, device = backend
    mu = torch.tensor([[0.1, 0.2, 0.3, 0.4]], device=device, requires_grad=True)
    lv = torch.tensor([[-50.0, -1.0, 1.0, 50.0]], device=device, requires_grad=True)
    z, kl = fv.reparameterize_kl(mu, lv, seed=1, logvar_clamp=(-1.0, 1.0), backend=name)
    (z.sum() + kl).backward()
    assert lv.grad[0, 0] == 0 and lv.grad[0, 3] == 0
    assert lv.grad[0, 1] != 0 and lv.grad[0, 2] != 0, "the bounds themselves pass the gradient"


def test_gradient_of_expanded_upstream_grad(backend):
    """z.sum() gives an expanded (stride-0) grad_z; the backward must handle it."""
    name, device = backend
    mu, lv = make_inputs((3, 4), torch.float32, device, seed=26, requires_grad=True)
    z = fv.reparameterize(mu, lv, seed=2, num_samples=2, backend=name)
    z.mean().backward()
    g_mu, g_lv = expected_grads(mu, lv, 2, torch.full((2, 3, 4), 1 / 24), torch.zeros(3, 4), num_samples=2)
    torch.testing.assert_close(mu.grad.cpu().double(), g_mu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lv.grad.cpu().double(), g_lv, rtol=1e-5, atol=1e-6)


def test_no_grad_inputs_and_empty_backward(backend):
    name, device = backend
    mu, lv = make_inputs((0, 3), torch.float32, device, seed=0, requires_grad=True)
    z, kl = fv.reparameterize_kl(mu, lv, reduction="sum", seed=1, backend=name)
    (z.sum() + kl).backward()
    assert mu.grad.shape == (0, 3) and lv.grad.shape == (0, 3)
    mu2, lv2 = make_inputs((2, 3), torch.float32, device, seed=0)
    z2, kl2 = fv.reparameterize_kl(mu2, lv2, backend=name)
    assert not z2.requires_grad and not kl2.requires_grad


@pytest.mark.parametrize("shape", [(2, 4500), (3, 2049), (700, 3), (5, 7, 300)], ids=str)
@pytest.mark.parametrize("reduction", ["per_sample", "batchmean"])
def test_gradients_for_long_and_short_rows(backend, shape, reduction):
    """Rows split across tiles, and many rows per tile, route grad_kl to the right row."""
    name, device = backend
    if name == "triton" and device == "cpu" and shape[-1] > 1000:
        shape = (2, 600)
    mu, lv = make_inputs(shape, torch.float32, device, seed=27, requires_grad=True)
    z, kl = fv.reparameterize_kl(mu, lv, reduction=reduction, seed=12, backend=name)
    g = torch.Generator().manual_seed(5)
    gz = torch.randn(z.shape, generator=g).to(device)
    gkl = torch.randn(kl.shape, generator=g).to(device)
    torch.autograd.backward((z, kl), (gz, gkl))
    if reduction == "per_sample":
        gkl_elem = gkl.cpu().reshape(-1, *([1] * (len(shape) - 1))).expand(shape)
    else:
        gkl_elem = gkl.cpu().expand(shape) / shape[0]
    g_mu, g_lv = expected_grads(mu, lv, 12, gz, gkl_elem)
    torch.testing.assert_close(mu.grad.cpu().double(), g_mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lv.grad.cpu().double(), g_lv, rtol=1e-5, atol=1e-5)

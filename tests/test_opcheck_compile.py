"""torch.library registration: opcheck on the compiled ops and torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch

import fused_vae as fv
from helpers import backend_op_pair, make_inputs


FWD_ARGS = [
    # (shape, num_samples, kl_mode, logq_mode, prior, clamp_lo, clamp_hi, dtype)
    ((4, 6), 1, 4, 0, False, None, None, torch.float32),
    ((4, 6), 2, 1, 2, False, None, None, torch.float32),
    ((3, 5), 1, 2, 1, True, -1.0, 1.0, torch.float64),
    ((5,), 0, 3, 0, True, None, 2.0, torch.float32),
    ((2, 3, 4), 3, 0, 4, True, None, None, torch.bfloat16),
    ((3, 5), 2, 4, 3, False, None, None, torch.float64),
    ((0, 4), 1, 3, 2, True, None, None, torch.float32),  # batchmean of B=0 is NaN, which opcheck cannot compare
]


def _args(device, shape, num_samples, kl_mode, logq_mode, prior, lo, hi, dtype):
    grad = dtype != torch.bfloat16
    mu, lv = make_inputs(shape, dtype, device, seed=3, requires_grad=grad)
    pm, pl = make_inputs(shape, dtype, device, seed=4, requires_grad=grad) if prior else (None, None)
    return (mu, lv, pm, pl, torch.tensor(1234, device=device), num_samples, kl_mode, logq_mode, lo, hi)


@pytest.mark.parametrize("args", FWD_ARGS, ids=lambda a: f"{a[0]}-S{a[1]}-kl{a[2]}-lq{a[3]}-p{int(a[4])}-{a[7]}")
def test_opcheck_forward(op_backend, args):
    fwd, _ = backend_op_pair(op_backend)
    torch.library.opcheck(fwd, _args(op_backend[1], *args))


@pytest.mark.parametrize("kl_mode", [0, 1, 2, 3, 4])
def test_opcheck_backward(op_backend, kl_mode):
    fwd, bwd = backend_op_pair(op_backend)
    device = op_backend[1]
    for prior, logq_mode in ((False, 0), (True, 2), (False, 4)):
        args = _args(device, (4, 5), 2, kl_mode, logq_mode, prior, -3.0, 3.0, torch.float32)
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        z, kl, logq = fwd(*args)
        g = torch.Generator().manual_seed(kl_mode)
        grad_z = torch.randn(z.shape, generator=g).to(device)
        grad_kl = torch.randn(kl.shape, generator=g).to(device) if kl_mode else None
        grad_logq = torch.randn(logq.shape, generator=g).to(device) if logq_mode else None
        torch.library.opcheck(bwd, (grad_z, grad_kl, grad_logq, *args))
        torch.library.opcheck(bwd, (None, grad_kl, grad_logq, *args[:-2], None, None))


@pytest.mark.parametrize("reduction", [1, 2, 3, 4])
def test_opcheck_log_prob(op_backend, reduction):
    fwd, bwd = backend_op_pair(op_backend, "gaussian_log_prob")
    device = op_backend[1]
    x, mu = make_inputs((3, 5), torch.float32, device, seed=6, requires_grad=True)
    lv = torch.randn(3, 5, generator=torch.Generator().manual_seed(7)).to(device).requires_grad_()
    torch.library.opcheck(fwd, (x, mu, lv, reduction, -2.0 if reduction == 2 else None, None))
    out = fwd(x.detach(), mu.detach(), lv.detach(), reduction, None, None)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(8)).to(device)
    torch.library.opcheck(bwd, (grad, x.detach(), mu.detach(), lv.detach(), reduction, None, 1.0))


def training_step(mu, lv, seed, backend):
    z, kl = fv.reparameterize_kl(mu, lv, seed=seed, backend=backend)
    return (z * z).mean() + 0.5 * kl


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(backend, dynamic):
    name, device = backend
    torch._dynamo.reset()
    step = torch.compile(training_step, fullgraph=True, dynamic=dynamic)
    # A repeated shape reuses the compiled graph; a new one recompiles (static) or reuses
    # the dynamic graph, so only the dynamic case needs the third, costly call.
    shapes = [(8, 16), (8, 16), (12, 16)] if dynamic else [(8, 16), (8, 16)]
    for i, shape in enumerate(shapes):
        mu, lv = make_inputs(shape, torch.float32, device, seed=i, requires_grad=True)
        seed = torch.tensor(100 + i, device=device)
        loss = step(mu, lv, seed, name)
        loss.backward()
        mu2, lv2 = make_inputs(shape, torch.float32, device, seed=i, requires_grad=True)
        eager = training_step(mu2, lv2, seed, name)
        eager.backward()
        torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mu.grad, mu2.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lv.grad, lv2.grad, rtol=1e-5, atol=1e-6)


def test_torch_compile_seed_none_and_reductions(backend):
    name, device = backend
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def fn(mu, lv):
        z, kl = fv.reparameterize_kl(mu, lv, reduction="per_sample", num_samples=2, backend=name)
        return z, kl, fv.gaussian_kl(mu, lv, reduction="sum", backend=name)

    mu, lv = make_inputs((4, 8), torch.float32, device, seed=5)
    torch.manual_seed(0)
    z1, kl1, s1 = fn(mu, lv)
    torch.manual_seed(0)
    z2, _, _ = fn(mu, lv)
    z3, _, _ = fn(mu, lv)
    assert z1.shape == (2, 4, 8)
    assert torch.equal(z1, z2) and not torch.equal(z1, z3)
    torch.testing.assert_close(kl1.sum(), s1)


def terms_step(mu, lv, pm, pl, x, seed, backend):
    s = fv.sample_gaussian(mu, lv, prior=(pm, pl), num_samples=2, kl="batchmean", log_density="ratio", seed=seed,
                           backend=backend)
    log_px = fv.gaussian_log_prob(x, s.z[0], pl, backend=backend)
    return (s.z * s.z).mean() + s.kl + s.log_density.mean() - log_px.mean()


def test_torch_compile_prior_log_density_and_log_prob(backend):
    name, device = backend
    torch._dynamo.reset()
    step = torch.compile(terms_step, fullgraph=True)
    results = []
    for fn in (step, terms_step):
        inputs = [t.requires_grad_() for t in (*make_inputs((6, 8), torch.float32, device, seed=9),
                                               *make_inputs((6, 8), torch.float32, device, seed=10))]  # fmt: skip
        x = make_inputs((6, 8), torch.float32, device, seed=11)[0]
        loss = fn(*inputs, x, torch.tensor(5, device=device), name)
        results.append((loss, torch.autograd.grad(loss, inputs)))
    (lc, gc), (le, ge) = results
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

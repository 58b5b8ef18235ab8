"""torch.library registration: opcheck on the compiled ops and torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch

import fused_vae as fv
from helpers import backend_op_pair, make_inputs


def compiled_backend_cases(op_backend):
    fwd, bwd = backend_op_pair(op_backend)
    return fwd, bwd, op_backend[1]


FWD_ARGS = [
    # (shape, num_samples, kl_mode, clamp_lo, clamp_hi, dtype)
    ((4, 6), 1, 4, None, None, torch.float32),
    ((4, 6), 2, 1, None, None, torch.float32),
    ((3, 5), 1, 2, -1.0, 1.0, torch.float64),
    ((5,), 0, 3, None, 2.0, torch.float32),
    ((2, 3, 4), 3, 0, None, None, torch.bfloat16),
    ((0, 4), 1, 3, None, None, torch.float32),  # batchmean of B=0 is NaN, which opcheck cannot compare
]


@pytest.mark.parametrize("args", FWD_ARGS, ids=lambda a: f"{a[0]}-S{a[1]}-kl{a[2]}-{a[5]}")
def test_opcheck_forward(op_backend, args):
    fwd, _, device = compiled_backend_cases(op_backend)
    shape, num_samples, kl_mode, lo, hi, dtype = args
    mu, lv = make_inputs(shape, dtype, device, seed=3, requires_grad=dtype != torch.bfloat16)
    seed = torch.tensor(1234, device=device)
    torch.library.opcheck(fwd, (mu, lv, seed, num_samples, kl_mode, lo, hi))


@pytest.mark.parametrize("kl_mode", [0, 1, 2, 3, 4])
def test_opcheck_backward(op_backend, kl_mode):
    fwd, bwd, device = compiled_backend_cases(op_backend)
    mu, lv = make_inputs((4, 5), torch.float32, device, seed=4)
    seed = torch.tensor(99, device=device)
    z, kl = fwd(mu, lv, seed, 2, kl_mode, -3.0, 3.0)
    grad_z = torch.randn_like(z)
    grad_kl = torch.randn_like(kl) if kl_mode else None
    torch.library.opcheck(bwd, (grad_z, grad_kl, mu, lv, seed, 2, kl_mode, -3.0, 3.0))
    torch.library.opcheck(bwd, (None, grad_kl, mu, lv, seed, 2, kl_mode, None, None))


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

"""Helpers the test modules import: dtypes and reductions to sweep, tolerances, inputs,
the float64 output check, misaligned copies, the ops of a (backend, device) case and a
fresh-interpreter runner. Fixtures and hooks live in conftest.py; the independent float64
/ Philox reference lives in independent.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from independent import math64, reduce64

ROOT = Path(__file__).resolve().parents[1]

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
REDUCTIONS = ["none", "per_sample", "sum", "batchmean"]

# Tolerances of a backend's output against float64 math on the same (rounded) inputs.
# float32 and float64 differ from float64 math mainly through the float32 noise stream,
# whose transcendental functions differ across backends by a few ulps.
Z_TOL = {
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.float64: dict(rtol=2e-6, atol=2e-6),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
KL_TOL = {**Z_TOL, torch.float64: dict(rtol=1e-10, atol=1e-10)}
# Reduced KL accumulates in float32 (float64 for float64 inputs), whatever the input dtype.
REDUCED_KL_TOL = {dt: dict(rtol=2e-5, atol=1e-4) for dt in (torch.float32, torch.float16, torch.bfloat16)}
REDUCED_KL_TOL[torch.float64] = dict(rtol=1e-10, atol=1e-10)
# A sample's log density sums terms of the float32 noise (eps^2): the noise's rounding sets
# the float64 tolerance; the others are the reduced KL's.
LOG_DENSITY_TOL = {**REDUCED_KL_TOL, torch.float64: dict(rtol=2e-6, atol=2e-6)}

# The prefix of the ops each (backend, device) case runs (the reference backend has none).
_OP_PREFIX = {
    ("cpu", "cpu"): "",
    ("cuda", "cuda"): "",
    ("cuda", "cpu"): "cuda_emu_",  # the emulated CUDA device
    ("triton", "cuda"): "triton_",
    ("triton", "cpu"): "triton_",
}


def backend_op_pair(backend_case, op: str = "reparam_kl"):
    """(forward op, backward op) of op family ``op`` for a (backend, device) case, or None
    for the reference backend."""
    prefix = _OP_PREFIX.get(tuple(backend_case))
    if prefix is None:
        return None
    return getattr(torch.ops.fused_vae, f"{prefix}{op}_fwd"), getattr(torch.ops.fused_vae, f"{prefix}{op}_bwd")


def is_simulated(backend_case) -> bool:
    """Whether a (backend, device) case runs GPU kernels on the CPU, slowly: Triton in its
    interpreter or the CUDA kernels on the emulated device. Tests use smaller sizes there."""
    return tuple(backend_case) in (("triton", "cpu"), ("cuda", "cpu"))


def gradcheck_shape(backend_case, shape):
    """The input shape for torch.autograd.gradcheck / gradgradcheck, which cost a backward
    per input element: (2, 3) on the slow simulated devices (still D % 4 != 0, so Philox
    groups straddle rows), else ``shape``. Those devices also use fast_mode."""
    return (2, 3) if is_simulated(backend_case) else shape


def make_inputs(shape, dtype, device, seed, *, lv_scale=1.0, requires_grad=False):
    """Fresh normal mu and logvar of ``shape`` from a seeded generator (never all zeros),
    made in float64 on the CPU, then cast to ``dtype`` and moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g, dtype=torch.float64)
    lv = torch.randn(shape, generator=g, dtype=torch.float64) * lv_scale
    mu = mu.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    lv = lv.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    return mu, lv


def check_math(z, kl, mu, lv, seed, reduction, num_samples=None, clamp=None):
    """Asserts that ``(z, kl)``, a backend's outputs for (mu, lv, seed, reduction,
    num_samples, clamp), have the contract's shapes, dtypes and device and equal float64
    math (tests/independent.py) within the dtype's tolerances. ``num_samples=None`` is the
    public API's single-sample form (z has mu's shape); an int gives ``[S, *mu.shape]``."""
    z64, kl64, _ = math64(mu, lv, seed, num_samples, clamp)
    assert z.dtype == mu.dtype and z.device == mu.device
    assert z.shape == z64.shape
    torch.testing.assert_close(z.cpu().double(), z64, **Z_TOL[mu.dtype])
    expected = reduce64(kl64, reduction)
    assert kl.shape == expected.shape
    if reduction == "none":
        assert kl.dtype == mu.dtype
        torch.testing.assert_close(kl.cpu().double(), expected, **KL_TOL[mu.dtype])
    else:
        assert kl.dtype == (torch.float64 if mu.dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(kl.cpu().double(), expected, **REDUCED_KL_TOL[mu.dtype])


EMPTY_SHAPES = [(0,), (0, 4), (3, 0)]


def check_empty_reduced(got: torch.Tensor, shape, reduction: str) -> None:
    """Asserts a reduced output of inputs of the empty ``shape`` (docs/design.md section 1):
    empty or zeros per row, 0 for sum, NaN (0 / 0) for batchmean of B = 0, else 0."""
    import math

    expected = reduce64(torch.zeros(shape, dtype=torch.float64), reduction)
    assert got.shape == expected.shape
    if reduction == "batchmean" and shape[0] == 0:
        assert math.isnan(got.item()), "0 / 0 like torch.mean of an empty tensor"
    else:
        torch.testing.assert_close(got.cpu().double(), expected)


def misaligned(t: torch.Tensor, shift: int = 1) -> torch.Tensor:
    """A contiguous copy of t whose data pointer is ``shift`` elements past a 16-byte boundary
    (kernels with 16-byte vector accesses must take their scalar path for it)."""
    base = torch.empty(t.numel() + 16, dtype=t.dtype, device=t.device)
    start = next(i for i in range(16) if (base.data_ptr() + i * t.element_size()) % 16 == 0) + shift
    out = base[start : start + t.numel()].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


def assert_misaligned_matches_aligned(fwd, mu, lv, reduction, seed=4):
    """``fwd(mu, lv, reduction, seed=...) -> (z, kl)`` gives the same bits, and the same
    gradients, for misaligned copies of mu and logvar as for the aligned tensors."""
    z_a, kl_a = fwd(mu, lv, reduction, seed=seed)
    ga = torch.autograd.grad((z_a, kl_a), (mu, lv), (torch.ones_like(z_a) * 0.5, torch.ones_like(kl_a)))
    mu_m = misaligned(mu.detach(), 1).requires_grad_()
    lv_m = misaligned(lv.detach(), 3).requires_grad_()
    z_m, kl_m = fwd(mu_m, lv_m, reduction, seed=seed)
    gm = torch.autograd.grad((z_m, kl_m), (mu_m, lv_m), (torch.ones_like(z_m) * 0.5, torch.ones_like(kl_m)))
    assert torch.equal(z_a, z_m)
    assert torch.equal(kl_a, kl_m)
    for a, m in zip(ga, gm):
        assert torch.equal(a, m)


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    """Runs ``code`` (dedented) in a fresh interpreter on this source tree, with extra
    environment variables and no FUSED_VAE_BACKEND; stdout and stderr are captured."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    full_env.pop("FUSED_VAE_BACKEND", None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, timeout=600
    )


def poison_forward(monkeypatch, call: int, value: float) -> None:
    """Makes the ``call``-th ``VAE.forward`` of the test (1-based) return its loss times
    ``value`` (NaN or Inf), in the dict and in the trainer's ``(loss, stats)`` form."""
    from fused_vae.models.base import VAE

    real, calls = VAE.forward, {"n": 0}

    def forward(self, x, **kw):
        out = real(self, x, **kw)
        calls["n"] += 1
        if calls["n"] != call:
            return out
        if isinstance(out, dict):
            return {**out, "loss": out["loss"] * value}
        loss, stats = out
        bad = loss * value
        return bad, torch.cat([bad.detach().reshape(1), stats[1:]])

    monkeypatch.setattr(VAE, "forward", forward)

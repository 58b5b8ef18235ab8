"""Shared fixtures: which (backend, device) pairs to test, inputs, tolerances."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

# Triton kernels run on CPU tensors only through the interpreter, which must be chosen
# before triton compiles anything.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The CUDA kernels also run on CPU tensors, compiled as host C++ against an emulated device
# (fused_vae/backends/cuda_emulation.py): the contract suite runs them as ("cuda", "cpu").
# Tests that do not take the `backend` fixture run without it (see the fixture below).
os.environ.setdefault("FUSED_VAE_CUDA_EMULATE", "1")
_EMULATE = os.environ["FUSED_VAE_CUDA_EMULATE"]

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import fused_vae as fv  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# The `backend` fixture is a constant (name, device) pair, safe to share across examples.
settings.register_profile(
    "fused_vae", deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], print_blob=True
)
settings.load_profile("fused_vae")

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
KL_TOL = {
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
REDUCED_KL_TOL = {
    torch.float32: dict(rtol=2e-5, atol=1e-4),
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float16: dict(rtol=2e-5, atol=1e-4),
    torch.bfloat16: dict(rtol=2e-5, atol=1e-4),
}


def _backend_cases():
    cases = []
    for name, info in fv.available_backends().items():
        for device in info.devices:
            marks = [pytest.mark.slow] if (name in ("triton", "cuda") and device == "cpu") else []
            cases.append(pytest.param((name, device), id=f"{name}-{device}", marks=marks))
    return cases


BACKEND_CASES = _backend_cases()


@pytest.fixture(autouse=True)
def _cuda_emulation_for_backend_cases_only(request, monkeypatch):
    """The emulated CUDA device is a test device: only the contract suite (tests taking
    `backend`) and tests/test_cuda_emulated.py see it; other tests see the package's
    default (no ``cuda`` backend for CPU tensors)."""
    if "backend" in request.fixturenames or request.node.path.name == "test_cuda_emulated.py":
        monkeypatch.setenv("FUSED_VAE_CUDA_EMULATE", _EMULATE)
    else:
        monkeypatch.delenv("FUSED_VAE_CUDA_EMULATE", raising=False)


@pytest.fixture(params=BACKEND_CASES)
def backend(request):
    """(backend name, device string) for every backend usable on this machine."""
    return request.param


# The ops each (backend, device) case runs (the reference backend has none).
_OP_PREFIX = {
    ("cpu", "cpu"): "reparam_kl",
    ("cuda", "cuda"): "reparam_kl",
    ("cuda", "cpu"): "cuda_emu_reparam_kl",  # the emulated CUDA device
    ("triton", "cuda"): "triton_reparam_kl",
    ("triton", "cpu"): "triton_reparam_kl",
}


def backend_op_pair(backend_case):
    """(forward op, backward op) of a (backend, device) case, or None for the reference."""
    prefix = _OP_PREFIX.get(tuple(backend_case))
    if prefix is None:
        return None
    return getattr(torch.ops.fused_vae, f"{prefix}_fwd"), getattr(torch.ops.fused_vae, f"{prefix}_bwd")


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


def is_interpreted(backend_case) -> bool:
    """Triton on CPU runs in the (slow) interpreter: tests use smaller sizes there."""
    return backend_case == ("triton", "cpu")


def make_inputs(shape, dtype, device, seed, *, lv_scale=1.0, requires_grad=False):
    """Fresh normal mu and logvar from a seeded generator (never all zeros)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g, dtype=torch.float64)
    lv = torch.randn(shape, generator=g, dtype=torch.float64) * lv_scale
    mu = mu.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    lv = lv.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    return mu, lv

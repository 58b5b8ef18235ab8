"""pytest-benchmark view of bench_cpu.py's forward+backward comparison, for quick local checks.

    python -m pytest benchmarks/test_bench_ops.py --benchmark-group-by=param:shape

Not part of the test suite (tests/ only). Committed numbers come from bench_cpu.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fused_vae as fv  # noqa: E402
from plain import reparameterize_kl_eager  # noqa: E402

SHAPES = [(128, 32), (100, 50), (128, 64), (1024, 512), (4096, 1024)]
IMPLS = {
    "fused": lambda mu, lv: fv.reparameterize_kl(mu, lv),
    "eager": reparameterize_kl_eager,
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_forward_backward(benchmark, impl, shape):
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(shape, generator=g, requires_grad=True)
    lv = torch.randn(shape, generator=g, requires_grad=True)
    gz = torch.randn(shape, generator=g)
    fn = IMPLS[impl]

    def step():
        z, kl = fn(mu, lv)
        return torch.autograd.grad((z, kl), (mu, lv), (gz, torch.tensor(1.0)))

    grads = benchmark(step)
    assert grads[0].shape == shape

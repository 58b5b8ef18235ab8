"""Outputs of every backend against float64 math: dtypes, shapes, strides, reductions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fused_vae as fv
from helpers import DTYPES, EMPTY_SHAPES, REDUCTIONS, check_empty_reduced, check_math, is_simulated, make_inputs
from independent import math64, reduce64

SHAPES = [(1,), (7,), (4, 3), (16, 37), (3, 4, 5), (2, 3, 2, 5)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reparameterize_kl_matches_float64_math(backend, dtype, reduction):
    name, device = backend
    shapes = SHAPES[:4] if is_simulated(backend) else SHAPES
    for i, shape in enumerate(shapes):
        mu, lv = make_inputs(shape, dtype, device, seed=1000 + i)
        z, kl = fv.reparameterize_kl(mu, lv, reduction=reduction, seed=31 + i, backend=name)
        check_math(z, kl, mu, lv, 31 + i, reduction)


@settings(max_examples=12, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple),
    seed=st.integers(0, 2**64 - 1),
    data_seed=st.integers(0, 2**31),
    reduction=st.sampled_from(REDUCTIONS),
    dtype=st.sampled_from(DTYPES),
)
def test_random_shapes(backend, shape, seed, data_seed, reduction, dtype):
    name, device = backend
    mu, lv = make_inputs(shape, dtype, device, seed=data_seed)
    z, kl = fv.reparameterize_kl(mu, lv, reduction=reduction, seed=seed, backend=name)
    check_math(z, kl, mu, lv, seed, reduction)


@st.composite
def strided_pair(draw):
    """A base tensor and a non-contiguous view of it: transposes, steps, offsets, expands."""
    rows = draw(st.integers(1, 6))
    cols = draw(st.integers(1, 6))
    kind = draw(st.sampled_from(["transpose", "step", "offset", "expand", "permute3"]))
    return rows, cols, kind


def make_view(t: torch.Tensor, rows: int, cols: int, kind: str) -> torch.Tensor:
    if kind == "transpose":
        return t[: rows * cols].reshape(cols, rows).t()
    if kind == "step":
        return t[: rows * cols * 2].reshape(rows, cols * 2)[:, ::2]
    if kind == "offset":
        return t[3 : 3 + rows * cols].reshape(rows, cols)
    if kind == "expand":
        return t[:cols].reshape(1, cols).expand(rows, cols)
    return t[: rows * cols * 2].reshape(2, rows, cols).permute(1, 2, 0)


@settings(max_examples=15, deadline=None)
@given(spec=strided_pair(), mu_kind_same=st.booleans(), reduction=st.sampled_from(REDUCTIONS))
def test_non_contiguous_and_expanded_inputs(backend, spec, mu_kind_same, reduction):
    name, device = backend
    rows, cols, kind = spec
    base_mu, base_lv = make_inputs((128,), torch.float32, device, seed=rows * 31 + cols)
    mu = make_view(base_mu, rows, cols, kind)
    lv = make_view(base_lv, rows, cols, kind if mu_kind_same else "transpose")
    if lv.shape != mu.shape:
        lv = base_lv[: mu.numel()].reshape(mu.shape)
    z, kl = fv.reparameterize_kl(mu, lv, reduction=reduction, seed=17, backend=name)
    check_math(z, kl, mu.contiguous(), lv.contiguous(), 17, reduction)


@pytest.mark.parametrize("num_samples", [1, 3, 8])
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_num_samples(backend, num_samples, reduction):
    name, device = backend
    mu, lv = make_inputs((5, 7), torch.float32, device, seed=num_samples)
    z, kl = fv.reparameterize_kl(mu, lv, reduction=reduction, seed=3, num_samples=num_samples, backend=name)
    assert z.shape == (num_samples, 5, 7)
    check_math(z, kl, mu, lv, 3, reduction, num_samples=num_samples)
    if num_samples > 1:
        assert not torch.equal(z[0], z[1])


def test_reparameterize_and_gaussian_kl_agree_with_fused(backend):
    name, device = backend
    mu, lv = make_inputs((6, 10), torch.float32, device, seed=4)
    z, kl = fv.reparameterize_kl(mu, lv, reduction="per_sample", seed=11, backend=name)
    torch.testing.assert_close(fv.reparameterize(mu, lv, seed=11, backend=name), z, rtol=0, atol=0)
    torch.testing.assert_close(fv.gaussian_kl(mu, lv, reduction="per_sample", backend=name), kl)
    zs = fv.reparameterize(mu, lv, seed=11, num_samples=2, backend=name)
    torch.testing.assert_close(zs[0], z, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(backend, reduction):
    name, device = backend
    for shape in EMPTY_SHAPES:
        mu = torch.empty(shape, device=device)
        z, kl = fv.reparameterize_kl(mu, mu.clone(), reduction=reduction, seed=1, backend=name)
        assert z.shape == shape
        check_empty_reduced(kl, shape, reduction)
        zs = fv.reparameterize(mu, mu.clone(), seed=1, num_samples=2, backend=name)
        assert zs.shape == (2, *shape)


def test_logvar_clamp_values(backend):
    name, device = backend
    mu, lv = make_inputs((8, 9), torch.float32, device, seed=5, lv_scale=40.0)
    for clamp in [(-30.0, 20.0), (-1.0, 1.0), (None, 0.5), (-0.5, None), (0.3, 0.3)]:
        z, kl = fv.reparameterize_kl(mu, lv, reduction="none", seed=2, logvar_clamp=clamp, backend=name)
        lo = -math.inf if clamp[0] is None else clamp[0]
        hi = math.inf if clamp[1] is None else clamp[1]
        check_math(z, kl, mu, lv, 2, "none", clamp=(lo, hi))


def test_large_logvar_without_clamp_follows_ieee(backend):
    """No silent clamping: exp overflows to inf and the KL becomes inf."""
    name, device = backend
    mu = torch.tensor([0.5, 0.5, 0.5, -1.0], device=device)
    lv = torch.tensor([200.0, -200.0, 176.0, 0.0], device=device)
    z, kl = fv.reparameterize_kl(mu, lv, reduction="none", seed=8, backend=name)
    assert torch.isinf(z[0]) and torch.isinf(kl[0])
    assert z[1] == mu[1], "std underflows to 0, so z == mu"
    torch.testing.assert_close(kl[1].item(), 0.5 * (0.25 + 200.0 - 1.0)), "exp(-200) underflows to 0"
    assert torch.isfinite(z[2]) and torch.isinf(kl[2]), "std = exp(88) is finite, exp(176) is not"
    assert torch.isfinite(z[3]) and torch.isfinite(kl[3])


def test_std_across_the_float32_range(backend):
    """exp(0.5 * logvar) where std is subnormal, normal, near float32's largest value and
    past it: z = std * eps (mu = 0) within a few ulps of float64 math, plus exp's condition
    number times the argument's rounding; inf and 0 exactly where float64 math overflows and
    underflows."""
    name, device = backend
    points = 401 if is_simulated(backend) else 4001
    edges = [-110.0, -104.0, -103.98, -103.97, -103.0, -87.4, -87.3, 88.7, 88.72, 88.7228, 88.73, 89.0, 89.01, 95.0]
    half = torch.cat([torch.linspace(-110.0, 95.0, points), torch.tensor(edges)])
    lv = (2 * half).float()
    mu = torch.zeros_like(lv)
    z = fv.reparameterize(mu.to(device), lv.to(device), seed=3, backend=name).cpu().double()
    _, _, eps = math64(mu, lv, 3)
    std64 = torch.exp(0.5 * lv.double())
    z64 = std64.float().double() * eps[0]  # std is a float32 first: an infinite std makes z inf for any eps
    tiny, big = 2.0**-149, torch.finfo(torch.float32).max
    near_edge = ((std64 - big).abs() < 1e-4 * big) | ((z64.abs() - big).abs() < 1e-4 * big)
    near_edge |= (z64.abs() - tiny / 2).abs() < tiny / 4
    want32 = z64.float().double()
    assert torch.equal(torch.isinf(z)[~near_edge], torch.isinf(want32)[~near_edge])
    assert torch.equal((z == 0)[~near_edge], (want32 == 0)[~near_edge])
    finite = torch.isfinite(z) & torch.isfinite(z64)
    rtol = (8 + 2 * (0.5 * lv.double()).abs()) * 2.0**-24
    err = (z - z64).abs()[finite]
    assert (err <= rtol[finite] * z64.abs()[finite] + tiny).all(), err.max()


def test_nan_and_inf_propagate(backend):
    name, device = backend
    nan, inf = math.nan, math.inf
    mu = torch.tensor([[nan, 0.1, 0.2, inf], [0.3, 0.4, -inf, 0.5]], device=device)
    lv = torch.tensor([[0.0, nan, inf, 0.0], [-inf, 0.1, 0.0, 0.2]], device=device)
    z, kl = fv.reparameterize_kl(mu, lv, reduction="none", seed=1, backend=name)
    z64, kl64, _ = math64(mu, lv, 1)
    for got, want in ((z, z64), (kl, kl64)):
        got = got.cpu().double()
        assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
        assert torch.equal(torch.isposinf(got), torch.isposinf(want)), (got, want)
        assert torch.equal(torch.isneginf(got), torch.isneginf(want)), (got, want)
    per_row = fv.gaussian_kl(mu, lv, reduction="per_sample", backend=name)
    expected_rows = reduce64(kl64, "per_sample")
    assert torch.isnan(per_row[0]) and torch.isnan(expected_rows[0])
    assert torch.isposinf(per_row[1]) and torch.isposinf(expected_rows[1])
    _, kl_clamped = fv.reparameterize_kl(mu[1:], lv[1:], reduction="none", seed=1, logvar_clamp=(-5, 5), backend=name)
    assert torch.isfinite(kl_clamped[0, 0]), "clamping -inf logvar makes the KL finite"


def test_reduced_kl_is_deterministic_and_uses_batch_size(backend):
    name, device = backend
    shape = (33, 70) if is_simulated(backend) else (257, 3000)
    mu, lv = make_inputs(shape, torch.float32, device, seed=9)
    kls = [fv.gaussian_kl(mu, lv, reduction=r, backend=name) for r in ("per_sample", "sum", "batchmean")]
    again = [fv.gaussian_kl(mu, lv, reduction=r, backend=name) for r in ("per_sample", "sum", "batchmean")]
    for a, b in zip(kls, again):
        assert torch.equal(a, b), "reductions must be bitwise reproducible"
    torch.testing.assert_close(kls[2], kls[1] / shape[0], rtol=1e-6, atol=0)
    _, kl64, _ = math64(mu, lv, 0)
    torch.testing.assert_close(kls[0].double().cpu(), kl64.sum(1), rtol=1e-5, atol=1e-4)


def test_cpu_reductions_do_not_depend_on_thread_count():
    if not fv.available_backends()["cpu"].available:
        pytest.skip("cpu backend unavailable")
    mu, lv = make_inputs((64, 5000), torch.float32, "cpu", seed=10)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append([fv.gaussian_kl(mu, lv, reduction=r, backend="cpu") for r in ("per_sample", "sum")])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)

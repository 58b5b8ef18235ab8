"""Triton backend specifics: noise layout, 64-bit offsets, tiling, deterministic reductions,
both op families of the protocol (the sample with its KL to N(0, I) or a learned prior and
its log density; gaussian_log_prob) against their composite math in float64, float64
autograd, the CPU backend and tests/independent.py, availability, kernels compiling for
the GPU without one, and (on a GPU only) seeds without host synchronisation and fresh noise
on CUDA-graph replays.

The `device` fixture runs each test on a real GPU ("cuda", when there is one) and on CPU
tensors through the Triton interpreter (conftest's pytest_configure sets TRITON_INTERPRET=1
on a machine without CUDA), at smaller sizes there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fused_vae as fv
import independent
from helpers import make_inputs
from fused_vae import _validation as V
from fused_vae.backends import protocol as P
from fused_vae.backends import reference, registration
from fused_vae.backends import triton_backend as TB
from fused_vae.philox import normal_stream

if TB._triton_import_error() is not None:
    pytest.skip(f"triton backend: {TB._triton_import_error()}", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

K = TB.kernels()

DEVICES = [d for d in ("cpu", "cuda") if TB.TritonBackend().unavailable_reason(d) is None]
if not DEVICES:
    pytest.skip("the triton backend is unavailable on every local device", allow_module_level=True)


def gpu_only(why: str):
    """Marks a test that runs on a real CUDA device only, with the reason in its skip."""
    skip = pytest.mark.skipif("cuda" not in DEVICES, reason=f"needs a CUDA device: {why}")
    return lambda fn: pytest.mark.gpu(skip(fn))


FWD = torch.ops.fused_vae.triton_reparam_kl_fwd
BWD = torch.ops.fused_vae.triton_reparam_kl_bwd
LP_FWD = torch.ops.fused_vae.triton_gaussian_log_prob_fwd
LP_BWD = torch.ops.fused_vae.triton_gaussian_log_prob_bwd
SEEDS = [0, 1234567, 2**63 + 12345, 2**64 - 1]


@pytest.fixture(params=[pytest.param(d, marks=[pytest.mark.gpu] if d == "cuda" else []) for d in DEVICES])
def device(request):
    return request.param


def _seed(value, device):
    return V.seed_tensor(value, torch.device(device))


# --------------------------------------------------------------------------- noise


@pytest.mark.parametrize(
    "shape,num_samples,reduction",
    [
        ((8, 4), 1, "batchmean"),  # aligned rows
        ((3, 5), 3, "per_sample"),  # D % 4 != 0: groups straddle rows and samples
        ((7,), 2, "none"),  # N % 4 != 0: groups straddle samples
        ((2, 3, 4), 2, "sum"),
        ((5, 6), 1, "per_sample"),
    ],
)
@pytest.mark.parametrize("seed", SEEDS)
def test_eps_is_the_standard_normal_stream(device, shape, num_samples, reduction, seed):
    """mu = 0, logvar = 0 gives z = eps exactly; eps equals fv.standard_normal."""
    mu = torch.zeros(shape, device=device)
    z, _ = fv.reparameterize_kl(mu, mu.clone(), reduction=reduction, seed=seed, num_samples=num_samples, backend="triton")
    expected = fv.standard_normal((num_samples, *shape), seed, device=device)
    torch.testing.assert_close(z, expected, rtol=0, atol=2e-6)


@triton.jit
def _normal_probe(out_ptr, seed_ptr, off_lo, off_hi, N, BLOCK4: tl.constexpr, ALIGNED: tl.constexpr):
    """Writes stream elements off + [0, 4 * BLOCK4) through the backend's _normal, with a
    64-bit off = off_hi * 2**32 + off_lo built in the kernel."""
    c4 = tl.arange(0, BLOCK4)[None, :, None]
    lane = tl.arange(0, 4)[None, None, :]
    j0 = (c4 * 4).to(tl.int64)
    j = j0 + lane
    off = tl.full((), off_hi, tl.int64) * 4294967296 + tl.full((), off_lo, tl.int64)
    seed = tl.load(seed_ptr)
    eps = K._normal(seed, j0, j, off, ALIGNED)
    tl.store(out_ptr + j, eps, mask=j < N)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("first", [0, 2**34 + 8, 2**36 - 8, 4 * (2**40 + 3), 2**62 + 4])
def test_noise_at_64_bit_offsets(device, aligned, first):
    """Element offsets past 2**34 (Philox groups past 2**32) follow the stream."""
    if not aligned:
        first += 3  # straddling groups: the per-element path
    seed = 2**64 - 987654321
    n = 30
    out = torch.empty(n, device=device)
    _normal_probe[(1,)](out, _seed(seed, device), first % 2**32, first >> 32, n, BLOCK4=8, ALIGNED=aligned)
    group, lane = divmod(first, 4)
    expected = normal_stream(_seed(seed, device), group, lane + n, device=device)[lane:]
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-6)


# --------------------------------------------------------------------------- tiling


def _ops(op):
    return getattr(torch.ops.fused_vae, f"triton_{op}_fwd"), getattr(torch.ops.fused_vae, f"triton_{op}_bwd")


def _cpu_ops(op, device):
    """The C++ CPU backend's op pair (an independent implementation of the same protocol),
    or None where it is not loaded or the tensors are not on the CPU."""
    if device != "cpu" or not fv.available_backends()["cpu"].available:
        return None
    return getattr(torch.ops.fused_vae, f"{op}_fwd"), getattr(torch.ops.fused_vae, f"{op}_bwd")


def _eps64(op, inputs, params):
    """The backend's own noise in float64 (z of mu = 0, logvar = 0; the stream itself is
    checked by test_eps_is_the_standard_normal_stream), or None."""
    spec = P.OPS[op]
    if spec.noise is None:
        return None
    return spec.noise(lambda mu, seed, s: registration.backend_noise(FWD, mu.double(), seed, s), inputs, params)


def _tols(dtype):
    """(elementwise, reduced) tolerances of a float64 comparison of outputs in ``dtype``."""
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-10), dict(rtol=1e-10, atol=1e-10)
    if dtype == torch.float32:
        return dict(rtol=2e-5, atol=2e-5), dict(rtol=2e-5, atol=1e-4)
    return dict(rtol=1.6e-2, atol=1.6e-2), dict(rtol=2e-5, atol=1e-4)


def check_op(op, inputs, params, grads_given=None):
    """Runs the Triton op pair of family ``op`` and asserts: outputs of the protocol's shapes
    and dtypes equal to the family's composite math in float64 (the reference backend's
    form, with the backend's own noise), and, against random output gradients (those
    whose index ``grads_given`` lists; all by default), gradients equal to float64 autograd
    of that math (``[0]`` for an input not given; zeros where no output depends on it).
    Where the CPU extension is loaded, its ops agree too. Returns the outputs."""
    spec = P.OPS[op]
    fwd, bwd = _ops(op)
    got = spec.unpack(fwd(*inputs, *params))
    allocated = spec.alloc(inputs, params)
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    want = spec.composite(leaves, _eps64(op, inputs, params), params)
    elem_tol, red_tol = _tols(inputs[0].dtype)
    for g, w, a in zip(got, want, allocated):
        assert (g.shape, g.dtype, g.device) == (a.shape, a.dtype, a.device)
        tol = red_tol if g.dtype != inputs[0].dtype or g.dim() < inputs[0].dim() else elem_tol
        torch.testing.assert_close(g.double().cpu(), w.detach().double().cpu(), **tol, equal_nan=True)
    gen = torch.Generator().manual_seed(7)
    grads = [
        torch.randn(g.shape, generator=gen, dtype=torch.float64).to(g.device, g.dtype)
        if g.numel() and (grads_given is None or k in grads_given) else None
        for k, g in enumerate(got)
    ]  # fmt: skip
    got_grads = bwd(*grads, *inputs, *params)
    pairs = [(w, g.double()) for w, g in zip(want, grads) if g is not None]
    wrt = [t for t in leaves if t is not None]
    found = iter(
        torch.autograd.grad([w for w, _ in pairs], wrt, [g.reshape(w.shape) for w, g in pairs], allow_unused=True)
        if pairs else [None] * len(wrt)
    )  # fmt: skip
    for t, gg in zip(inputs, got_grads):
        if t is None:
            assert gg.shape == (0,)
            continue
        w = next(found)
        assert (gg.shape, gg.dtype, gg.is_contiguous()) == (t.shape, t.dtype, True)
        w = torch.zeros(t.shape, dtype=torch.float64) if w is None else w
        torch.testing.assert_close(gg.double().cpu(), w.double().cpu(), **elem_tol)
    cpu = _cpu_ops(op, inputs[0].device.type)
    if cpu is not None:  # the other implementation: same noise stream to a few float32 ulps
        tol = dict(rtol=2e-5, atol=1e-4) if inputs[0].dtype in (torch.float32, torch.float64) else elem_tol
        for g, c in zip(got, spec.unpack(cpu[0](*inputs, *params))):
            torch.testing.assert_close(g, c, **tol, equal_nan=True)
        for g, c in zip(got_grads, cpu[1](*grads, *inputs, *params)):
            torch.testing.assert_close(g, c, **tol)
    return got


def reparam_args(mu, lv, seed, num_samples, kl_mode, lo=None, hi=None, prior=None, logq_mode=0):
    """(inputs, params) of the sampling op."""
    pm, pl = prior if prior is not None else (None, None)
    return (mu, lv, pm, pl), (seed, num_samples, kl_mode, logq_mode, lo, hi)


def fwd(*args, **kwargs):
    """The forward op on :func:`reparam_args`' arguments."""
    inputs, params = reparam_args(*args, **kwargs)
    return FWD(*inputs, *params)


def make_prior(shape, dtype, device, seed):
    return make_inputs(shape, dtype, device, seed=seed + 1000, lv_scale=0.7)


@pytest.mark.parametrize("tile", [16, 64])
@pytest.mark.parametrize(
    "shape,num_samples",
    [((6, 40), 1), ((5, 13), 3), ((3, 2, 12), 2), ((37,), 2), ((9, 3), 1)],
)
@pytest.mark.parametrize("kl_mode", [0, 1, 2, 3, 4])
def test_small_tiles_match_reference(device, monkeypatch, tile, shape, num_samples, kl_mode):
    """Forced small tiles: several rows per program, rows split into chunks, chunk partial
    sums reduced by the second kernel, ragged edges, straddling groups."""
    monkeypatch.setattr(K, "_tile_elems", lambda n: tile)
    mu, lv = make_inputs(shape, torch.float32, device, seed=sum(shape) + num_samples)
    seed = _seed(2**63 + 5, device)
    check_op("reparam_kl", *reparam_args(mu, lv, seed, num_samples, kl_mode, -0.75, 0.5 if kl_mode % 2 else None))


def test_plan_scales_for_small_and_large_rows():
    """The per-sample reduction tiles [4096, 16] with many rows per program and
    [8, 16*128*128] with many chunks per row; tiles cover the problem exactly."""
    for rows, cols in [(4096, 16), (8, 16 * 128 * 128), (1, 64 * 16 * 128 * 128), (128, 32), (3, 5), (1, 1), (100000, 3)]:
        p = K.plan(rows, cols)
        ch = 4 * p.CH4
        assert p.ROWS * ch <= 4096 and p.num_warps in (1, 2, 4, 8, 16)
        assert p.ROWS >= 1 and ch >= 4 and (ch & (ch - 1)) == 0 and (p.ROWS & (p.ROWS - 1)) == 0
        assert p.NC == -(-cols // ch) and p.grid == -(-rows // p.ROWS) * p.NC
        assert p.ROWS * ch * p.grid >= rows * cols
        assert p.ROWS == 1 or p.NC == 1  # several rows per program only when a row fits one chunk
    small = K.plan(4096, 16)
    assert small.ROWS >= 32 and small.NC == 1 and small.grid <= 128
    large = K.plan(8, 16 * 128 * 128)
    assert large.ROWS == 1 and large.NC >= 64 and large.grid >= 512


# Shapes of the new terms' tests: D % 4 != 0 (groups straddle rows and samples), rows split
# into chunks at tile 16 (D = 40, 37), one row (the flat tiling), a 3-D input.
TERM_SHAPES = [((5, 13), 3), ((3, 40), 2), ((1, 37), 2), ((3, 2, 6), 2)]


@pytest.mark.parametrize("tile", [16, 4096])
@pytest.mark.parametrize("shape,num_samples", TERM_SHAPES)
@pytest.mark.parametrize("kl_mode", [1, 2, 3, 4])
def test_prior_kl_matches_reference(device, monkeypatch, tile, shape, num_samples, kl_mode):
    """The KL to a learned prior N(pm, exp(pl)) in every mode, its gradients in mu, logvar
    and both prior tensors, the clamp on both logvars (float64)."""
    monkeypatch.setattr(K, "_tile_elems", lambda n: tile)
    mu, lv = make_inputs(shape, torch.float64, device, seed=kl_mode + sum(shape))
    prior = make_prior(shape, torch.float64, device, seed=kl_mode)
    seed = _seed(2**64 - 3, device)
    clamp = (-0.8, 0.6) if kl_mode % 2 else (None, None)
    check_op("reparam_kl", *reparam_args(mu, lv, seed, num_samples, kl_mode, *clamp, prior=prior))


@pytest.mark.parametrize("tile", [16, 4096])
@pytest.mark.parametrize("shape,num_samples", TERM_SHAPES)
@pytest.mark.parametrize("logq_mode", [1, 2, 3, 4])
@pytest.mark.parametrize("with_prior", [False, True], ids=["standard", "prior"])
def test_logq_matches_reference(device, monkeypatch, tile, shape, num_samples, logq_mode, with_prior):
    """The [S, B] log density of each mode (log q, log q - log p, their path gradients),
    with and without a prior, several samples, rows whole or in chunks, next to a KL of
    each mode (float64); gradients from all three outputs."""
    monkeypatch.setattr(K, "_tile_elems", lambda n: tile)
    kl_mode = (logq_mode + len(shape) + num_samples) % 5  # every KL mode over the cases
    mu, lv = make_inputs(shape, torch.float64, device, seed=logq_mode + sum(shape))
    prior = make_prior(shape, torch.float64, device, seed=logq_mode) if with_prior else None
    seed = _seed(12345 + logq_mode, device)
    clamp = (-0.9, None) if logq_mode % 2 else (None, 0.7)
    check_op("reparam_kl", *reparam_args(mu, lv, seed, num_samples, kl_mode, *clamp, prior=prior, logq_mode=logq_mode))


@pytest.mark.parametrize("logq_mode", [1, 2])
def test_gradcheck_prior_and_logq(device, logq_mode):
    """Finite differences of the forward op (through registration's autograd) agree with
    the backward op in all four inputs, and the second derivative (gradgradcheck). The path
    modes are left out: their gradient is not the derivative of their value, by design."""
    mu, lv = make_inputs((2, 3), torch.float64, device, seed=logq_mode, requires_grad=True)
    pm, pl = make_inputs((2, 3), torch.float64, device, seed=logq_mode + 1, requires_grad=True)
    seed = _seed(6, device)

    def f(*t):
        return FWD(*t, seed, 2, 2, logq_mode, -1.5, None)

    assert torch.autograd.gradcheck(f, (mu, lv, pm, pl), fast_mode=True)
    if logq_mode == P.LOGQ_RATIO:  # (the second derivative is the generic composite's: once)
        assert torch.autograd.gradgradcheck(f, (mu, lv, pm, pl), fast_mode=True)


@pytest.mark.parametrize("logq_mode", [1, 2, 3, 4])
@pytest.mark.parametrize("given", [(0,), (1,), (2,), (0, 2)], ids=["z", "kl", "logq", "z+logq"])
def test_new_terms_gradients_of_each_output(device, monkeypatch, logq_mode, given):
    """Each output's gradient alone (the others absent), with a prior: grad_z alone leaves
    the prior's gradients zero; grad_logq alone needs the noise."""
    monkeypatch.setattr(K, "_tile_elems", lambda n: 16)
    mu, lv = make_inputs((4, 11), torch.float64, device, seed=logq_mode)
    prior = make_prior((4, 11), torch.float64, device, seed=logq_mode)
    args = reparam_args(mu, lv, _seed(8, device), 2, 2, -1.0, 1.0, prior=prior, logq_mode=logq_mode)
    check_op("reparam_kl", *args, grads_given=given)


def test_new_terms_leave_z_and_kl_unchanged(device, monkeypatch):
    """A log density asked for (row-aligned tiles) or a prior that only its density mode
    would read give the same z and KL bits as the plain call."""
    monkeypatch.setattr(K, "_tile_elems", lambda n: 16)
    mu, lv = make_inputs((3, 10), torch.float32, device, seed=2)
    prior = make_prior((3, 10), torch.float32, device, seed=2)
    seed = _seed(99, device)
    for kl_mode in (0, 1, 3):
        z0, kl0, _ = fwd(mu, lv, seed, 3, kl_mode)
        for logq_mode in (1, 4):
            z, kl, _ = fwd(mu, lv, seed, 3, kl_mode, logq_mode=logq_mode)
            assert torch.equal(z, z0) and torch.equal(kl, kl0)
    assert torch.equal(fwd(mu, lv, seed, 3, 0, prior=prior, logq_mode=1)[0], z0)


def _independent(name):
    fn = getattr(independent, name, None)
    if fn is None:
        pytest.skip(f"tests/independent.py has no {name} yet")
    return fn


def _check_grads64(got, leaves, outs, grads):
    """The backend's gradients ``got`` against float64 autograd of independent ``outs``."""
    pairs = [(o, g.double().cpu().reshape(o.shape)) for o, g in zip(outs, grads) if g is not None]
    want = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
    for g, w in zip(got, want):
        w = torch.zeros(g.shape, dtype=torch.float64) if w is None else w
        torch.testing.assert_close(g.double().cpu(), w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("logq_mode", [1, 2, 3, 4])
@pytest.mark.parametrize("with_prior", [False, True], ids=["standard", "prior"])
def test_terms_match_independent_float64_math(device, monkeypatch, logq_mode, with_prior):
    """z, the KL, log q or log q - log p and their gradients (total or path) against
    tests/independent.py: numpy Philox and the densities written out in float64."""
    terms64 = _independent("terms64")
    monkeypatch.setattr(K, "_tile_elems", lambda n: 16)
    shape, seed, clamp = (3, 2, 7), 2**64 - 11, (-0.9, 0.8)
    mu, lv = make_inputs(shape, torch.float32, device, seed=logq_mode)
    prior = make_prior(shape, torch.float32, device, seed=logq_mode) if with_prior else None
    inputs, params = reparam_args(mu, lv, _seed(seed, device), 2, 1, *clamp, prior=prior, logq_mode=logq_mode)
    z, kl, logq = FWD(*inputs, *params)
    leaves, z64, kl64, log_q64, ratio64 = terms64(mu, lv, seed, 2, prior, clamp, path=logq_mode >= P.LOGQ_DENSITY_PATH)
    lq64 = ratio64 if logq_mode in (P.LOGQ_RATIO, P.LOGQ_RATIO_PATH) else log_q64
    torch.testing.assert_close(z.double().cpu(), z64.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(kl.double().cpu(), kl64.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(logq.double().cpu(), lq64.detach(), rtol=2e-5, atol=1e-4)
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(t.shape, generator=gen).to(device, t.dtype) for t in (z, kl, logq)]
    got = [g for g in BWD(*grads, *inputs, *params) if g.numel()]
    _check_grads64(got, leaves, (z64, kl64, lq64), grads)


@pytest.mark.parametrize("reduction", [1, 2, 4])
def test_log_prob_matches_independent_float64_math(device, monkeypatch, reduction):
    log_prob64 = _independent("log_prob64")
    monkeypatch.setattr(K, "_tile_elems", lambda n: 16)
    x, mu = make_inputs((4, 9), torch.float32, device, seed=reduction)
    _, lv = make_inputs((4, 9), torch.float32, device, seed=reduction + 1)
    clamp = (-0.8, None)
    lp = LP_FWD(x, mu, lv, reduction, *clamp)
    leaves, lp64 = log_prob64(x, mu, lv, clamp)
    want = independent.reduce64(lp64, {1: "none", 2: "per_sample", 4: "batchmean"}[reduction])
    torch.testing.assert_close(lp.double().cpu(), want.detach(), rtol=2e-5, atol=1e-4)
    grad = torch.randn(lp.shape, generator=torch.Generator().manual_seed(4)).to(device, lp.dtype)
    _check_grads64(LP_BWD(grad, x, mu, lv, reduction, *clamp), leaves, (want,), (grad,))


@pytest.mark.parametrize("tile", [16, 4096])
@pytest.mark.parametrize("shape", [(5, 13), (3, 40), (1, 37), (2, 3, 5)])
@pytest.mark.parametrize("reduction", [1, 2, 3, 4])
def test_log_prob_matches_reference(device, monkeypatch, tile, shape, reduction):
    """gaussian_log_prob in every reduction, rows whole or in chunks, with and without the
    clamp (float64), and its gradients in x, mu and logvar."""
    monkeypatch.setattr(K, "_tile_elems", lambda n: tile)
    x, mu = make_inputs(shape, torch.float64, device, seed=reduction + sum(shape))
    _, lv = make_inputs(shape, torch.float64, device, seed=reduction, lv_scale=0.8)
    clamp = (-0.7, 0.5) if (reduction + len(shape)) % 2 else (None, None)
    check_op("gaussian_log_prob", (x, mu, lv), (reduction, *clamp))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_new_ops_in_each_dtype(device, monkeypatch, dtype):
    """Half types and float32 compute in float32 (reduced outputs and log q in float32)."""
    monkeypatch.setattr(K, "_tile_elems", lambda n: 16)
    mu, lv = make_inputs((3, 9), dtype, device, seed=6, lv_scale=0.5)
    prior = make_prior((3, 9), dtype, device, seed=6)
    seed = _seed(5, device)
    for kl_mode, logq_mode in ((1, 2), (2, 3), (4, 4), (3, 1)):
        check_op("reparam_kl", *reparam_args(mu, lv, seed, 2, kl_mode, -1.0, 1.0, prior=prior, logq_mode=logq_mode))
    for reduction in (1, 2, 4):
        check_op("gaussian_log_prob", (mu, lv, prior[1]), (reduction, None, 1.0))


def test_reductions_are_deterministic(device, monkeypatch):
    monkeypatch.setattr(K, "_tile_elems", lambda n: 32)
    mu, lv = make_inputs((6, 50), torch.float32, device, seed=11)
    prior = make_prior((6, 50), torch.float32, device, seed=11)
    seed = _seed(77, device)
    for mode in (2, 3, 4):
        first = fwd(mu, lv, seed, 2, mode, prior=prior, logq_mode=mode)
        lp_first = LP_FWD(mu, lv, prior[1], mode, None, None)
        for _ in range(2):
            again = fwd(mu, lv, seed, 2, mode, prior=prior, logq_mode=mode)
            assert torch.equal(first[1], again[1]) and torch.equal(first[2], again[2])
            assert torch.equal(lp_first, LP_FWD(mu, lv, prior[1], mode, None, None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_total_kernel_adds_row_sums(device, dtype):
    """sum / batchmean: one program adds the rows of [R, NC] partials, divided by div."""
    part = torch.randn(7, 5, dtype=dtype, device=device)
    out = torch.empty((), dtype=dtype, device=device)
    K._total_kernel[(1,)](part, out, 7, 5, 7.0, RB=4, CB=4, IS_F64=dtype == torch.float64)
    torch.testing.assert_close(out, part.double().sum().to(dtype) / 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rowsum_kernel_loops_over_chunks(device, dtype):
    """The second-stage kernel sums [R, NC] partials per row in blocks of CB columns."""
    part = torch.randn(5, 37, dtype=dtype, device=device)
    out = torch.empty(5, dtype=dtype, device=device)
    K._rowsum_kernel[(3,)](part, out, 5, 37, RB=2, CB=8, IS_F64=dtype == torch.float64)
    torch.testing.assert_close(out, part.sum(dim=1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_and_float64_clamp_bounds(device, dtype):
    """Half types compute in float32; float64 computes in float64 with exact float64
    clamp bounds (0.1 is not a float32)."""
    mu, lv = make_inputs((4, 6), dtype, device, seed=5, lv_scale=0.2)
    seed = _seed(3, device)
    z, kl, _ = FWD(mu, lv, None, None, seed, 2, 2, 0, -0.1, 0.1)
    zr, klr, _ = reference.run("reparam_kl", mu, lv, None, None, seed, 2, 2, 0, -0.1, 0.1)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(kl, klr, **tol)
    torch.testing.assert_close(z, zr, **(dict(rtol=1e-6, atol=1e-6) if dtype == torch.float64 else tol))
    if dtype == torch.float64:  # values within float32 rounding of a bound: float64 semantics
        lv2 = torch.tensor([[0.1 + 1e-12, 0.1 - 1e-12, -0.1 - 1e-12]], dtype=dtype, device=device)
        mu2 = torch.zeros_like(lv2)
        kl2 = FWD(mu2, lv2, None, None, seed, 0, 1, 0, -0.1, 0.1)[1]
        kl2r = reference.run("reparam_kl", mu2, lv2, None, None, seed, 0, 1, 0, -0.1, 0.1)[1]
        torch.testing.assert_close(kl2, kl2r, rtol=0, atol=1e-15)
        gl = BWD(None, torch.ones_like(kl2), None, mu2, lv2, None, None, seed, 0, 1, 0, -0.1, 0.1)[1]
        assert gl[0, 0] == 0 and gl[0, 1] != 0 and gl[0, 2] == 0
        # the prior's logvar and the log density's logvar follow the same bounds
        _, _, _, gpl = BWD(None, torch.ones_like(kl2), None, mu2, mu2, mu2, lv2, seed, 0, 1, 0, -0.1, 0.1)
        assert gpl[0, 0] == 0 and gpl[0, 1] != 0 and gpl[0, 2] == 0
        _, _, glp = LP_BWD(torch.ones_like(lv2), mu2, mu2 + 1, lv2, 1, -0.1, 0.1)
        assert glp[0, 0] == 0 and glp[0, 1] != 0 and glp[0, 2] == 0


def test_strided_and_empty_inputs(device):
    base_mu, base_lv = make_inputs((6, 10), torch.float32, device, seed=9)
    mu, lv = base_mu[:, ::2], base_lv.t().contiguous().t()[:, 1::2]
    seed = _seed(1, device)
    check_op("reparam_kl", *reparam_args(mu, lv, seed, 2, 2))
    check_op("reparam_kl", *reparam_args(mu, lv, seed, 2, 3, prior=(lv.t().contiguous().t(), mu), logq_mode=4))
    check_op("gaussian_log_prob", (mu, lv, base_mu[:, 1::2]), (2, None, None))
    empty = torch.empty(0, 4, device=device)
    z, kl, logq = FWD(empty, empty, empty, empty, seed, 1, 4, 2, None, None)
    assert z.shape == (1, 0, 4) and kl.shape == () and torch.isnan(kl) and logq.shape == (1, 0)
    z, kl, _ = FWD(empty, empty, None, None, seed, 1, 2, 0, None, None)
    assert kl.shape == (0,)
    rows = torch.empty(3, 0, device=device)
    z, kl, logq = FWD(rows, rows, None, None, seed, 2, 2, 1, None, None)
    assert kl.shape == (3,) and torch.equal(kl, torch.zeros(3, device=device))
    assert torch.equal(logq, torch.zeros(2, 3, device=device))
    assert [g.shape for g in BWD(None, None, logq, rows, rows, rows, rows, seed, 2, 2, 2, None, None)] == [(3, 0)] * 4
    assert LP_FWD(empty, empty, empty, 4, None, None).isnan() and LP_FWD(empty, empty, empty, 3, None, None) == 0
    assert torch.equal(LP_FWD(rows, rows, rows, 2, None, None), torch.zeros(3, device=device))
    assert [g.shape for g in LP_BWD(None, rows, rows, rows, 3, None, None)] == [(3, 0)] * 3


def test_absent_gradients_give_zeros(device):
    mu, lv = make_inputs((3, 5), torch.float32, device, seed=4)
    pm, pl = make_prior((3, 5), torch.float32, device, seed=4)
    seed = _seed(2, device)
    g_mu, g_lv, g_pm, g_pl = BWD(None, None, None, mu, lv, pm, pl, seed, 2, 2, 2, None, None)
    assert all(g.shape == mu.shape and not g.any() for g in (g_mu, g_lv, g_pm, g_pl))
    assert [g.shape for g in BWD(None, None, None, mu, lv, None, None, seed, 2, 2, 2, None, None)[2:]] == [(0,)] * 2
    assert all(g.shape == mu.shape and not g.any() for g in LP_BWD(None, mu, lv, pm, 2, None, None))


# Shapes whose planned tiles (K.plan) hold many rows per program, many chunks per row, or
# a flattened 4-D input: at real sizes on a GPU, at interpreter sizes on the CPU.
PLANNED_SHAPES = {
    "cuda": {"rows": (4096, 16), "chunks": (3, 1000003), "4d": (8, 16, 128, 128)},
    "cpu": {"rows": (300, 16), "chunks": (1, 4201), "4d": (5, 4, 16, 16)},
}


@pytest.mark.parametrize("kind", ["rows", "chunks", "4d"])
def test_planned_tiles_match_reference(device, kind):
    shape = PLANNED_SHAPES[device][kind]
    mu, lv = make_inputs(shape, torch.float32, device, seed=4)
    seed = _seed(2**63 + 1, device)
    for mode in (2, 4):
        check_op("reparam_kl", *reparam_args(mu, lv, seed, 1, mode))
    prior = make_prior(shape, torch.float32, device, seed=4)
    check_op("reparam_kl", *reparam_args(mu, lv, seed, 2, 2, prior=prior, logq_mode=4))
    check_op("gaussian_log_prob", (mu, lv, prior[1]), (2, None, None))


# --------------------------------------------------------------------------- availability


def test_unavailable_reasons(monkeypatch):
    b = TB.TritonBackend()
    assert "meta" in b.unavailable_reason("meta")
    monkeypatch.setattr(TB, "_triton_checked", True)
    monkeypatch.setattr(TB, "_import_error", "triton is not installed (pip install triton)")
    assert b.unavailable_reason("cuda") == "triton is not installed (pip install triton)"
    assert b.unavailable_reason("cpu") == "triton is not installed (pip install triton)"


def test_cpu_needs_the_interpreter(monkeypatch):
    b = TB.TritonBackend()
    monkeypatch.setattr(TB, "_kernels", None)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in b.unavailable_reason("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert b.unavailable_reason("cpu") is None


@pytest.mark.slow
def test_kernels_compile_for_gpu_targets():
    """Compiles every kernel (a few specialisations) for sm_90, and the float32 one for
    sm_80, with triton's real compiler, which needs no GPU; catches what the interpreter
    does not check."""
    script = textwrap.dedent(
        """
        import sys
        try:
            from triton.backends.compiler import GPUTarget
            from triton.compiler import ASTSource
            import triton
            GPUTarget("cuda", 90, 32)
        except Exception as e:  # noqa: BLE001
            print("SKIP", type(e).__name__, e); sys.exit(0)
        from fused_vae.backends import triton_kernels as K
        assert not K.INTERPRETED

        def build(fn, types, consts, arch, num_warps):
            sig = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
            div16 = [n for n in fn.arg_names if n.endswith("_ptr") or n in ("C", "N")]
            attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16}
            src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
            return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})

        P = {"f32": "*fp32", "bf16": "*bf16", "f64": "*fp64"}
        ints = dict(R="i32", C="i32", N="i64", SN="i64", NC="i32", lo="fp64", hi="fp64", div="fp64")
        configs = [("f32", True, True, False), ("bf16", False, False, True), ("f64", True, False, True)]
        # (kl / grad_kl mode, prior, logq mode): the plain kernels and the new terms' paths
        terms = [(1, False, 0), (2, False, 0), (2, True, 4), (0, False, 3), (4, True, 2)]
        # Every configuration for sm_90, one (the vectorised float32 path) for sm_80.
        for arch, (d, aligned, flat, clamp) in [(90, c) for c in configs] + [(80, configs[0])]:
            acc = "*fp64" if d == "f64" else "*fp32"
            common = dict(FLAT=flat, ALIGNED=aligned, HAS_LO=clamp, HAS_HI=clamp, IS_F64=d == "f64",
                          ROWS=1 if flat else 16, CH4=256 if flat else 4)
            for mode, prior, lq in terms:
                ratio, path = lq in (2, 4), lq in (3, 4)
                kl = P[d] if mode == 1 else acc
                t = dict(ints, mu_ptr=P[d], lv_ptr=P[d], pm_ptr=P[d], pl_ptr=P[d], z_ptr=P[d], kl_ptr=kl,
                         part_ptr=acc, lq_ptr=acc, lq_part_ptr=acc, seed_ptr="*i64")
                k = build(K._fwd_kernel, t, dict(common, KL_IS_ELEMENTWISE=mode == 1, KL_RED=mode >= 2,
                          KL_FINAL=False, PRIOR=prior, LOGQ=lq != 0, RATIO=ratio, LQ_FINAL=lq == 2), arch, 4)
                if d == "f32" and aligned:
                    assert "ld.global.v4" in k.asm["ptx"], "mu/logvar loads are not vectorised"
                t = dict(ints, gz_ptr=P[d], gkl_ptr=kl, gw_ptr=acc, mu_ptr=P[d], lv_ptr=P[d], pm_ptr=P[d],
                         pl_ptr=P[d], gmu_ptr=P[d], glv_ptr=P[d], gpm_ptr=P[d], gpl_ptr=P[d], seed_ptr="*i64")
                build(K._bwd_kernel, t, dict(common, HAS_GZ=True, GKL_MODE=mode, PRIOR=prior, HAS_GW=lq != 0,
                      RATIO=ratio, PATH=path), arch, 4)
            common.pop("ALIGNED")  # (no noise)
            for mode in (1, 2, 4):
                out = P[d] if mode == 1 else acc
                t = dict(ints, x_ptr=P[d], mu_ptr=P[d], lv_ptr=P[d], out_ptr=out, part_ptr=acc)
                build(K._log_prob_fwd_kernel, t, dict(common, ELEMENTWISE=mode == 1, FINAL=mode == 2), arch, 4)
                t = dict(ints, g_ptr=out, x_ptr=P[d], mu_ptr=P[d], lv_ptr=P[d], gx_ptr=P[d], gmu_ptr=P[d],
                         glv_ptr=P[d])
                build(K._log_prob_bwd_kernel, t, dict(common, MODE=mode), arch, 4)
            build(K._rowsum_kernel, dict(part_ptr=acc, out_ptr=acc, R="i32", NC="i32"),
                  dict(RB=4, CB=256, IS_F64=d == "f64"), arch, 2)
            build(K._total_kernel, dict(part_ptr=acc, out_ptr=acc, R="i32", NC="i32", div="fp64"),
                  dict(RB=4, CB=256, IS_F64=d == "f64"), arch, 2)
        print("OK", triton.__version__)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    if res.stdout.startswith("SKIP"):
        pytest.skip(f"this triton cannot compile for a GPU target here: {res.stdout.strip()}")
    assert "OK" in res.stdout


# --------------------------------------------------------------------------- GPU only


@gpu_only("host synchronisation happens between a host and a GPU only")
def test_seed_none_does_not_synchronise():
    mu, lv = make_inputs((64, 32), torch.float32, "cuda", seed=1, requires_grad=True)
    fv.reparameterize_kl(mu, lv, backend="triton")  # compile the kernels first
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for reduction in ("none", "per_sample", "sum", "batchmean"):
            z, kl = fv.reparameterize_kl(mu, lv, reduction=reduction, num_samples=2, backend="triton")
            (z.sum() + kl.sum()).backward()
            # the new terms: a learned prior, the log density, the log-density op
            out = fv.sample_gaussian(mu, lv, prior=(lv, mu), num_samples=2, kl=reduction, log_density="ratio",
                                     path_gradient=reduction == "sum", backend="triton")  # fmt: skip
            lp = fv.gaussian_log_prob(mu, lv, mu * 0.5, reduction=reduction, backend="triton")
            (out.z.sum() + out.kl.sum() + out.log_density.sum() + lp.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode(prev)


@gpu_only("CUDA graph capture cannot be emulated")
def test_cuda_graph_replays_draw_fresh_noise():
    """A training step (forward + backward) captured in a CUDA graph with seed=None: each
    replay draws a new seed on the device, so z and the gradients change."""
    mu, lv = make_inputs((128, 32), torch.float32, "cuda", seed=2, requires_grad=True)

    def step():
        z, kl = fv.reparameterize_kl(mu, lv, backend="triton")
        loss = (z * z).mean() + kl
        loss.backward()
        return z

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            mu.grad = lv.grad = None
            step()
    torch.cuda.current_stream().wait_stream(s)
    mu.grad = lv.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        z_static = step()
    zs, grads = [], []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        zs.append(z_static.clone())
        grads.append(lv.grad.clone())
    assert not torch.equal(zs[0], zs[1]) and not torch.equal(zs[1], zs[2])
    assert not torch.equal(grads[0], grads[1])
    eps = (zs[0] - mu.detach()) / torch.exp(0.5 * lv.detach())
    assert abs(eps.mean().item()) < 0.1 and abs(eps.std().item() - 1) < 0.1

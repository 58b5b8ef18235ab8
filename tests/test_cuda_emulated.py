"""The CUDA kernels run on the CPU under emulation (FUSED_VAE_CUDA_EMULATE=1).

csrc/cuda/ is compiled as host C++ against csrc/emulate/cuda_emulation.h (see
fused_vae/backends/cuda_emulation.py): each block's 256 threads run concurrently, barriers
and full-mask shuffles are checked, outputs and shared memory start as NaN. The shapes
here reach every path of the kernels with their real tile sizes (TILE = 1024 elements
for float32/float64, 2048 for 16-bit types): the single-block fused path (at most 8
tiles x samples) with and without its row pass, the multi-block path with the row pass
kernel and the one-block total, tiles of whole rows (many rows per tile, rows that start
off a vector boundary) and tiles that hold one chunk of a row (rows of more than 32
chunks), several samples with N % 4 != 0 and the split of samples over blocks,
misaligned (scalar-access) inputs, broadcast output gradients and empty inputs. Values
are checked against independent float64 math (tests/independent.py).
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from conftest import (
    DTYPES,
    KL_TOL,
    REDUCED_KL_TOL,
    REDUCTIONS,
    Z_TOL,
    assert_misaligned_matches_aligned,
    make_inputs,
    misaligned,
)
from independent import math64, reduce64, stream

import fused_vae as fv
from fused_vae.backends import cuda_emulation
from fused_vae.backends.protocol import KL_MODES, KL_SKIP


@pytest.fixture(scope="module", autouse=True)
def emulated_ops():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(cuda_emulation.ENV_VAR, os.environ.get(cuda_emulation.ENV_VAR, "1"))
        if not cuda_emulation.enabled():
            pytest.skip(f"{cuda_emulation.ENV_VAR} is set to something other than 1")
        st = cuda_emulation.status()
        assert st.loaded, st.reason
        yield


def tile(dtype: torch.dtype) -> int:
    """Elements per tile of the CUDA kernels (256 threads x 16 bytes or 4 elements)."""
    return 2048 if dtype in (torch.float16, torch.bfloat16) else 1024


def fwd(mu, lv, reduction="batchmean", seed=7, num_samples=1, clamp=(None, None)):
    mode = KL_SKIP if reduction is None else KL_MODES[reduction]
    return torch.ops.fused_vae.cuda_emu_reparam_kl_fwd(mu, lv, torch.tensor(seed), num_samples, mode, *clamp)


def check_math(z, kl, mu, lv, seed, reduction, num_samples=1, clamp=None):
    z64, kl64, _ = math64(mu, lv, seed, num_samples, clamp)
    torch.testing.assert_close(z.double(), z64, **Z_TOL[mu.dtype])
    expected = reduce64(kl64, reduction)
    assert kl.shape == expected.shape
    tol = KL_TOL[mu.dtype] if reduction == "none" else REDUCED_KL_TOL[mu.dtype]
    torch.testing.assert_close(kl.double(), expected, **tol)


def grads64(mu, lv, seed, num_samples, reduction, gz, gkl, clamp=None):
    """d(z, kl)/d(mu, logvar) against (gz, gkl) in float64 autograd (independent math)."""
    m = mu.detach().double().requires_grad_()
    l_raw = lv.detach().double().requires_grad_()
    lo, hi = clamp if clamp is not None else (None, None)
    lv64 = l_raw.clamp(min=lo, max=hi) if clamp is not None else l_raw
    eps = torch.from_numpy(stream(seed, num_samples * m.numel()).astype("float64")).reshape(num_samples, *m.shape)
    z = m + torch.exp(0.5 * lv64) * eps
    kl = reduce64(0.5 * (m * m + torch.exp(lv64) - lv64 - 1.0), reduction)
    return torch.autograd.grad((z, kl), (m, l_raw), (gz.double(), gkl.double()))


# Shapes as functions of the dtype's tile size T (V = 4 or 8 elements per thread; a tile
# spans at most T - (V - 1) elements when D % V != 0); names say which path they reach.
SHAPES = {
    "ragged_tail": lambda t: (7, 13),  # whole rows off a multiple of V, one partial tile, one block
    "row_fills_tile": lambda t: (3, t),  # D = T: one row per tile, 3 tiles, one block
    "row_just_over_span": lambda t: (3, t - 2),  # D % V != 0 and D > T - V + 1: 2 chunks of T - V
    "rows_chunked_fused": lambda t: (2, 2 * t + 5),  # 3 chunks per row, 6 tiles: row pass in the block
    "rows_chunked_multi": lambda t: (5, 2 * t - 48),  # 10 tiles, several blocks, row pass kernel
    "rows_over_32_chunks": lambda t: (1, 33 * t + 5),  # 34 chunks: the row pass's lanes wrap
    "many_rows_per_tile": lambda t: (3 * t + 5, 1, 3),  # D = 3: 340 / 680 rows per tile, 10 tiles
    "row_divides_tile": lambda t: (9 * t // 64, 64),  # 9 tiles of whole rows, no row pass
    "flat": lambda t: (5000,),  # D = 1
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_values_against_float64_math(shape_name, reduction, dtype):
    shape = SHAPES[shape_name](tile(dtype))
    mu, lv = make_inputs(shape, dtype, "cpu", seed=sum(shape))
    z, kl = fwd(mu, lv, reduction, seed=12345)
    check_math(z, kl, mu, lv, 12345, reduction)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,num_samples",
    [((3, 5), 3), ((5, 401), 7), ((4, 8), 50), ((3, 1000), 2)],
    ids=["N%4=3 fused", "N%4=1 split samples", "few tiles many samples", "two samples cut rows"],
)
def test_multi_sample(shape, num_samples, dtype):
    mu, lv = make_inputs(shape, dtype, "cpu", seed=5)
    for reduction in ("per_sample", "none"):
        z, kl = fwd(mu, lv, reduction, seed=99, num_samples=num_samples, clamp=(-2.0, 1.5))
        check_math(z, kl, mu, lv, 99, reduction, num_samples=num_samples, clamp=(-2.0, 1.5))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradients_against_float64_math(dtype, reduction):
    t = tile(dtype)
    for shape, samples in (((7, 13), 1), ((3, 2 * t + 5), 1), ((5, 401), 3), ((3 * t + 5, 3), 2)):
        mu, lv = make_inputs(shape, dtype, "cpu", seed=11, requires_grad=True)
        z, kl = fwd(mu, lv, reduction, seed=3, num_samples=samples, clamp=(-1.0, 1.0))
        g = torch.Generator().manual_seed(0)
        gz = torch.randn(z.shape, generator=g).to(z.dtype)
        gkl = torch.randn(kl.shape, generator=g).to(kl.dtype)
        got = torch.autograd.grad((z, kl), (mu, lv), (gz, gkl))
        want = grads64(mu, lv, 3, samples, reduction, gz.reshape(samples, *shape), gkl, clamp=(-1.0, 1.0))
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, **Z_TOL[dtype])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_broadcast_output_gradients(reduction, dtype):
    # sum() gives expanded (stride-0) output gradients, which the kernels read in place.
    shape = (5, 401)
    mu, lv = make_inputs(shape, dtype, "cpu", seed=2, requires_grad=True)
    z, kl = fwd(mu, lv, reduction, seed=8, num_samples=2)
    (z.sum() + 0.5 * kl.sum()).backward()
    gz = torch.ones(2, *shape, dtype=torch.float64)
    gkl = torch.full(kl.shape, 0.5, dtype=torch.float64)
    want = grads64(mu, lv, 8, 2, reduction, gz, gkl)
    for got, w in zip((mu.grad, lv.grad), want):
        torch.testing.assert_close(got.double(), w, **Z_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_misaligned_inputs_take_the_scalar_path_with_the_same_bits(reduction, dtype):
    # Offset storage runs the scalar-access kernel instance (the emulator faults on any
    # misaligned 16-byte access); same math and tree, so the same bits as aligned inputs.
    t = tile(dtype)
    for shape in ((7, 13), (5, 2 * t - 48)):
        mu, lv = make_inputs(shape, dtype, "cpu", seed=21, requires_grad=True)
        assert_misaligned_matches_aligned(fwd, mu, lv, reduction)


def test_misaligned_output_gradients():
    # N % 8 == 0, one sample: aligned output gradients take the vector path, offset ones not.
    mu, lv = make_inputs((9, 304), torch.bfloat16, "cpu", seed=1, requires_grad=True)
    z, kl = fwd(mu, lv, "none", seed=6)
    g = torch.Generator().manual_seed(3)
    gz = torch.randn(z.shape, generator=g).to(z.dtype)
    gkl = torch.randn(kl.shape, generator=g).to(kl.dtype)
    want = torch.autograd.grad((z, kl), (mu, lv), (gz, gkl), retain_graph=True)
    got = torch.autograd.grad((z, kl), (mu, lv), (misaligned(gz, 1), misaligned(gkl, 5)))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_inputs(reduction):
    for shape in ((0,), (0, 4), (3, 0)):
        mu = torch.zeros(shape)
        z, kl = fwd(mu, mu.clone(), reduction)
        assert z.shape == (1, *shape)
        expected = reduce64(torch.zeros(shape, dtype=torch.float64), reduction)
        assert kl.shape == expected.shape
        torch.testing.assert_close(kl.double(), expected, equal_nan=True)
        gm, gl = torch.ops.fused_vae.cuda_emu_reparam_kl_bwd(
            torch.zeros(1, *shape), None, mu, mu, torch.tensor(1), 1, KL_MODES[reduction], None, None
        )
        assert gm.shape == shape and gl.shape == shape


@pytest.mark.parametrize("reduction", ["per_sample", "sum", "batchmean"])
def test_reduced_kl_bits_do_not_depend_on_the_grid(reduction, monkeypatch):
    # The reduction tree depends on the shape only: 1, 2 or 5 emulated SMs give 8, 16 or
    # 40 resident blocks, so the 18 tiles below (9 chunks per row) and the row pass are
    # spread over different grids.
    mu, lv = make_inputs((2, 8 * 1024 + 100), torch.float32, "cpu", seed=17)
    results = []
    for sms in ("1", "2", "5"):
        monkeypatch.setenv("FUSED_VAE_CUDA_EMULATE_SMS", sms)
        results.append(fwd(mu, lv, reduction, seed=1)[1])
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_failed_occupancy_query_is_reported_and_not_remembered(monkeypatch):
    # 10 tiles: the launcher sizes the grid from the occupancy query.
    mu, lv = make_inputs((5, 2000), torch.float32, "cpu", seed=6)
    monkeypatch.setenv("FUSED_VAE_CUDA_EMULATE_FAIL_OCCUPANCY", "1")
    with pytest.raises(RuntimeError, match="emulated CUDA error: invalid device function"):
        fwd(mu, lv, "per_sample")
    monkeypatch.delenv("FUSED_VAE_CUDA_EMULATE_FAIL_OCCUPANCY")
    z, kl = fwd(mu, lv, "per_sample")
    check_math(z, kl, mu, lv, 7, "per_sample")


def test_public_api_runs_the_emulated_kernels_but_never_chooses_them():
    assert "cpu" in fv.available_backends()["cuda"].devices
    assert fv.backend_for("cpu") != "cuda"
    mu, lv = make_inputs((5, 401), torch.float32, "cpu", seed=3, requires_grad=True)
    z, kl = fv.reparameterize_kl(mu, lv, reduction="per_sample", seed=5, backend="cuda")
    z_op, kl_op = fwd(mu, lv, "per_sample", seed=5)
    assert torch.equal(z, z_op[0]) and torch.equal(kl, kl_op)
    (z.sum() + kl.sum()).backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(lv.grad).all()


def test_schemas_match_the_real_ops():
    if not fv.available_backends()["cpu"].available:
        pytest.skip("the C++ extension (which defines the real ops) is not available")
    for name in ("reparam_kl_fwd", "reparam_kl_bwd"):
        real = str(getattr(torch.ops.fused_vae, name).default._schema)
        emu = str(getattr(torch.ops.fused_vae, "cuda_emu_" + name).default._schema)
        assert emu == real.replace(name, "cuda_emu_" + name, 1)


# ---- the emulator's own checks (csrc/emulate/emulator_selftest.cpp) ----------------------


def selftest(case: str) -> str:
    return torch.ops.fused_vae.cuda_emu_selftest(case)


def test_emulator_runs_shuffles_barriers_and_per_block_shared_memory():
    assert selftest("warp_sum") == "ok: " + ",".join(["496"] * 3 * 64)
    assert selftest("reverse_with_barrier") == "ok: " + ",".join(str(63 - i) for _ in range(3) for i in range(64))
    # Every block starts with its own shared storage, all bits set (NaN for floats).
    assert selftest("fresh_shared") == "ok: " + ",".join([str(2**32 - 1)] * 3 * 64)


# Which thread sees a fault first depends on the schedule: the messages allow either.
@pytest.mark.parametrize(
    "case,pattern",
    [
        ("misaligned_vector", r"16-byte vector access at an address that is not 16-byte aligned"),
        ("divergent_shuffle", r"every lane of a warp must reach each full-mask shuffle"),
        ("shuffle_after_exit", r"lane\(s\) of its warp (exited|wait at the full-mask __shfl_xor_sync)"),
        ("barrier_after_exit", r"exited|the barrier is not reached by every thread"),
        ("barrier_in_divergent_code", r"__syncthreads.*exited|exited.*__syncthreads"),
        ("empty_grid", r"invalid configuration argument"),
    ],
)
def test_emulator_reports_faults(case, pattern):
    got = selftest(case)
    assert got.startswith("fused_vae emulated CUDA error"), got
    assert re.search(pattern, got), got

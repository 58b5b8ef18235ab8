"""The CUDA kernels (csrc/cuda/) on two devices: a real GPU ("cuda", when there is one)
and the emulated device ("emulated", always; FUSED_VAE_CUDA_EMULATE=1, CPU tensors, ops
``fused_vae::cuda_emu_reparam_kl_*``). The shared contract suite covers the rest.

The emulated device compiles csrc/cuda/ as host C++ against csrc/emulate/cuda_emulation.h
(see fused_vae/backends/cuda_emulation.py): each block's 256 threads run concurrently,
barriers and full-mask shuffles are checked, outputs and shared memory start as NaN.

The shapes of SHAPES reach every path of the kernels (docs/design.md section 9) with their
real tile sizes (TILE = 1024 elements for float32/float64, 2048 for 16-bit types): the
single-block fused path (at most 8 tiles x samples) with and without its row pass, the
multi-block path with the row pass kernel and the one-block total over more than 256 rows,
tiles of whole rows (many rows per tile, rows that start off a vector boundary) and tiles
that hold one chunk of a row (rows of more than 32 chunks). Other tests reach several
samples with N % 4 != 0 and the split of samples over blocks, misaligned (scalar-access)
inputs and output gradients, broadcast output gradients and empty inputs. Values and
gradients are checked against independent float64 math (tests/independent.py).

What needs the hardware runs on a GPU only, and its skip reason says why: streams, CUDA
graphs, torch.compile with cudagraphs, kernel-launch counting, 64-bit indexing and
reproducibility at real sizes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch

import fused_vae as fv
from fused_vae.backends import cuda_emulation as emu
from fused_vae.backends.protocol import KL_MODES
from helpers import (
    DTYPES,
    REDUCED_KL_TOL,
    REDUCTIONS,
    Z_TOL,
    assert_misaligned_matches_aligned,
    check_math,
    make_inputs,
    misaligned,
)
from independent import grads64, reduce64

HAS_CUDA = torch.cuda.is_available()


def gpu_only(why: str):
    """Marks a test that runs on a real CUDA device only, with the reason in its skip."""
    return lambda fn: pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason=f"needs a CUDA device: {why}")(fn))


@dataclass(frozen=True)
class Device:
    """One device the CUDA kernels run on: where tensors live and which ops it runs."""

    name: str  # "cuda" or "emulated"
    torch_device: str  # "cuda" or "cpu"
    fwd_op: object
    bwd_op: object

    def fwd(self, mu, lv, reduction="batchmean", seed=7, num_samples=1, clamp=(None, None)):
        """The forward op: (z [S, *shape], kl); autograd runs the backward op."""
        seed_t = torch.tensor(seed, device=self.torch_device)
        return self.fwd_op(mu, lv, seed_t, num_samples, KL_MODES[reduction], *clamp)


def tile(dtype: torch.dtype) -> int:
    """Elements per tile of the CUDA kernels (256 threads x 16 bytes or 4 elements)."""
    return 2048 if dtype in (torch.float16, torch.bfloat16) else 1024


def _cuda_device() -> Device:
    info = fv.available_backends()["cuda"]
    assert info.available, f"the cuda backend must be available on a CUDA machine: {info.reason}"
    return Device("cuda", "cuda", torch.ops.fused_vae.reparam_kl_fwd, torch.ops.fused_vae.reparam_kl_bwd)


@pytest.fixture
def emulated(cuda_emulation) -> Device:
    """The emulated device, its ops built and loaded."""
    if not cuda_emulation:
        pytest.skip(f"{emu.ENV_VAR} is set to something other than 1")
    st = emu.status()
    assert st.loaded, st.reason
    return Device("emulated", "cpu", torch.ops.fused_vae.cuda_emu_reparam_kl_fwd, torch.ops.fused_vae.cuda_emu_reparam_kl_bwd)


@pytest.fixture(params=([pytest.param("cuda", marks=pytest.mark.gpu)] if HAS_CUDA else []) + ["emulated"])
def dev(request) -> Device:
    """Each device the kernels run on here: the GPU when present, the emulated one always."""
    return _cuda_device() if request.param == "cuda" else request.getfixturevalue("emulated")


def run(mu, lv, reduction="batchmean", seed=7, num_samples=None, clamp=None):
    """The public API with the cuda backend (on CPU tensors: the emulated device)."""
    return fv.reparameterize_kl(
        mu, lv, reduction=reduction, seed=seed, num_samples=num_samples, logvar_clamp=clamp, backend="cuda"
    )


def random_grads(z, kl, seed=0):
    g = torch.Generator().manual_seed(seed)
    gz = torch.randn(z.shape, generator=g).to(z)
    gkl = torch.randn(kl.shape, generator=g).to(kl)
    return gz, gkl


# ---- values against float64 math -------------------------------------------------------

# Shapes as functions of the dtype's tile size T (V = 4 or 8 elements per thread; a tile
# spans at most T - (V - 1) elements when D % V != 0); names say which path they reach.
SHAPES = {
    "ragged_tail": lambda t: (7, 13),  # whole rows off a multiple of V, one partial tile, one block
    "row_fills_tile": lambda t: (3, t),  # D = T: one row per tile, 3 tiles, one block
    "row_just_over_span": lambda t: (3, t - 2),  # D % V != 0 and D > T - V + 1: 2 chunks of T - V
    "rows_chunked_fused": lambda t: (2, 2 * t + 5),  # 3 chunks per row, 6 tiles: row pass in the block
    "rows_chunked_multi": lambda t: (5, 2 * t - 48),  # 10 tiles, several blocks, row pass kernel
    "rows_over_32_chunks": lambda t: (1, 33 * t + 5),  # 34 chunks: the row pass's lanes wrap
    "many_rows_per_tile": lambda t: (3 * t + 5, 1, 3),  # D = 3: 340 / 680 rows per tile, 10 tiles, > 256 rows
    "row_divides_tile": lambda t: (9 * t // 64, 64),  # 9 tiles of whole rows, no row pass
    "flat": lambda t: (5000,),  # D = 1
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_values_against_float64_math(dev, shape_name, reduction, dtype):
    shape = SHAPES[shape_name](tile(dtype))
    mu, lv = make_inputs(shape, dtype, dev.torch_device, seed=sum(shape))
    z, kl = dev.fwd(mu, lv, reduction, seed=12345)
    check_math(z, kl, mu, lv, 12345, reduction, num_samples=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,num_samples",
    [((3, 5), 3), ((5, 401), 7), ((4, 8), 50), ((3, 1000), 2), ((3, 5), 777)],
    ids=["N%4=3 fused", "N%4=1 split samples", "few tiles many samples", "two samples cut rows", "N%4=3 split"],
)
def test_multi_sample(dev, shape, num_samples, dtype):
    mu, lv = make_inputs(shape, dtype, dev.torch_device, seed=5)
    for reduction in ("per_sample", "none"):
        z, kl = dev.fwd(mu, lv, reduction, seed=99, num_samples=num_samples, clamp=(-2.0, 1.5))
        check_math(z, kl, mu, lv, 99, reduction, num_samples=num_samples, clamp=(-2.0, 1.5))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradients_against_float64_math(dev, dtype, reduction):
    t = tile(dtype)
    for shape, samples in (((7, 13), 1), ((3, 2 * t + 5), 1), ((5, 401), 3), ((3 * t + 5, 3), 2)):
        mu, lv = make_inputs(shape, dtype, dev.torch_device, seed=11, requires_grad=True)
        z, kl = dev.fwd(mu, lv, reduction, seed=3, num_samples=samples, clamp=(-1.0, 1.0))
        gz, gkl = random_grads(z, kl)
        got = torch.autograd.grad((z, kl), (mu, lv), (gz, gkl))
        want = grads64(mu, lv, 3, samples, reduction, gz, gkl, clamp=(-1.0, 1.0))
        for a, b in zip(got, want):
            torch.testing.assert_close(a.cpu().double(), b, **Z_TOL[dtype])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_broadcast_output_gradients(dev, reduction, dtype):
    # sum() gives expanded (stride-0) output gradients, which the kernels read in place.
    shape = (5, 401)
    mu, lv = make_inputs(shape, dtype, dev.torch_device, seed=2, requires_grad=True)
    z, kl = dev.fwd(mu, lv, reduction, seed=8, num_samples=2)
    (z.sum() + 0.5 * kl.sum()).backward()
    gz = torch.ones(2, *shape, dtype=torch.float64)
    gkl = torch.full(kl.shape, 0.5, dtype=torch.float64)
    want = grads64(mu, lv, 8, 2, reduction, gz, gkl)
    for got, w in zip((mu.grad, lv.grad), want):
        torch.testing.assert_close(got.cpu().double(), w, **Z_TOL[dtype])


# ---- memory-access paths ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_misaligned_inputs_take_the_scalar_path_with_the_same_bits(dev, reduction, dtype):
    # Offset storage runs the scalar-access kernel instance (the emulator faults on any
    # misaligned 16-byte access); same math and tree, so the same bits as aligned inputs.
    t = tile(dtype)
    for shape in ((7, 13), (5, 2 * t - 48)):
        mu, lv = make_inputs(shape, dtype, dev.torch_device, seed=21, requires_grad=True)
        assert_misaligned_matches_aligned(dev.fwd, mu, lv, reduction)


def test_misaligned_output_gradients(dev):
    # N % 8 == 0, one sample: aligned output gradients take the vector path, offset ones not.
    mu, lv = make_inputs((9, 304), torch.bfloat16, dev.torch_device, seed=1, requires_grad=True)
    z, kl = dev.fwd(mu, lv, "none", seed=6)
    gz, gkl = random_grads(z, kl, seed=3)
    want = torch.autograd.grad((z, kl), (mu, lv), (gz, gkl), retain_graph=True)
    got = torch.autograd.grad((z, kl), (mu, lv), (misaligned(gz, 1), misaligned(gkl, 5)))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_inputs(dev, reduction):
    for shape in ((0,), (0, 4), (3, 0)):
        mu = torch.zeros(shape, device=dev.torch_device)
        z, kl = dev.fwd(mu, mu.clone(), reduction)
        assert z.shape == (1, *shape)
        expected = reduce64(torch.zeros(shape, dtype=torch.float64), reduction)
        assert kl.shape == expected.shape
        torch.testing.assert_close(kl.cpu().double(), expected, equal_nan=True)
        seed = torch.tensor(1, device=dev.torch_device)
        gm, gl = dev.bwd_op(torch.zeros(1, *shape, device=dev.torch_device), None, mu, mu, seed, 1, KL_MODES[reduction], None, None)
        assert gm.shape == shape and gl.shape == shape


# ---- seeds --------------------------------------------------------------------------------


def test_public_api_moves_a_cpu_seed_tensor_to_the_device(dev):
    # docs/design.md section 2: a seed tensor is moved to the tensors' device (on the
    # emulated device both are already on the CPU).
    mu, lv = make_inputs((16, 40), torch.float32, dev.torch_device, seed=3)
    value = 2**62 + 17
    on_cpu = run(mu, lv, "per_sample", seed=torch.tensor(value), num_samples=2)
    on_dev = run(mu, lv, "per_sample", seed=torch.tensor(value, device=dev.torch_device), num_samples=2)
    as_int = run(mu, lv, "per_sample", seed=value, num_samples=2)
    for a, b, c in zip(on_cpu, on_dev, as_int):
        assert torch.equal(a, b) and torch.equal(a, c)


@gpu_only("a seed on another device than mu needs a second device (the emulated one is the CPU)")
def test_op_rejects_a_seed_on_another_device():
    # The raw op never synchronises with the host: check_common (op_common.h) rejects a
    # CPU seed for CUDA tensors instead of reading it.
    dev = _cuda_device()
    mu, lv = make_inputs((16, 40), torch.float32, "cuda", seed=3)
    with pytest.raises(ValueError, match="seed is on cpu but mu is on cuda"):
        dev.fwd_op(mu, lv, torch.tensor(5), 2, 2, None, None)
    with pytest.raises(ValueError, match="seed is on cpu but mu is on cuda"):
        dev.bwd_op(torch.ones(1, 16, 40, device="cuda"), None, mu, lv, torch.tensor(5), 1, 1, None, None)


# ---- reproducibility ----------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["per_sample", "sum", "batchmean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reduced_kl_bitwise_reproducible(dev, dtype, reduction):
    # 10 tiles over several blocks, then the row pass; with or without sampling z, the same bits.
    mu, lv = make_inputs(SHAPES["rows_chunked_multi"](tile(dtype)), dtype, dev.torch_device, seed=17)
    first = fv.gaussian_kl(mu, lv, reduction=reduction, backend="cuda")
    for _ in range(2):
        assert torch.equal(first, fv.gaussian_kl(mu, lv, reduction=reduction, backend="cuda"))
    assert torch.equal(run(mu, lv, reduction, seed=1)[1], first)


@pytest.mark.parametrize("reduction", ["per_sample", "sum", "batchmean"])
def test_reduced_kl_bits_do_not_depend_on_the_grid(emulated, reduction, monkeypatch):
    # The reduction tree depends on the shape only: 1, 2 or 5 emulated SMs give 8, 16 or
    # 40 resident blocks, so the 18 tiles below (9 chunks per row) and the row pass are
    # spread over different grids.
    mu, lv = make_inputs((2, 8 * 1024 + 100), torch.float32, "cpu", seed=17)
    results = []
    for sms in ("1", "2", "5"):
        monkeypatch.setenv("FUSED_VAE_CUDA_EMULATE_SMS", sms)
        results.append(emulated.fwd(mu, lv, reduction, seed=1)[1])
    assert all(torch.equal(results[0], r) for r in results[1:])


@gpu_only("the bits of reduced KL across a real GPU's concurrent blocks, at sizes too large to emulate")
@pytest.mark.parametrize("reduction", ["per_sample", "sum", "batchmean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(512, 3000), (4, 100000), (1 << 16, 64)], ids=str)
def test_reduced_kl_bitwise_reproducible_at_real_sizes(shape, dtype, reduction):
    mu, lv = make_inputs(shape, dtype, "cuda", seed=17)
    first = fv.gaussian_kl(mu, lv, reduction=reduction, backend="cuda")
    for _ in range(5):
        assert torch.equal(first, fv.gaussian_kl(mu, lv, reduction=reduction, backend="cuda"))
    _, kl = fv.reparameterize_kl(mu, lv, reduction=reduction, seed=1, backend="cuda")
    assert torch.equal(kl, first)
    rows = reduce64(0.5 * (mu.double() ** 2 + lv.double().exp() - lv.double() - 1).cpu(), reduction)
    torch.testing.assert_close(first.cpu().double(), rows, rtol=1e-5, atol=1e-3)


# ---- the emulated device only: fault injection, dispatch, schemas, self-tests --------------


def test_failed_occupancy_query_is_reported_and_not_remembered(emulated, monkeypatch):
    # 10 tiles: the launcher sizes the grid from the occupancy query.
    mu, lv = make_inputs((5, 2000), torch.float32, "cpu", seed=6)
    monkeypatch.setenv("FUSED_VAE_CUDA_EMULATE_FAIL_OCCUPANCY", "1")
    with pytest.raises(RuntimeError, match="emulated CUDA error: invalid device function"):
        emulated.fwd(mu, lv, "per_sample")
    monkeypatch.delenv("FUSED_VAE_CUDA_EMULATE_FAIL_OCCUPANCY")
    z, kl = emulated.fwd(mu, lv, "per_sample")
    check_math(z, kl, mu, lv, 7, "per_sample", num_samples=1)


def test_public_api_runs_the_emulated_kernels_but_never_chooses_them(emulated):
    assert "cpu" in fv.available_backends()["cuda"].devices
    assert fv.backend_for("cpu") != "cuda"
    mu, lv = make_inputs((5, 401), torch.float32, "cpu", seed=3, requires_grad=True)
    z, kl = run(mu, lv, reduction="per_sample", seed=5)
    z_op, kl_op = emulated.fwd(mu, lv, "per_sample", seed=5)
    assert torch.equal(z, z_op[0]) and torch.equal(kl, kl_op)
    (z.sum() + kl.sum()).backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(lv.grad).all()


def test_schemas_match_the_real_ops(emulated):
    if not fv.available_backends()["cpu"].available:
        pytest.skip("the C++ extension (which defines the real ops) is not available")
    for name in ("reparam_kl_fwd", "reparam_kl_bwd"):
        real = str(getattr(torch.ops.fused_vae, name).default._schema)
        emu_schema = str(getattr(torch.ops.fused_vae, "cuda_emu_" + name).default._schema)
        assert emu_schema == real.replace(name, "cuda_emu_" + name, 1)


def selftest(case: str) -> str:
    """One of the emulator's own checks (csrc/emulate/emulator_selftest.cpp)."""
    return torch.ops.fused_vae.cuda_emu_selftest(case)


def test_emulator_runs_shuffles_barriers_and_per_block_shared_memory(emulated):
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
def test_emulator_reports_faults(emulated, case, pattern):
    got = selftest(case)
    assert got.startswith("fused_vae emulated CUDA error"), got
    assert re.search(pattern, got), got


# ---- a real GPU only ------------------------------------------------------------------------


@gpu_only("streams belong to a real device (the emulated one has none)")
def test_non_current_device_stream():
    # Runs on the inputs' device and the current stream of that device.
    mu, lv = make_inputs((64, 3000), torch.float32, "cuda", seed=9)
    want = fv.reparameterize_kl(mu, lv, reduction="per_sample", seed=1, backend="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = fv.reparameterize_kl(mu, lv, reduction="per_sample", seed=1, backend="cuda")
    torch.cuda.current_stream().wait_stream(s)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def _free_bytes() -> int:
    free, _ = torch.cuda.mem_get_info()
    return free


def _check_sample(z, mu, lv, seed, s, n):
    eps = fv.standard_normal(n, seed, offset=(s * n) // 4, device="cuda")
    want = (mu.float() + torch.exp(0.5 * lv.float()) * eps).to(mu.dtype)
    torch.testing.assert_close(z[s].float(), want.float(), **Z_TOL[mu.dtype])


@pytest.mark.slow
@gpu_only("64-bit indexing is reached only at sizes past 2**32 elements (8.6 GB)")
def test_flat_index_past_2_to_32():
    n = 1 << 22
    samples = 1026  # z has 4.3e9 elements (8.6 GB of bfloat16)
    if _free_bytes() < 2 * samples * n + (1 << 30):
        pytest.skip("needs about 10 GB of free GPU memory")
    mu, lv = make_inputs((1, n), torch.bfloat16, "cuda", seed=2)
    z = fv.reparameterize(mu, lv, seed=2**63 + 5, num_samples=samples, backend="cuda")
    for s in (0, 1023, samples - 1):  # sample 1024 starts at element 2**32
        _check_sample(z.view(samples, n), mu.view(n), lv.view(n), 2**63 + 5, s, n)


@pytest.mark.slow
@gpu_only("Philox groups past 2**32 are reached only at sizes past 2**34 elements (34 GB)")
def test_philox_group_past_2_to_32():
    # Group index >= 2**32 (high counter word non-zero): flat index >= 2**34.
    n = 1 << 24
    samples = (1 << 10) + 2  # 1.7e10 elements, 34 GB of bfloat16
    if _free_bytes() < 2 * samples * n + (1 << 30):
        pytest.skip("needs about 36 GB of free GPU memory")
    mu, lv = make_inputs((1, n), torch.bfloat16, "cuda", seed=3)
    z = fv.reparameterize(mu, lv, seed=77, num_samples=samples, backend="cuda")
    for s in (samples - 2, samples - 1):
        _check_sample(z.view(samples, n), mu.view(n), lv.view(n), 77, s, n)


@gpu_only("CUDA graph capture cannot be emulated")
def test_cuda_graph_fresh_noise_with_default_seed():
    mu, lv = make_inputs((64, 100), torch.float32, "cuda", seed=4)
    fv.reparameterize_kl(mu, lv, backend="cuda")  # warm up (lazy init) outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        z, kl = fv.reparameterize_kl(mu, lv, backend="cuda")
    g.replay()
    z1, kl1 = z.clone(), kl.clone()
    g.replay()
    z2, kl2 = z.clone(), kl.clone()
    assert not torch.equal(z1, z2), "a replay must draw fresh noise with seed=None"
    assert torch.equal(kl1, kl2)


@gpu_only("CUDA graph capture cannot be emulated")
def test_cuda_graph_fixed_seed_tensor():
    mu, lv = make_inputs((64, 100), torch.bfloat16, "cuda", seed=4, requires_grad=True)
    seed = torch.tensor(123, device="cuda")

    def step(seed):
        return fv.reparameterize_kl(mu, lv, seed=seed, backend="cuda")

    z_e, kl_e = step(seed)
    ge = torch.autograd.grad((z_e, kl_e), (mu, lv), (torch.ones_like(z_e), torch.ones_like(kl_e)))
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        z, kl = step(seed)
        grads = torch.autograd.grad((z, kl), (mu, lv), (torch.ones_like(z), torch.ones_like(kl)))
    outs = []
    for _ in range(2):
        g.replay()
        outs.append([t.clone() for t in (z, kl, *grads)])
    for a, b, c in zip(outs[0], outs[1], (z_e, kl_e, *ge)):
        assert torch.equal(a, b) and torch.equal(a, c)
    seed.fill_(124)  # the seed is read from device memory at replay time
    g.replay()
    assert not torch.equal(z, z_e)
    assert torch.equal(z, step(124)[0])


@gpu_only("torch.compile's cudagraphs mode captures CUDA graphs, which cannot be emulated")
def test_torch_compile_fullgraph_and_cudagraphs():
    mu, lv = make_inputs((128, 32), torch.float32, "cuda", seed=6, requires_grad=True)
    seed = torch.tensor(5, device="cuda")

    def step(mu, lv, seed):
        z, kl = fv.reparameterize_kl(mu, lv, seed=seed, backend="cuda")
        return (z * z).mean() + kl

    want = step(mu, lv, seed)
    want_g = torch.autograd.grad(want, (mu, lv))
    for mode in (None, "reduce-overhead"):
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, mode=mode)
        for _ in range(3):
            got = compiled(mu, lv, seed)
            got_g = torch.autograd.grad(got, (mu, lv))
        torch.testing.assert_close(got, want)
        for a, b in zip(got_g, want_g):
            torch.testing.assert_close(a, b)


@gpu_only("kernel launches are counted by the CUDA profiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_two_kernel_launches_at_128x32(dtype, reduction):
    from torch.profiler import ProfilerActivity, profile

    mu, lv = make_inputs((128, 32), dtype, "cuda", seed=1, requires_grad=True)
    seed = torch.tensor(9, device="cuda")
    z, kl = fv.reparameterize_kl(mu, lv, reduction=reduction, seed=seed, backend="cuda")
    gz, gkl = torch.randn_like(z), torch.randn_like(kl)

    def step():
        z, kl = fv.reparameterize_kl(mu, lv, reduction=reduction, seed=seed, backend="cuda")
        return torch.autograd.grad((z, kl), (mu, lv), (gz, gkl))

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    gpu_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    names = [e.name for e in gpu_events]
    assert len(gpu_events) == 2, names
    assert all("reparam_kl" in n for n in names), names


@gpu_only("64M elements (the benchmark size) are too many to emulate")
def test_large_forward_backward_smoke():
    # The last rows against float math.
    b, d = 1 << 14, 4096
    mu, lv = make_inputs((b, d), torch.bfloat16, "cuda", seed=8, requires_grad=True)
    z, kl = fv.reparameterize_kl(mu, lv, reduction="per_sample", seed=10, backend="cuda")
    (z.float().square().mean() + kl.mean()).backward()
    rows = slice(b - 3, b)
    eps = fv.standard_normal((3, d), 10, offset=(b - 3) * d // 4, device="cuda")
    m, l = mu[rows].detach().double(), lv[rows].detach().double()
    torch.testing.assert_close(z[rows].double(), m + torch.exp(0.5 * l) * eps.double(), **Z_TOL[torch.bfloat16])
    torch.testing.assert_close(
        kl[rows].double(), (0.5 * (m * m + l.exp() - l - 1)).sum(1), **REDUCED_KL_TOL[torch.bfloat16]
    )
    assert torch.isfinite(mu.grad).all() and torch.isfinite(lv.grad).all()

"""CUDA backend specifics (needs a GPU; the shared contract suite covers the rest).

Paths of the kernels: vector and scalar memory access (misaligned storage offsets,
ragged tails, several samples with N % 4 != 0), the single-block and multi-block
reductions (rows inside a tile, rows cut by tiles, rows longer than 8 tiles), sample
splitting, 64-bit indexing, bitwise reproducibility of reduced KL, CUDA graphs,
torch.compile and the number of kernel launches of a small forward + backward.
"""

from __future__ import annotations

import pytest
import torch

import fused_vae as fv
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
from independent import math64, reduce64

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = "cuda"


@pytest.fixture(scope="module", autouse=True)
def cuda_backend_available():
    info = fv.available_backends()["cuda"]
    assert info.available, f"the cuda backend must be available on a CUDA machine: {info.reason}"


def run(mu, lv, reduction="batchmean", seed=7, num_samples=None, clamp=None, backend="cuda"):
    return fv.reparameterize_kl(
        mu, lv, reduction=reduction, seed=seed, num_samples=num_samples, logvar_clamp=clamp, backend=backend
    )


def check_math(z, kl, mu, lv, seed, reduction, num_samples=None, clamp=None):
    z64, kl64, _ = math64(mu, lv, seed, num_samples, clamp)
    torch.testing.assert_close(z.cpu().double(), z64, **Z_TOL[mu.dtype])
    expected = reduce64(kl64, reduction)
    assert kl.shape == expected.shape
    tol = KL_TOL[mu.dtype] if reduction == "none" else REDUCED_KL_TOL[mu.dtype]
    torch.testing.assert_close(kl.cpu().double(), expected, **tol)


# ---- values against float64 math -------------------------------------------------------

SHAPES = [
    (128, 32),  # one block, D divides the tile
    (7, 13),  # ragged tail
    (3, 1000),  # rows cut by tile boundaries (float32 tile 1024)
    (64, 3000),  # several blocks, cut rows
    (2, 9000),  # rows longer than 8 float32 tiles: one warp per row in the final pass
    (257, 1, 3),  # D = 3
    (5000,),  # D = 1
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_values_against_float64_math(shape, reduction, dtype):
    mu, lv = make_inputs(shape, dtype, DEV, seed=sum(shape))
    z, kl = run(mu, lv, reduction, seed=12345)
    check_math(z, kl, mu, lv, 12345, reduction)


@pytest.mark.parametrize(
    "shape,num_samples", [((4, 8), 2), ((3, 5), 3), ((5, 2001), 3), ((4, 8), 1000), ((3, 5), 777)], ids=str
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_multi_sample(shape, num_samples, dtype):
    # (3, 5): N % 4 != 0, so samples after the first start mid Philox group (scalar path);
    # (4, 8) x 1000 samples: few tiles, the forward splits the samples over blocks.
    mu, lv = make_inputs(shape, dtype, DEV, seed=5)
    z, kl = run(mu, lv, "per_sample", seed=99, num_samples=num_samples, clamp=(-2.0, 1.5))
    check_math(z, kl, mu, lv, 99, "per_sample", num_samples=num_samples, clamp=(-2.0, 1.5))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradients_match_reference(dtype, reduction):
    for shape, samples in (((128, 32), None), ((7, 13), 3), ((3, 5000), None)):
        mu, lv = make_inputs(shape, dtype, DEV, seed=11, requires_grad=True)
        outs = {}
        for backend in ("cuda", "reference"):
            z, kl = run(mu, lv, reduction, seed=3, num_samples=samples, clamp=(-1.0, 1.0), backend=backend)
            g = torch.Generator(device=DEV).manual_seed(0)
            gz = torch.randn(z.shape, generator=g, device=DEV).to(z.dtype)
            gkl = torch.randn(kl.shape, generator=g, device=DEV).to(kl.dtype)
            outs[backend] = torch.autograd.grad((z, kl), (mu, lv), (gz, gkl))
        for got, want in zip(outs["cuda"], outs["reference"]):
            torch.testing.assert_close(got, want, **Z_TOL[dtype])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_broadcast_output_gradients(reduction):
    # sum() gives expanded (stride-0) output gradients, which the kernels read in place.
    res = {}
    for backend in ("cuda", "reference"):
        mu, lv = make_inputs((33, 70), torch.float32, DEV, seed=2, requires_grad=True)
        z, kl = run(mu, lv, reduction, seed=8, num_samples=2, backend=backend)
        (z.sum() + 0.5 * kl.sum()).backward()
        res[backend] = (mu.grad, lv.grad)
    for got, want in zip(res["cuda"], res["reference"]):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


# ---- memory-access paths ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(64, 3000), (7, 13), (128, 32)], ids=str)
def test_misaligned_inputs_match_aligned(shape, reduction, dtype):
    # The scalar-access kernel must give the bits of the vector one (same math, same tree).
    mu, lv = make_inputs(shape, dtype, DEV, seed=21, requires_grad=True)
    assert_misaligned_matches_aligned(run, mu, lv, reduction)


def test_misaligned_output_gradient():
    # N % 8 == 0 and one sample: the aligned gradients take the vector path.
    mu, lv = make_inputs((9, 304), torch.bfloat16, DEV, seed=1, requires_grad=True)
    z, kl = run(mu, lv, "none", seed=6)
    gz = torch.randn(z.shape, device=DEV).to(z.dtype)
    gkl = torch.randn(kl.shape, device=DEV).to(kl.dtype)
    want = torch.autograd.grad((z, kl), (mu, lv), (gz, gkl), retain_graph=True)
    got = torch.autograd.grad((z, kl), (mu, lv), (misaligned(gz), misaligned(gkl, 5)))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_cpu_seed_tensor_matches_device_seed():
    mu, lv = make_inputs((16, 40), torch.float32, DEV, seed=3)
    op = torch.ops.fused_vae.reparam_kl_fwd
    on_dev = op(mu, lv, torch.tensor(2**62 + 17, device=DEV), 2, 2, None, None)
    on_cpu = op(mu, lv, torch.tensor(2**62 + 17), 2, 2, None, None)
    for a, b in zip(on_dev, on_cpu):
        assert torch.equal(a, b)


def test_empty_inputs():
    for shape in ((0, 4), (3, 0)):
        mu = torch.zeros(shape, device=DEV)
        for reduction in REDUCTIONS:
            z, kl = run(mu, mu.clone(), reduction, backend="cuda")
            z_r, kl_r = run(mu, mu.clone(), reduction, backend="reference")
            assert z.shape == z_r.shape and kl.shape == kl_r.shape
            torch.testing.assert_close(kl, kl_r, equal_nan=True)


def test_non_current_device_stream():
    # Runs on the inputs' device and the current stream of that device.
    mu, lv = make_inputs((64, 3000), torch.float32, DEV, seed=9)
    want = run(mu, lv, "per_sample", seed=1)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = run(mu, lv, "per_sample", seed=1)
    torch.cuda.current_stream().wait_stream(s)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# ---- determinism --------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["per_sample", "sum", "batchmean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(512, 3000), (4, 100000), (1 << 16, 64), (128, 32)], ids=str)
def test_reduced_kl_bitwise_reproducible(shape, dtype, reduction):
    mu, lv = make_inputs(shape, dtype, DEV, seed=17)
    first = fv.gaussian_kl(mu, lv, reduction=reduction, backend="cuda")
    for _ in range(5):
        again = fv.gaussian_kl(mu, lv, reduction=reduction, backend="cuda")
        assert torch.equal(first, again)
    _, kl = run(mu, lv, reduction, seed=1)
    assert torch.equal(kl, first)  # with or without sampling z, the same KL bits
    rows = reduce64(0.5 * (mu.double() ** 2 + lv.double().exp() - lv.double() - 1).cpu(), reduction)
    torch.testing.assert_close(first.cpu().double(), rows, rtol=1e-5, atol=1e-3)


# ---- 64-bit indexing ----------------------------------------------------------------------


def _free_bytes() -> int:
    free, _ = torch.cuda.mem_get_info()
    return free


def _check_sample(z, mu, lv, seed, s, n):
    eps = fv.standard_normal(n, seed, offset=(s * n) // 4, device=DEV)
    want = (mu.float() + torch.exp(0.5 * lv.float()) * eps).to(mu.dtype)
    torch.testing.assert_close(z[s].float(), want.float(), **Z_TOL[mu.dtype])


@pytest.mark.slow
def test_flat_index_past_2_to_32():
    n = 1 << 22
    samples = 1026  # z has 4.3e9 elements (8.6 GB of bfloat16)
    if _free_bytes() < 2 * samples * n + (1 << 30):
        pytest.skip("needs about 10 GB of free GPU memory")
    mu, lv = make_inputs((1, n), torch.bfloat16, DEV, seed=2)
    z = fv.reparameterize(mu, lv, seed=2**63 + 5, num_samples=samples, backend="cuda")
    for s in (0, 1023, samples - 1):  # sample 1024 starts at element 2**32
        _check_sample(z.view(samples, n), mu.view(n), lv.view(n), 2**63 + 5, s, n)


@pytest.mark.slow
def test_philox_group_past_2_to_32():
    # Group index >= 2**32 (high counter word non-zero): flat index >= 2**34.
    n = 1 << 24
    samples = (1 << 10) + 2  # 1.7e10 elements, 34 GB of bfloat16
    if _free_bytes() < 2 * samples * n + (1 << 30):
        pytest.skip("needs about 36 GB of free GPU memory")
    mu, lv = make_inputs((1, n), torch.bfloat16, DEV, seed=3)
    z = fv.reparameterize(mu, lv, seed=77, num_samples=samples, backend="cuda")
    for s in (samples - 2, samples - 1):
        _check_sample(z.view(samples, n), mu.view(n), lv.view(n), 77, s, n)


# ---- CUDA graphs, torch.compile, launches ---------------------------------------------


def test_cuda_graph_fresh_noise_with_default_seed():
    mu, lv = make_inputs((64, 100), torch.float32, DEV, seed=4)
    run(mu, lv, seed=None)  # warm up (lazy init) outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        z, kl = run(mu, lv, seed=None)
    g.replay()
    z1, kl1 = z.clone(), kl.clone()
    g.replay()
    z2, kl2 = z.clone(), kl.clone()
    assert not torch.equal(z1, z2), "a replay must draw fresh noise with seed=None"
    assert torch.equal(kl1, kl2)


def test_cuda_graph_fixed_seed_tensor():
    mu, lv = make_inputs((64, 100), torch.bfloat16, DEV, seed=4, requires_grad=True)
    seed = torch.tensor(123, device=DEV)
    z_e, kl_e = run(mu, lv, seed=seed)
    ge = torch.autograd.grad((z_e, kl_e), (mu, lv), (torch.ones_like(z_e), torch.ones_like(kl_e)))
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        z, kl = run(mu, lv, seed=seed)
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
    assert torch.equal(z, run(mu, lv, seed=124)[0])


def test_torch_compile_fullgraph_and_cudagraphs():
    mu, lv = make_inputs((128, 32), torch.float32, DEV, seed=6, requires_grad=True)
    seed = torch.tensor(5, device=DEV)

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_two_kernel_launches_at_128x32(dtype, reduction):
    from torch.profiler import ProfilerActivity, profile

    mu, lv = make_inputs((128, 32), dtype, DEV, seed=1, requires_grad=True)
    seed = torch.tensor(9, device=DEV)
    z, kl = run(mu, lv, reduction, seed=seed)
    gz, gkl = torch.randn_like(z), torch.randn_like(kl)

    def step():
        z, kl = run(mu, lv, reduction, seed=seed)
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


def test_large_forward_backward_smoke():
    # 64M elements (the benchmark size): the last rows against float math.
    b, d = 1 << 14, 4096
    mu, lv = make_inputs((b, d), torch.bfloat16, DEV, seed=8, requires_grad=True)
    z, kl = run(mu, lv, "per_sample", seed=10)
    (z.float().square().mean() + kl.mean()).backward()
    rows = slice(b - 3, b)
    eps = fv.standard_normal((3, d), 10, offset=(b - 3) * d // 4, device=DEV)
    m, l = mu[rows].detach().double(), lv[rows].detach().double()
    torch.testing.assert_close(z[rows].double(), m + torch.exp(0.5 * l) * eps.double(), **Z_TOL[torch.bfloat16])
    torch.testing.assert_close(
        kl[rows].double(), (0.5 * (m * m + l.exp() - l - 1)).sum(1), **REDUCED_KL_TOL[torch.bfloat16]
    )
    assert torch.isfinite(mu.grad).all() and torch.isfinite(lv.grad).all()

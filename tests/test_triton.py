"""Triton backend specifics: noise layout, 64-bit offsets, tiling, deterministic reductions,
availability, kernels compiling for the GPU without one, and (on a GPU only) seeds without
host synchronisation and fresh noise on CUDA-graph replays.

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
from helpers import make_inputs
from fused_vae import _validation as V
from fused_vae.backends import reference
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


def _check_against_reference(mu, lv, seed, num_samples, kl_mode, lo, hi):
    z, kl = FWD(mu, lv, seed, num_samples, kl_mode, lo, hi)
    zr, klr = reference.reparam_kl(mu, lv, seed, num_samples, kl_mode, lo, hi)
    assert z.shape == zr.shape and kl.shape == klr.shape and kl.dtype == klr.dtype
    torch.testing.assert_close(z, zr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl, klr, rtol=1e-5, atol=1e-5)
    # backward against the reference's autograd
    mu_r = mu.detach().clone().requires_grad_(True)
    lv_r = lv.detach().clone().requires_grad_(True)
    zr, klr = reference.reparam_kl(mu_r, lv_r, seed, num_samples, kl_mode, lo, hi)
    g = torch.Generator().manual_seed(7)
    gz = torch.randn(zr.shape, generator=g).to(mu.device) if num_samples else None
    gkl = torch.randn(klr.shape, generator=g, dtype=klr.dtype).to(mu.device) if kl_mode else None
    outs = [t for t, gr in ((zr, gz), (klr, gkl)) if gr is not None]
    grads = [gr for gr in (gz, gkl) if gr is not None]
    want_mu, want_lv = torch.autograd.grad(outs, (mu_r, lv_r), grads, allow_unused=True)
    got_mu, got_lv = BWD(gz, gkl, mu, lv, seed, num_samples, kl_mode, lo, hi)
    torch.testing.assert_close(got_mu, want_mu if want_mu is not None else torch.zeros_like(mu), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_lv, want_lv if want_lv is not None else torch.zeros_like(lv), rtol=1e-5, atol=1e-5)


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
    _check_against_reference(mu, lv, seed, num_samples, kl_mode, -0.75, 0.5 if kl_mode % 2 else None)


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


def test_reductions_are_deterministic(device, monkeypatch):
    monkeypatch.setattr(K, "_tile_elems", lambda n: 32)
    mu, lv = make_inputs((6, 50), torch.float32, device, seed=11)
    seed = _seed(77, device)
    for mode in (2, 3, 4):
        first = FWD(mu, lv, seed, 1, mode, None, None)[1]
        for _ in range(2):
            again = FWD(mu, lv, seed, 1, mode, None, None)[1]
            assert torch.equal(first, again)


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
    z, kl = FWD(mu, lv, seed, 2, 2, -0.1, 0.1)
    zr, klr = reference.reparam_kl(mu, lv, seed, 2, 2, -0.1, 0.1)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(kl, klr, **tol)
    torch.testing.assert_close(z, zr, **(dict(rtol=1e-6, atol=1e-6) if dtype == torch.float64 else tol))
    if dtype == torch.float64:  # logvar within float32 rounding of a bound: float64 semantics
        lv2 = torch.tensor([[0.1 + 1e-12, 0.1 - 1e-12, -0.1 - 1e-12]], dtype=dtype, device=device)
        mu2 = torch.zeros_like(lv2)
        kl2 = FWD(mu2, lv2, seed, 0, 1, -0.1, 0.1)[1]
        kl2r = reference.reparam_kl(mu2, lv2, seed, 0, 1, -0.1, 0.1)[1]
        torch.testing.assert_close(kl2, kl2r, rtol=0, atol=1e-15)
        gl = BWD(None, torch.ones_like(kl2), mu2, lv2, seed, 0, 1, -0.1, 0.1)[1]
        assert gl[0, 0] == 0 and gl[0, 1] != 0 and gl[0, 2] == 0


def test_strided_and_empty_inputs(device):
    base_mu, base_lv = make_inputs((6, 10), torch.float32, device, seed=9)
    mu, lv = base_mu[:, ::2], base_lv.t().contiguous().t()[:, 1::2]
    seed = _seed(1, device)
    _check_against_reference(mu, lv, seed, 2, 2, None, None)
    empty = torch.empty(0, 4, device=device)
    z, kl = FWD(empty, empty, seed, 1, 4, None, None)
    assert z.shape == (1, 0, 4) and kl.shape == () and torch.isnan(kl)
    z, kl = FWD(empty, empty, seed, 1, 2, None, None)
    assert kl.shape == (0,)
    z, kl = FWD(torch.empty(3, 0, device=device), torch.empty(3, 0, device=device), seed, 1, 2, None, None)
    assert kl.shape == (3,) and torch.equal(kl, torch.zeros(3, device=device))


# Shapes whose planned tiles (K.plan) hold many rows per program, many chunks per row, or
# a flattened 4-D input: at real sizes on a GPU, at interpreter sizes on the CPU.
PLANNED_SHAPES = {
    "cuda": {"rows": (4096, 16), "chunks": (3, 1000003), "4d": (8, 16, 128, 128)},
    "cpu": {"rows": (300, 16), "chunks": (1, 4201), "4d": (5, 4, 16, 16)},
}


@pytest.mark.parametrize("kind", ["rows", "chunks", "4d"])
def test_planned_tiles_match_reference(device, kind):
    mu, lv = make_inputs(PLANNED_SHAPES[device][kind], torch.float32, device, seed=4)
    seed = _seed(2**63 + 1, device)
    for mode in (2, 4):
        _check_against_reference(mu, lv, seed, 1, mode, None, None)


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
        # Every configuration for sm_90, one (the vectorised float32 path) for sm_80.
        for arch, (d, aligned, flat, clamp) in [(90, c) for c in configs] + [(80, configs[0])]:
            acc = "*fp64" if d == "f64" else "*fp32"
            common = dict(FLAT=flat, ALIGNED=aligned, HAS_LO=clamp, HAS_HI=clamp, IS_F64=d == "f64",
                          ROWS=1 if flat else 16, CH4=256 if flat else 4)
            for mode in (1, 2):
                t = dict(ints, mu_ptr=P[d], lv_ptr=P[d], z_ptr=P[d], kl_ptr=P[d] if mode == 1 else acc,
                         part_ptr=acc, seed_ptr="*i64")
                k = build(K._fwd_kernel, t, dict(common, KL_IS_ELEMENTWISE=mode == 1, KL_RED=mode == 2, KL_FINAL=False), arch, 4)
                if d == "f32" and aligned:
                    assert "ld.global.v4" in k.asm["ptx"], "mu/logvar loads are not vectorised"
                t = dict(ints, gz_ptr=P[d], gkl_ptr=P[d] if mode == 1 else acc, mu_ptr=P[d], lv_ptr=P[d],
                         gmu_ptr=P[d], glv_ptr=P[d], seed_ptr="*i64")
                build(K._bwd_kernel, t, dict(common, HAS_GZ=True, GKL_MODE=mode), arch, 4)
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

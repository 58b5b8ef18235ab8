"""The CUDA kernels (csrc/cuda/) on two devices: a real GPU ("cuda", when there is one)
and the emulated device ("emulated", always; FUSED_VAE_CUDA_EMULATE=1, CPU tensors, ops
``fused_vae::cuda_emu_<op>_*``). The shared contract suite covers the rest.

The emulated device compiles csrc/cuda/ as host C++ against csrc/emulate/cuda_emulation.h
(see fused_vae/backends/cuda_emulation.py): each block's 256 threads run concurrently,
barriers and full-mask shuffles are checked, outputs and shared memory start as NaN.

Both op families are tested: the sampling op (z, its KL to N(0, I) or to a learned prior,
its log density log q or log q - log p per sample and row) and gaussian_log_prob.

The shapes of SHAPES reach every path of the forward kernels (docs/design.md section 9)
with their real tile sizes (TILE = 1024 elements for float32/float64, 2048 for 16-bit
types): the single-block fused path (at most 8 tiles x samples) with and without its row
pass, the multi-block path with the row pass kernel and the one-block total over more
than 256 rows, tiles of whole rows (many rows per tile, rows that start off a vector
boundary) and tiles that hold one chunk of a row (rows of more than 32 chunks). LOGQ_CASES
do the same for the log density's [S, B] rows (with the KL modes spread over them), with
several samples where N % 4 != 0 and the split of samples over blocks. Other tests reach
misaligned (scalar-access) inputs and output gradients, broadcast output gradients and
empty inputs. Values and gradients are checked against float64 math: tests/independent.py
for z and the N(0, I) KL, and the reference backend (fused_vae/backends/reference.py, the
protocol's definition of every output) run in float64 on the same inputs, with its
autograd for the gradients, for the prior, the log density and gaussian_log_prob.

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
from fused_vae.backends import protocol as P
from fused_vae.backends import reference
from helpers import (
    DTYPES,
    REDUCED_KL_TOL,
    REDUCTIONS,
    Z_TOL,
    KL_TOL,
    assert_misaligned_matches_aligned,
    check_math,
    make_inputs,
    misaligned,
)
from independent import grads64, math64, reduce64

HAS_CUDA = torch.cuda.is_available()
MODES = {**P.REDUCTION_MODES, "skip": P.REDUCE_SKIP}
LOGQ_MODES = [P.LOGQ_DENSITY, P.LOGQ_RATIO, P.LOGQ_DENSITY_PATH, P.LOGQ_RATIO_PATH]
# Row sums of the log density (float32, float64 for float64 inputs). Its terms hold the
# float32 noise (-0.5 eps^2), whose last bits differ between backends, so float64 sums
# agree to about the noise's precision.
LOGQ_TOL = {**REDUCED_KL_TOL, torch.float64: dict(rtol=2e-6, atol=1e-4)}


def gpu_only(why: str):
    """Marks a test that runs on a real CUDA device only, with the reason in its skip."""
    return lambda fn: pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason=f"needs a CUDA device: {why}")(fn))


@dataclass(frozen=True)
class Device:
    """One device the CUDA kernels run on: where tensors live and which ops it runs
    (``fused_vae::<prefix><family>_fwd`` / ``_bwd``)."""

    name: str  # "cuda" or "emulated"
    torch_device: str  # "cuda" or "cpu"
    prefix: str  # "" (the extension's ops) or "cuda_emu_"

    def op(self, name: str):
        return getattr(torch.ops.fused_vae, self.prefix + name)

    @property
    def fwd_op(self):
        return self.op("reparam_kl_fwd")

    @property
    def bwd_op(self):
        return self.op("reparam_kl_bwd")

    def seed(self, seed) -> torch.Tensor:
        return torch.tensor(seed, device=self.torch_device)

    def sample_args(self, mu, lv, prior=None, reduction="batchmean", seed=7, num_samples=1, logq_mode=0,
                    clamp=(None, None)):  # fmt: skip
        """The sampling op's argument tuple; prior is None or (prior_mu, prior_logvar)."""
        pm, pl = prior if prior is not None else (None, None)
        return (mu, lv, pm, pl, self.seed(seed), num_samples, MODES[reduction], logq_mode, *clamp)

    def sample(self, *args, **kw):
        """The sampling op: (z [S, *shape], kl, logq [S, B]); autograd runs its backward op.
        Arguments as :meth:`sample_args`."""
        return self.fwd_op(*self.sample_args(*args, **kw))

    def fwd(self, mu, lv, reduction="batchmean", seed=7, num_samples=1, clamp=(None, None)):
        """The N(0, I) sampling op without a log density (the original path): (z, kl)."""
        return self.sample(mu, lv, None, reduction, seed, num_samples, P.LOGQ_SKIP, clamp)[:2]

    def log_prob(self, x, mu, lv, reduction="per_sample", clamp=(None, None)):
        return self.op("gaussian_log_prob_fwd")(x, mu, lv, MODES[reduction], *clamp)


def tile(dtype: torch.dtype) -> int:
    """Elements per tile of the CUDA kernels (256 threads x 16 bytes or 4 elements)."""
    return 2048 if dtype in (torch.float16, torch.bfloat16) else 1024


def _cuda_device() -> Device:
    info = fv.available_backends()["cuda"]
    assert info.available, f"the cuda backend must be available on a CUDA machine: {info.reason}"
    return Device("cuda", "cuda", "")


@pytest.fixture
def emulated(cuda_emulation) -> Device:
    """The emulated device, its ops built and loaded."""
    if not cuda_emulation:
        pytest.skip(f"{emu.ENV_VAR} is set to something other than 1")
    st = emu.status()
    assert st.loaded, st.reason
    return Device("emulated", "cpu", emu.PREFIX)


@pytest.fixture(params=([pytest.param("cuda", marks=pytest.mark.gpu)] if HAS_CUDA else []) + ["emulated"])
def dev(request) -> Device:
    """Each device the kernels run on here: the GPU when present, the emulated one always."""
    return _cuda_device() if request.param == "cuda" else request.getfixturevalue("emulated")


def run(mu, lv, reduction="batchmean", seed=7, num_samples=None, clamp=None):
    """The public API with the cuda backend (on CPU tensors: the emulated device)."""
    return fv.reparameterize_kl(
        mu, lv, reduction=reduction, seed=seed, num_samples=num_samples, logvar_clamp=clamp, backend="cuda"
    )


def random_grads(*outs, seed=0):
    """Random gradients like each output (None for an output without elements)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(o.shape, generator=g).to(o) if o.numel() else None for o in outs)


def _cpu64(a):
    return a.detach().cpu().double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a


def _cpu(a):
    return a.cpu() if isinstance(a, torch.Tensor) else a


def reference64(op: str, args) -> tuple:
    """The outputs of op family ``op`` for the forward op's arguments ``args``, by the
    reference backend in float64 on the same (rounded) inputs, on the CPU."""
    spec = P.OPS[op]
    return spec.unpack(reference.run(op, *[_cpu64(a) for a in args]))


def reference_grads64(op: str, args, grads) -> list:
    """The gradients of the given inputs of ``args`` against the output gradients ``grads``
    (None where absent) by float64 autograd of the reference backend."""
    spec = P.OPS[op]
    inputs, params = spec.split(args)
    leaves = [None if t is None else _cpu64(t).requires_grad_() for t in inputs]
    outs = spec.unpack(reference.run(op, *leaves, *[_cpu(p) for p in params]))
    pairs = [(o, _cpu64(g).reshape(o.shape)) for o, g in zip(outs, grads) if g is not None]
    wrt = [t for t in leaves if t is not None]
    got = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(wrt, got)]


def assert_close64(got, want, tol):
    assert got.shape == want.shape, (got.shape, want.shape)
    torch.testing.assert_close(got.cpu().double(), want, **tol, equal_nan=True)


def make_prior(shape, dtype, device, seed, requires_grad=False):
    """A learned prior (prior_mu, prior_logvar) like make_inputs'."""
    return make_inputs(shape, dtype, device, seed=seed + 1000, lv_scale=0.7, requires_grad=requires_grad)


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


# ---- the learned prior and the log density ------------------------------------------------

# (shape as a function of the tile size T, samples, KL reduction): every tiling path of the
# log density's [S, B] rows (the same tiles as a reduced KL's), with the KL modes spread
# over them; names say which path.
LOGQ_CASES = {
    "rows_ragged_fused": (lambda t: (7, 13), 3, "per_sample"),  # whole rows off V; N % 4 = 3 with 3 samples
    "rows_chunked_fused": (lambda t: (2, 2 * t + 5), 1, "none"),  # 6 chunk tiles: the row pass in the block
    "rows_chunked_multi": (lambda t: (5, 2 * t - 48), 2, "batchmean"),  # 20 work items: row pass kernel, total
    "chunks_off_v_samples": (lambda t: (3, t + 3), 2, "sum"),  # chunks of T - V; N % 4 = 1 with 2 samples
    "many_rows_per_tile": (lambda t: (3 * t + 5, 1, 3), 1, "sum"),  # D = 3: 10 tiles of whole rows
    "split_samples": (lambda t: (4, 8), 50, "skip"),  # few tiles, many samples: samples over blocks
    "flat": (lambda t: (3000,), 2, "per_sample"),  # D = 1: a row per element
}


def check_sample_terms(outs, args):
    """The sampling op's outputs for ``args`` against float64 math: z (independent.py's
    stream), the KL and the log density (the reference backend in float64)."""
    mu, lv, pm = args[0], args[1], args[2]
    seed, samples, kl_mode, logq_mode, lo, hi = args[4:]
    z, kl, logq = outs
    want = reference64("reparam_kl", args)
    dtype = mu.dtype
    assert z.dtype == dtype and kl.dtype == (dtype if kl_mode <= P.REDUCE_ELEMENTWISE else P.acc_dtype(dtype))
    assert_close64(z, want[0], Z_TOL[dtype])
    clamp = None if lo is None and hi is None else (lo, hi)
    if samples:
        assert_close64(z, math64(mu, lv, int(seed), samples, clamp)[0], Z_TOL[dtype])
    assert_close64(kl, want[1], KL_TOL[dtype] if kl_mode <= P.REDUCE_ELEMENTWISE else REDUCED_KL_TOL[dtype])
    if kl_mode == P.REDUCE_ELEMENTWISE and pm is None:  # the N(0, I) KL from independent.py too
        assert_close64(kl, math64(mu, lv, int(seed), 1, clamp)[1], KL_TOL[dtype])
    if logq_mode != P.LOGQ_SKIP:
        assert logq.dtype == P.acc_dtype(dtype)
    assert_close64(logq, want[2], LOGQ_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("logq_mode", [P.LOGQ_DENSITY, P.LOGQ_RATIO], ids=["q", "ratio"])
@pytest.mark.parametrize("prior", [False, True], ids=["std_normal", "prior"])
@pytest.mark.parametrize("case", list(LOGQ_CASES))
def test_sample_terms_against_float64_math(dev, case, prior, logq_mode, dtype):
    shape_of, samples, reduction = LOGQ_CASES[case]
    shape = shape_of(tile(dtype))
    mu, lv = make_inputs(shape, dtype, dev.torch_device, seed=sum(shape))
    pr = make_prior(shape, dtype, dev.torch_device, seed=sum(shape)) if prior else None
    clamp = (-1.5, 1.0) if logq_mode == P.LOGQ_RATIO else (None, None)  # the clamp applies to both logvars
    args = dev.sample_args(mu, lv, pr, reduction, seed=321, num_samples=samples, logq_mode=logq_mode, clamp=clamp)
    check_sample_terms(dev.fwd_op(*args), args)


@pytest.mark.parametrize("reduction", ["skip", *REDUCTIONS])
def test_prior_kl_without_a_sample(dev, reduction):
    # num_samples = 0 (gaussian_kl with a prior): the KL only, whole-row tiles and chunks.
    for shape in ((7, 13), (3, 2 * 1024 + 5)):
        mu, lv = make_inputs(shape, torch.float32, dev.torch_device, seed=4)
        pr = make_prior(shape, torch.float32, dev.torch_device, seed=4)
        args = dev.sample_args(mu, lv, pr, reduction, num_samples=0, clamp=(-1.0, None))
        outs = dev.fwd_op(*args)
        assert outs[0].shape == (0,) and outs[2].shape == (0,)
        check_sample_terms(outs, args)


def test_path_gradient_modes_have_the_same_values(dev):
    # Path modes change the gradient only: their outputs are the bits of modes 1 and 2.
    mu, lv = make_inputs((5, 401), torch.float32, dev.torch_device, seed=8)
    pr = make_prior((5, 401), torch.float32, dev.torch_device, seed=8)
    for plain, path in ((P.LOGQ_DENSITY, P.LOGQ_DENSITY_PATH), (P.LOGQ_RATIO, P.LOGQ_RATIO_PATH)):
        a = dev.sample(mu, lv, pr, "per_sample", num_samples=2, logq_mode=plain)
        b = dev.sample(mu, lv, pr, "per_sample", num_samples=2, logq_mode=path)
        assert all(torch.equal(x, y) for x, y in zip(a, b))


# (shape, samples, KL reduction) for the backward, whose tiles are flat: rows that straddle
# a thread's elements, several samples with N % 4 != 0 (scalar path), aligned vector
# paths, D = 1 (every element of a thread in another row).
GRAD_CASES = [((7, 13), 3, "per_sample"), ((5, 401), 2, "none"), ((9, 64), 2, "batchmean"), ((3000,), 1, "sum")]


def check_sample_grads(dev, args, grads):
    """The backward op's gradients for ``args`` and output gradients ``grads`` against float64
    autograd of the reference; [0] for the prior's when there is none."""
    got = dev.bwd_op(*grads, *args)
    want = reference_grads64("reparam_kl", args, grads)
    has_prior = args[2] is not None
    assert len(want) == (4 if has_prior else 2)
    for g, w in zip(got, want):
        assert g.dtype == args[0].dtype and g.is_contiguous()
        assert_close64(g, w, Z_TOL[args[0].dtype])
    if not has_prior:
        assert got[2].shape == (0,) and got[3].shape == (0,)
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("logq_mode", [P.LOGQ_SKIP, *LOGQ_MODES], ids=["no_logq", "q", "ratio", "q_path", "ratio_path"])
@pytest.mark.parametrize("prior", [False, True], ids=["std_normal", "prior"])
def test_sample_gradients_against_float64_math(dev, prior, logq_mode, dtype):
    for shape, samples, reduction in GRAD_CASES:
        mu, lv = make_inputs(shape, dtype, dev.torch_device, seed=11)
        pr = make_prior(shape, dtype, dev.torch_device, seed=11) if prior else None
        args = dev.sample_args(mu, lv, pr, reduction, seed=3, num_samples=samples, logq_mode=logq_mode,
                               clamp=(-1.0, 1.0))  # fmt: skip
        check_sample_grads(dev, args, random_grads(*dev.fwd_op(*args), seed=samples))


@pytest.mark.parametrize("logq_mode", LOGQ_MODES, ids=["q", "ratio", "q_path", "ratio_path"])
def test_each_output_gradient_alone(dev, logq_mode):
    # One output gradient at a time (the log density's without grad_z needs the noise
    # too), and none at all: zeros.
    mu, lv = make_inputs((5, 401), torch.float32, dev.torch_device, seed=12)
    for pr in (None, make_prior((5, 401), torch.float32, dev.torch_device, seed=12)):
        args = dev.sample_args(mu, lv, pr, "per_sample", seed=9, num_samples=2, logq_mode=logq_mode, clamp=(-1.0, 1.0))
        grads = random_grads(*dev.fwd_op(*args), seed=4)
        for which in range(3):
            check_sample_grads(dev, args, [g if i == which else None for i, g in enumerate(grads)])
        for g in dev.bwd_op(None, None, None, *args):
            assert g.numel() == 0 or (g.is_contiguous() and not g.any())


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_broadcast_output_gradients_with_prior_and_log_density(dev, reduction, dtype):
    # sum() gives expanded (stride-0) gradients of z, kl and logq, read in place.
    shape = (5, 401)
    mu, lv = make_inputs(shape, dtype, dev.torch_device, seed=2, requires_grad=True)
    pm, pl = make_prior(shape, dtype, dev.torch_device, seed=2, requires_grad=True)
    args = dev.sample_args(mu, lv, (pm, pl), reduction, seed=8, num_samples=2, logq_mode=P.LOGQ_RATIO_PATH)
    z, kl, logq = dev.fwd_op(*args)
    got = torch.autograd.grad(z.sum() + 0.5 * kl.sum() + 0.25 * logq.sum(), (mu, lv, pm, pl))
    grads = [torch.ones(z.shape), torch.full(kl.shape, 0.5), torch.full(logq.shape, 0.25)]
    for g, w in zip(got, reference_grads64("reparam_kl", args, grads)):
        assert_close64(g, w, Z_TOL[dtype])


@pytest.mark.parametrize("reduction", ["per_sample", "sum", "batchmean"])
def test_log_density_bits_do_not_depend_on_the_grid(emulated, reduction, monkeypatch):
    # 18 chunk tiles x 2 samples over 8, 16 or 40 resident blocks, then the row passes.
    shape = (2, 8 * 1024 + 100)
    mu, lv = make_inputs(shape, torch.float32, "cpu", seed=17)
    pr = make_prior(shape, torch.float32, "cpu", seed=17)
    results = []
    for sms in ("1", "2", "5"):
        monkeypatch.setenv("FUSED_VAE_CUDA_EMULATE_SMS", sms)
        results.append(emulated.sample(mu, lv, pr, reduction, seed=1, num_samples=2, logq_mode=P.LOGQ_RATIO)[1:])
    assert all(torch.equal(a, b) for r in results[1:] for a, b in zip(results[0], r))


# ---- gaussian_log_prob ----------------------------------------------------------------------


def log_prob_inputs(shape, dtype, device, seed, requires_grad=False):
    x, _ = make_inputs(shape, dtype, device, seed=seed + 500, requires_grad=requires_grad)
    return (x, *make_inputs(shape, dtype, device, seed=seed, requires_grad=requires_grad))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_log_prob_against_float64_math(dev, shape_name, reduction, dtype):
    shape = SHAPES[shape_name](tile(dtype))
    x, mu, lv = log_prob_inputs(shape, dtype, dev.torch_device, seed=sum(shape))
    clamp = (-1.0, 1.5) if reduction in ("none", "sum") else (None, None)
    args = (x, mu, lv, MODES[reduction], *clamp)
    out = dev.op("gaussian_log_prob_fwd")(*args)
    want = reference64("gaussian_log_prob", args)[0]
    assert out.dtype == (dtype if reduction == "none" else P.acc_dtype(dtype))
    assert_close64(out, want, KL_TOL[dtype] if reduction == "none" else REDUCED_KL_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_log_prob_gradients_against_float64_math(dev, dtype, reduction):
    for shape in ((7, 13), (3, 2 * tile(dtype) + 5), (5, 401), (3000,)):
        x, mu, lv = log_prob_inputs(shape, dtype, dev.torch_device, seed=13)
        args = (x, mu, lv, MODES[reduction], -1.0, 1.0)
        (grad,) = random_grads(dev.op("gaussian_log_prob_fwd")(*args), seed=1)
        got = dev.op("gaussian_log_prob_bwd")(grad, *args)
        for g, w in zip(got, reference_grads64("gaussian_log_prob", args, [grad])):
            assert g.dtype == dtype and g.is_contiguous()
            assert_close64(g, w, Z_TOL[dtype])
    assert not any(g.any() for g in dev.op("gaussian_log_prob_bwd")(None, *args))  # no gradient: zeros


@pytest.mark.parametrize("reduction", ["none", "per_sample"])
def test_log_prob_broadcast_gradient(dev, reduction):
    x, mu, lv = log_prob_inputs((5, 401), torch.bfloat16, dev.torch_device, seed=3, requires_grad=True)
    out = dev.log_prob(x, mu, lv, reduction)
    got = torch.autograd.grad(0.5 * out.sum(), (x, mu, lv))
    want = reference_grads64("gaussian_log_prob", (x, mu, lv, MODES[reduction], None, None),
                             [torch.full(out.shape, 0.5)])  # fmt: skip
    for g, w in zip(got, want):
        assert_close64(g, w, Z_TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_log_prob_misaligned_inputs_give_the_same_bits(dev, dtype):
    fwd, bwd = dev.op("gaussian_log_prob_fwd"), dev.op("gaussian_log_prob_bwd")
    for shape, reduction in (((7, 13), "none"), ((5, 2 * tile(dtype) - 48), "per_sample")):
        inputs = log_prob_inputs(shape, dtype, dev.torch_device, seed=21)
        shifted = [misaligned(t, k) for t, k in zip(inputs, (1, 3, 5))]
        for mode in (MODES[reduction], P.REDUCE_SUM):
            a, b = fwd(*inputs, mode, None, 1.0), fwd(*shifted, mode, None, 1.0)
            assert torch.equal(a, b)
            (g,) = random_grads(a)
            g_shift = misaligned(g, 1) if mode == P.REDUCE_ELEMENTWISE else g
            for u, v in zip(bwd(g, *inputs, mode, None, 1.0), bwd(g_shift, *shifted, mode, None, 1.0)):
                assert torch.equal(u, v)


# ---- the ops' checks ----------------------------------------------------------------------


def _protocol_error(check):
    try:
        check()
    except (TypeError, ValueError) as exc:
        return exc
    raise AssertionError("the protocol's check accepted the arguments")


def test_new_arguments_are_refused_as_the_protocol_says(dev):
    # The new arguments' mistakes: the CUDA glue raises the protocol's type and message
    # (op_common.h's checks; tests/test_op_protocol.py holds every backend to them).
    d = dev.torch_device
    mu, lv = make_inputs((4, 3), torch.float32, d, seed=1)
    seed = dev.seed(3)
    gz = torch.ones(1, 4, 3, device=d)
    fwd_cases = [
        (mu, lv, mu, None, seed, 1, 4, 0, None, None),  # prior_mu alone
        (mu, lv, mu[:2], lv[:2], seed, 1, 4, 0, None, None),  # prior of another shape
        (mu, lv, mu.double(), lv.double(), seed, 1, 4, 0, None, None),  # prior of another dtype
        (mu, lv, None, None, seed, 1, 4, 5, None, None),  # logq_mode out of range
        (mu, lv, None, None, seed, 0, 4, 1, None, None),  # logq without a sample
    ]
    bwd_cases = [
        (None, None, torch.ones(1, 4, device=d), *fwd_cases[0][:2], None, None, seed, 1, 4, 0, None, None),
        (None, None, torch.ones(2, 4, device=d), mu, lv, None, None, seed, 1, 4, 1, None, None),
        (None, None, torch.ones(1, 4, device=d, dtype=torch.float64), mu, lv, None, None, seed, 1, 4, 1, None, None),
        (gz, None, None, mu, lv, mu, None, seed, 1, 4, 0, None, None),
    ]
    spec, lp = P.REPARAM, P.LOG_PROB
    checks = [(dev.fwd_op, a, lambda a=a: spec.check_fwd_args(*spec.split(a))) for a in fwd_cases]
    checks += [(dev.bwd_op, a, lambda a=a: spec.check_bwd_args(a[:3], *spec.split(a[3:]))) for a in bwd_cases]
    lp_cases = [(mu, mu, lv, 0, None, None), (mu, mu, lv[:2], 2, None, None), (mu, mu.double(), lv, 2, None, None)]
    checks += [(dev.op("gaussian_log_prob_fwd"), a, lambda a=a: lp.check_fwd_args(*lp.split(a))) for a in lp_cases]
    grad = torch.ones(5, device=d)
    checks.append((dev.op("gaussian_log_prob_bwd"), (grad, mu, mu, lv, 2, None, None),
                   lambda: lp.check_bwd_args((grad,), *lp.split((mu, mu, lv, 2, None, None)))))  # fmt: skip
    for op, args, check in checks:
        want = _protocol_error(check)
        with pytest.raises(type(want)) as got:
            op(*args)
        assert str(got.value).splitlines()[0] == str(want), (str(got.value), str(want))


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
        expected = reduce64(torch.zeros(shape, dtype=torch.float64), reduction)
        for prior, logq_mode in ((None, P.LOGQ_SKIP), ((mu.clone(), mu.clone()), P.LOGQ_RATIO)):
            args = dev.sample_args(mu, mu.clone(), prior, reduction, num_samples=2, logq_mode=logq_mode)
            z, kl, logq = dev.fwd_op(*args)
            assert z.shape == (2, *shape)
            assert kl.shape == expected.shape
            torch.testing.assert_close(kl.cpu().double(), expected, equal_nan=True)
            if logq_mode:  # rows without elements sum to 0
                assert logq.shape == (2, shape[0]) and not logq.any()
            grads = dev.bwd_op(torch.zeros(2, *shape, device=dev.torch_device), None, None, *args)
            assert [g.shape for g in grads] == [shape, shape] + [shape if prior else (0,)] * 2
        out = dev.log_prob(mu, mu, mu, reduction)
        assert out.shape == expected.shape
        torch.testing.assert_close(out.cpu().double(), expected, equal_nan=True)
        grads = dev.op("gaussian_log_prob_bwd")(torch.zeros_like(out), mu, mu, mu, MODES[reduction], None, None)
        assert [g.shape for g in grads] == [shape] * 3


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
    # The raw op never synchronises with the host: check_reparam (op_common.h) rejects a
    # CPU seed for CUDA tensors instead of reading it.
    dev = _cuda_device()
    mu, lv = make_inputs((16, 40), torch.float32, "cuda", seed=3)
    with pytest.raises(ValueError, match="seed is on cpu but mu is on cuda"):
        dev.fwd_op(mu, lv, None, None, torch.tensor(5), 2, 2, 0, None, None)
    with pytest.raises(ValueError, match="seed is on cpu but mu is on cuda"):
        dev.bwd_op(torch.ones(1, 16, 40, device="cuda"), None, None, mu, lv, None, None, torch.tensor(5), 1, 1, 0,
                   None, None)  # fmt: skip


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
    for name in (f"{family}_{d}" for family in P.OPS for d in ("fwd", "bwd")):
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

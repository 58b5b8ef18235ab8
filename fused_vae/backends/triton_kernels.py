"""Triton kernels of the ``triton`` backend and their host-side launchers.

Imported lazily (on the first call of a ``fused_vae::triton_reparam_kl_*`` op), so that
``import fused_vae`` works without triton and ``TRITON_INTERPRET=1`` can be set any time
before the first call: triton reads it when the kernels below are decorated.

Layout. mu/logvar (made contiguous) are viewed as ``[R, C]`` rows: ``[B, D]`` when a KL
is reduced (forward ``per_sample`` / ``sum`` / ``batchmean``, backward with a per-sample
grad_kl), else one flat row ``[1, N]``. A program owns ``ROWS`` whole rows, or one chunk
of ``4 * CH4`` columns of one row, held as a ``[ROWS, CH4, 4]`` tile so that the 4 lanes
of a Philox group sit in the last dimension: when every row starts on a group boundary
("aligned") one ``tl.randn4x`` call per group makes the noise of 4 elements. Otherwise
(``D % 4 != 0`` with several rows, or ``N % 4 != 0`` with several samples) each element
computes its own group and picks its lane, which is 4x the Philox work but the same
stream.

Reductions follow docs/design.md section 9 (the Triton row of its table): the tiles
above, the row pass ``_rowsum_kernel`` over the ``[B, NC]`` partials and the total
``_total_kernel``.

Offsets are int64 throughout; the seed is loaded from a device tensor (never read on
the host). Math is float32 (float64 for float64 inputs); the noise is float32.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import protocol as P

# KL modes of the op protocol, as compile-time constants of the kernels.
KL_SKIP: tl.constexpr = tl.constexpr(P.KL_SKIP)
KL_ELEMENTWISE: tl.constexpr = tl.constexpr(P.KL_ELEMENTWISE)
KL_PER_SAMPLE: tl.constexpr = tl.constexpr(P.KL_PER_SAMPLE)
KL_SUM: tl.constexpr = tl.constexpr(P.KL_SUM)

try:  # where TRITON_INTERPRET=1 was set before this import, kernels are InterpretedFunction
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except ImportError:  # pragma: no cover - very old triton
    _InterpretedFunction = ()


# --------------------------------------------------------------------------- kernels


@triton.jit
def _tile_index(pid, R, C, NC, ROWS: tl.constexpr, CH4: tl.constexpr, FLAT: tl.constexpr):
    """Offsets of a tile: j0 [ROWS, CH4, 1] (lane 0 of each group of 4), j = j0 + lane
    [ROWS, CH4, 4], the mask of j, and the rows [ROWS, 1, 1] (int64 throughout)."""
    rb = pid // NC
    cb = pid % NC
    r = tl.arange(0, ROWS)[:, None, None]
    c4 = tl.arange(0, CH4)[None, :, None]
    lane = tl.arange(0, 4)[None, None, :]
    row = rb * ROWS + r
    col0 = cb * (CH4 * 4) + c4 * 4
    if FLAT:  # R == 1 (ROWS == 1): no row term
        j0 = col0
        j = j0 + lane
        mask = j < C
    else:
        j0 = row * C + col0
        j = j0 + lane
        mask = (row < R) & (col0 + lane < C)
    return row, j0, j, mask


@triton.jit
def _normal(seed, j0, j, off, ALIGNED: tl.constexpr):
    """Stream element off + j (float32): group (off + j) // 4, lane (off + j) % 4."""
    if ALIGNED:  # off + j0 is a multiple of 4: one Philox call per group of 4 lanes
        n0, n1, n2, n3 = tl.randn4x(seed, (off + j0) // 4)  # [ROWS, CH4, 1]
        lane = tl.arange(0, 4)[None, None, :]
    else:  # groups straddle rows or samples: every element finds its own group and lane
        i = off + j
        n0, n1, n2, n3 = tl.randn4x(seed, i // 4)
        lane = i % 4
    return tl.where(lane == 0, n0, tl.where(lane == 1, n1, tl.where(lane == 2, n2, n3)))


@triton.jit
def _to_acc(x, IS_F64: tl.constexpr):
    if IS_F64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def _bound(x, IS_F64: tl.constexpr):
    if IS_F64:
        return tl.full((), x, tl.float64)
    else:
        return tl.full((), x, tl.float32)


@triton.jit
def _clamp(v, lo, hi, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, IS_F64: tl.constexpr):
    # NaN stays NaN (comparisons with NaN are false), as torch.clamp.
    if HAS_LO:
        lo_v = _bound(lo, IS_F64)
        v = tl.where(v < lo_v, lo_v, v)
    if HAS_HI:
        hi_v = _bound(hi, IS_F64)
        v = tl.where(v > hi_v, hi_v, v)
    return v


@triton.jit
def _fwd_kernel(
    mu_ptr, lv_ptr, z_ptr, kl_ptr, part_ptr, seed_ptr,
    R, C, N, SN, NC, lo: "fp64", hi: "fp64",
    ROWS: tl.constexpr, CH4: tl.constexpr, FLAT: tl.constexpr, ALIGNED: tl.constexpr,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
    KL_IS_ELEMENTWISE: tl.constexpr, KL_RED: tl.constexpr, KL_FINAL: tl.constexpr, IS_F64: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    seed = tl.load(seed_ptr)  # first, so its latency overlaps the loads and the KL reduction
    row, j0, j, mask = _tile_index(pid, R, C, NC, ROWS, CH4, FLAT)
    m = _to_acc(tl.load(mu_ptr + j, mask=mask, other=0.0), IS_F64)
    v = _to_acc(tl.load(lv_ptr + j, mask=mask, other=0.0), IS_F64)
    v = _clamp(v, lo, hi, HAS_LO, HAS_HI, IS_F64)
    sd = tl.exp(0.5 * v)
    if KL_IS_ELEMENTWISE:
        kl = 0.5 * (m * m + sd * sd - v - 1.0)
        tl.store(kl_ptr + j, kl.to(kl_ptr.dtype.element_ty), mask=mask)
    if KL_RED:
        kl = 0.5 * (m * m + sd * sd - v - 1.0)
        kl = tl.where(mask, kl, 0.0)
        row_sum = tl.sum(tl.sum(kl, axis=2), axis=1)  # [ROWS], fixed order
        rows = (pid // NC) * ROWS + tl.arange(0, ROWS)
        if KL_FINAL:  # per_sample with whole rows per tile: the row sums are the output
            tl.store(kl_ptr + rows, row_sum, mask=rows < R)
        else:  # partials [R, NC] (the row sums when NC == 1)
            tl.store(part_ptr + rows * NC + pid % NC, row_sum, mask=rows < R)
    off = tl.zeros((), tl.int64)  # s * N, the flat offset of sample s
    while off < SN:  # (a while loop: triton 3.6's interpreter cannot range() over an argument)
        eps = _to_acc(_normal(seed, j0, j, off, ALIGNED), IS_F64)
        tl.store(z_ptr + off + j, (m + sd * eps).to(z_ptr.dtype.element_ty), mask=mask)
        off += N


@triton.jit
def _bwd_kernel(
    gz_ptr, gkl_ptr, mu_ptr, lv_ptr, gmu_ptr, glv_ptr, seed_ptr,
    R, C, N, SN, NC, lo: "fp64", hi: "fp64", div: "fp64",
    ROWS: tl.constexpr, CH4: tl.constexpr, FLAT: tl.constexpr, ALIGNED: tl.constexpr,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
    HAS_GZ: tl.constexpr,
    GKL_MODE: tl.constexpr,  # the KL mode of grad_kl, KL_SKIP when there is none
    IS_F64: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    row, j0, j, mask = _tile_index(pid, R, C, NC, ROWS, CH4, FLAT)
    m = _to_acc(tl.load(mu_ptr + j, mask=mask, other=0.0), IS_F64)
    raw = _to_acc(tl.load(lv_ptr + j, mask=mask, other=0.0), IS_F64)
    v = _clamp(raw, lo, hi, HAS_LO, HAS_HI, IS_F64)
    sd = tl.exp(0.5 * v)
    if GKL_MODE == KL_ELEMENTWISE:
        gkl = _to_acc(tl.load(gkl_ptr + j, mask=mask, other=0.0), IS_F64)
    elif GKL_MODE == KL_PER_SAMPLE:
        if FLAT:
            gkl = _to_acc(tl.load(gkl_ptr), IS_F64)
        else:
            gkl = _to_acc(tl.load(gkl_ptr + row, mask=row < R, other=0.0), IS_F64)
    elif GKL_MODE >= KL_SUM:  # sum and batchmean: one scalar (divided by B for batchmean)
        gkl = _to_acc(tl.load(gkl_ptr), IS_F64) / _bound(div, IS_F64)
    if HAS_GZ:
        seed = tl.load(seed_ptr)
        gz_sum = tl.zeros_like(m)
        gz_eps = tl.zeros_like(m)
        off = tl.zeros((), tl.int64)
        while off < SN:  # (a while loop: triton 3.6's interpreter cannot range() over an argument)
            g = _to_acc(tl.load(gz_ptr + off + j, mask=mask, other=0.0), IS_F64)
            gz_sum += g
            gz_eps += g * _to_acc(_normal(seed, j0, j, off, ALIGNED), IS_F64)
            off += N
        gmu = gz_sum
        glv = 0.5 * sd * gz_eps
        if GKL_MODE != KL_SKIP:
            gmu = gmu + gkl * m
            glv = glv + gkl * 0.5 * (sd * sd - 1.0)
    else:
        gmu = gkl * m
        glv = gkl * 0.5 * (sd * sd - 1.0)
    if HAS_LO:  # zero gradient outside [lo, hi] (torch.clamp's inclusive rule; NaN -> 0)
        glv = tl.where(raw >= _bound(lo, IS_F64), glv, 0.0)
    if HAS_HI:
        glv = tl.where(raw <= _bound(hi, IS_F64), glv, 0.0)
    tl.store(gmu_ptr + j, gmu.to(gmu_ptr.dtype.element_ty), mask=mask)
    tl.store(glv_ptr + j, glv.to(glv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_sums(part_ptr, rows, R, NC, RB: tl.constexpr, CB: tl.constexpr, IS_F64: tl.constexpr):
    """[RB] sums of the rows' chunks part[r, :]: lane c adds chunks c, c + CB, ... in
    order, then a fixed tree over the CB lanes (deterministic)."""
    rmask = rows < R
    if IS_F64:
        acc = tl.zeros([RB, CB], dtype=tl.float64)
    else:
        acc = tl.zeros([RB, CB], dtype=tl.float32)
    c0 = tl.zeros((), tl.int64)
    while c0 < NC:
        cols = c0 + tl.arange(0, CB)
        ptrs = part_ptr + rows[:, None] * NC + cols[None, :]
        acc += tl.load(ptrs, mask=rmask[:, None] & (cols[None, :] < NC), other=0.0)
        c0 += CB
    return tl.sum(acc, axis=1)


@triton.jit
def _rowsum_kernel(part_ptr, out_ptr, R, NC, RB: tl.constexpr, CB: tl.constexpr, IS_F64: tl.constexpr):
    """Row pass of per_sample: out[r] = sum_c part[r, c]."""
    rows = tl.program_id(0).to(tl.int64) * RB + tl.arange(0, RB)
    row_sum = _row_sums(part_ptr, rows, R, NC, RB, CB, IS_F64)
    tl.store(out_ptr + rows, row_sum, mask=rows < R)


@triton.jit
def _total_kernel(
    part_ptr, out_ptr, R, NC, div: "fp64", RB: tl.constexpr, CB: tl.constexpr, IS_F64: tl.constexpr
):
    """sum / batchmean, one program: the R row sums (of part[r, :]) added in float64 in a
    fixed order, divided by div."""
    total = tl.zeros([RB], dtype=tl.float64)
    r0 = tl.zeros((), tl.int64)
    while r0 < R:
        rows = r0 + tl.arange(0, RB)
        total += _row_sums(part_ptr, rows, R, NC, RB, CB, IS_F64).to(tl.float64)
        r0 += RB
    tl.store(out_ptr, (tl.sum(total, axis=0) / div).to(out_ptr.dtype.element_ty))


INTERPRETED = isinstance(_fwd_kernel, _InterpretedFunction) if _InterpretedFunction else False


# --------------------------------------------------------------------------- planning


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class Plan:
    """Tiling of an [R, C] problem: ROWS rows x 4*CH4 columns per program."""

    rows: int  # R
    cols: int  # C
    ROWS: int
    CH4: int
    NC: int  # chunks per row
    grid: int
    num_warps: int


def _tile_elems(n: int) -> int:
    """Elements per program: one program for tiny problems (launch latency dominates),
    else enough programs to fill the GPU, with tiles of at most 2048 elements."""
    if n <= 4096:
        return max(16, _next_pow2(n))
    if n < (1 << 17):
        return 512
    if n < (1 << 19):
        return 1024
    return 2048


def plan(rows: int, cols: int) -> Plan:
    """Block sizes and warps for an [rows, cols] problem (rows, cols >= 1)."""
    return _plan(rows, cols, _tile_elems(rows * cols))


@functools.lru_cache(maxsize=1024)
def _plan(rows: int, cols: int, tile: int) -> Plan:
    ch = max(4, min(_next_pow2(cols), tile))
    nrows = max(1, min(_next_pow2(rows), tile // ch))
    nc = math.ceil(cols / ch)
    grid = math.ceil(rows / nrows) * nc
    elems = nrows * ch
    # 8 elements (2 Philox groups) per thread: ~60 (forward) to ~80 (backward) registers
    # on sm_90 without spills, so several programs share an SM and keep loads in flight.
    num_warps = max(1, min(16, elems // 256))
    return Plan(rows, cols, nrows, ch // 4, nc, grid, num_warps)


# --------------------------------------------------------------------------- launchers


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "fused_vae triton backend: CPU tensors need the Triton interpreter, but the kernels "
            "were compiled without it; set TRITON_INTERPRET=1 before the first call"
        )
    if t.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"fused_vae triton backend: unsupported device {t.device}")


def _device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    if t.is_cuda and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _bounds(clamp_lo, clamp_hi):
    return (
        0.0 if clamp_lo is None else float(clamp_lo),
        0.0 if clamp_hi is None else float(clamp_hi),
        clamp_lo is not None,
        clamp_hi is not None,
    )


def _aligned(p: Plan, num_samples: int, n: int) -> bool:
    """Whether every tile row starts on a Philox group boundary in every sample."""
    return (p.rows == 1 or p.cols % 4 == 0) and (num_samples <= 1 or n % 4 == 0)


def reparam_kl_fwd(mu, logvar, seed, num_samples, kl_mode, clamp_lo, clamp_hi):
    """Implementation of ``fused_vae::triton_reparam_kl_fwd`` (see fused_vae/backends/protocol.py)."""
    P.check_fwd_args(mu, logvar, seed, num_samples, kl_mode)
    _check_device(mu)
    B = mu.shape[0]
    N = mu.numel()
    acc = P.acc_dtype(mu.dtype)
    z, kl = P.alloc_outputs(mu, num_samples, kl_mode)
    reduced = P.is_reduced(kl_mode)
    if N == 0:
        if reduced:
            kl.fill_(P.empty_kl_value(kl_mode, B))
        return z, kl
    if num_samples == 0 and kl_mode == P.KL_SKIP:
        return z, kl
    mu_c = mu.contiguous()
    lv_c = logvar.contiguous()
    p = plan(B, N // B) if reduced else plan(1, N)
    # per_sample with whole rows per tile writes kl itself; else partials [B, NC]
    final = kl_mode == P.KL_PER_SAMPLE and p.NC == 1
    part = mu_c.new_empty((p.rows, p.NC), dtype=acc) if reduced and not final else kl
    seed_t = seed.reshape(())
    with _device_guard(mu):
        _launch_fwd(p, mu_c, lv_c, z, kl, part, seed_t, N, num_samples, kl_mode, clamp_lo, clamp_hi, final, acc)
    return z, kl


def _launch_fwd(p, mu_c, lv_c, z, kl, part, seed_t, N, num_samples, kl_mode, clamp_lo, clamp_hi, final, acc):
    lo, hi, has_lo, has_hi = _bounds(clamp_lo, clamp_hi)
    reduced = P.is_reduced(kl_mode)
    is_f64 = acc == torch.float64
    _fwd_kernel[(p.grid,)](
        mu_c, lv_c, z if num_samples > 0 else mu_c, kl if kl.numel() > 0 else mu_c, part if part.numel() else mu_c,
        seed_t, p.rows, p.cols, N, num_samples * N, p.NC, lo, hi,
        ROWS=p.ROWS, CH4=p.CH4, FLAT=p.rows == 1, ALIGNED=_aligned(p, num_samples, N),
        HAS_LO=has_lo, HAS_HI=has_hi, KL_IS_ELEMENTWISE=kl_mode == P.KL_ELEMENTWISE, KL_RED=reduced,
        KL_FINAL=final, IS_F64=is_f64, num_warps=p.num_warps,
    )  # fmt: skip
    if not reduced or final:
        return
    cb = min(_next_pow2(p.NC), 256)
    rb = max(1, min(_next_pow2(p.rows), 4096 // cb))
    if kl_mode == P.KL_PER_SAMPLE:
        _rowsum_kernel[(math.ceil(p.rows / rb),)](
            part, kl, p.rows, p.NC, RB=rb, CB=cb, IS_F64=is_f64, num_warps=max(1, min(8, rb * cb // 512))
        )
    else:
        _total_kernel[(1,)](
            part, kl, p.rows, p.NC, P.kl_divisor(kl_mode, p.rows), RB=rb, CB=cb, IS_F64=is_f64,
            num_warps=max(1, min(8, rb * cb // 512)),
        )  # fmt: skip


def reparam_kl_bwd(grad_z, grad_kl, mu, logvar, seed, num_samples, kl_mode, clamp_lo, clamp_hi):
    """Implementation of ``fused_vae::triton_reparam_kl_bwd`` (see fused_vae/backends/protocol.py)."""
    P.check_bwd_args(grad_z, grad_kl, mu, logvar, seed, num_samples, kl_mode)
    _check_device(mu)
    B = mu.shape[0]
    N = mu.numel()
    acc = P.acc_dtype(mu.dtype)
    grad_mu, grad_lv = P.alloc_grads(mu)
    if N == 0:
        return grad_mu, grad_lv
    if grad_z is None and grad_kl is None:
        return grad_mu.zero_(), grad_lv.zero_()
    mu_c = mu.contiguous()
    lv_c = logvar.contiguous()
    gz = grad_z.contiguous() if grad_z is not None else mu_c
    gkl_mode = kl_mode if grad_kl is not None else P.KL_SKIP
    gkl = grad_kl.contiguous() if grad_kl is not None else mu_c
    p = plan(B, N // B) if gkl_mode == P.KL_PER_SAMPLE else plan(1, N)
    div = P.kl_divisor(kl_mode, B)
    lo, hi, has_lo, has_hi = _bounds(clamp_lo, clamp_hi)
    samples = num_samples if grad_z is not None else 0
    with _device_guard(mu):
        _bwd_kernel[(p.grid,)](
            gz, gkl, mu_c, lv_c, grad_mu, grad_lv, seed.reshape(()),
            p.rows, p.cols, N, samples * N, p.NC, lo, hi, div,
            ROWS=p.ROWS, CH4=p.CH4, FLAT=p.rows == 1, ALIGNED=_aligned(p, samples, N),
            HAS_LO=has_lo, HAS_HI=has_hi, HAS_GZ=grad_z is not None, GKL_MODE=gkl_mode,
            IS_F64=acc == torch.float64, num_warps=p.num_warps,
        )  # fmt: skip
    return grad_mu, grad_lv

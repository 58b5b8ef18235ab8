"""Triton kernels of the ``triton`` backend and their host-side launchers.

Imported lazily (on the first call of a ``fused_vae::triton_*`` op), so that
``import fused_vae`` works without triton and ``TRITON_INTERPRET=1`` can be set any time
before the first call: triton reads it when the kernels below are decorated. Every op
family of fused_vae/backends/protocol.py has a launcher pair here, named as its ops
without the prefix (``reparam_kl_fwd``, ``reparam_kl_bwd``, ``gaussian_log_prob_fwd``,
``gaussian_log_prob_bwd``); csrc/include/fused_vae/elementwise.h has the math.

Layout. The inputs (made contiguous) are viewed as ``[R, C]`` rows: ``[B, D]`` when a
row-wise quantity is reduced or read (a reduced KL or log density, the sample's log
density ``[S, B]``, a per-sample output gradient, the log density's gradient), else one
flat row ``[1, N]``. A program owns ``ROWS`` whole rows, or one chunk of ``4 * CH4``
columns of one row, held as a ``[ROWS, CH4, 4]`` tile so that the 4 lanes of a Philox
group sit in the last dimension: when every row starts on a group boundary ("aligned")
one ``tl.randn4x`` call per group makes the noise of 4 elements. Otherwise (``D % 4 != 0``
with several rows, or ``N % 4 != 0`` with several samples) each element computes its own
group and picks its lane, which is 4x the Philox work but the same stream. A program of
the sampling op loops over the samples, regenerating the noise (forward and backward).

Reductions follow docs/design.md section 9 (the Triton row of its table): the tiles
above write row sums (of the KL, of the log density, or of each sample's log q, whose
``S * B`` rows are sample-major), or ``[rows, NC]`` chunk partials that the row pass
``_rowsum_kernel`` sums; ``_total_kernel`` makes sum / batchmean.

The prior, the log density and its modes are compile-time flags: without them the
kernels are the plain ones. Offsets are int64 throughout; the seed is loaded from a
device tensor (never read on the host). Math is float32 (float64 for float64 inputs);
the noise is float32.
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

# Reduction modes of the op protocol, as compile-time constants of the kernels.
REDUCE_SKIP: tl.constexpr = tl.constexpr(P.REDUCE_SKIP)
REDUCE_ELEMENTWISE: tl.constexpr = tl.constexpr(P.REDUCE_ELEMENTWISE)
REDUCE_PER_SAMPLE: tl.constexpr = tl.constexpr(P.REDUCE_PER_SAMPLE)
REDUCE_SUM: tl.constexpr = tl.constexpr(P.REDUCE_SUM)
HALF_LOG_2PI: tl.constexpr = tl.constexpr(P.HALF_LOG_2PI)

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
def _load_acc(ptr, j, mask, IS_F64: tl.constexpr):
    return _to_acc(tl.load(ptr + j, mask=mask, other=0.0), IS_F64)


@triton.jit
def _clamp_grad(g, raw, lo, hi, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, IS_F64: tl.constexpr):
    """Zero gradient where the raw value lies outside [lo, hi] (torch.clamp's inclusive
    rule; NaN -> 0)."""
    if HAS_LO:
        g = tl.where(raw >= _bound(lo, IS_F64), g, 0.0)
    if HAS_HI:
        g = tl.where(raw <= _bound(hi, IS_F64), g, 0.0)
    return g


@triton.jit
def _row_value(ptr, row, R, FLAT: tl.constexpr, IS_F64: tl.constexpr):
    """ptr[row] of a per-row tensor, broadcast over the tile ([ROWS, 1, 1], a scalar when
    FLAT)."""
    if FLAT:
        v = _to_acc(tl.load(ptr), IS_F64)
    else:
        v = _to_acc(tl.load(ptr + row, mask=row < R, other=0.0), IS_F64)
    return v


@triton.jit
def _reduced_grad(g_ptr, j, mask, row, R, div, MODE: tl.constexpr, FLAT: tl.constexpr, IS_F64: tl.constexpr):
    """The gradient of a reduced output (mode MODE, not skip) at each tile element: per
    element, per row, or one scalar (divided by div, B for batchmean)."""
    if MODE == REDUCE_ELEMENTWISE:
        g = _load_acc(g_ptr, j, mask, IS_F64)
    elif MODE == REDUCE_PER_SAMPLE:
        g = _row_value(g_ptr, row, R, FLAT, IS_F64)
    else:  # sum and batchmean
        g = _to_acc(tl.load(g_ptr), IS_F64) / _bound(div, IS_F64)
    return g


@triton.jit
def _tile_row_sums(x, mask, pid, R, NC, out_ptr, part_ptr, ROWS: tl.constexpr, FINAL: tl.constexpr):
    """Sums each row of a tile's values (fixed order): out[row] when rows are whole
    (FINAL), else the chunk partial part[row, chunk] of [R, NC]."""
    x = tl.where(mask, x, 0.0)
    row_sum = tl.sum(tl.sum(x, axis=2), axis=1)  # [ROWS], fixed order
    rows = (pid // NC) * ROWS + tl.arange(0, ROWS)
    if FINAL:
        tl.store(out_ptr + rows, row_sum, mask=rows < R)
    else:
        tl.store(part_ptr + rows * NC + pid % NC, row_sum, mask=rows < R)


@triton.jit
def _kl_term(m, v, sd, pm, pv, ipv, PRIOR: tl.constexpr):
    """The KL element to N(0, I), or with PRIOR to N(pm, exp(pv)) (ipv = exp(-pv))."""
    if PRIOR:
        d = m - pm
        kl = 0.5 * (pv - v + (sd * sd + d * d) * ipv - 1.0)
    else:
        kl = 0.5 * (m * m + sd * sd - v - 1.0)
    return kl


@triton.jit
def _kl_grads(gkl, m, sd, pm, ipv, PRIOR: tl.constexpr):
    """gkl times the KL element's gradients with respect to (mu, lv, pm, pl)
    (kl_prior_grads of elementwise.h; without PRIOR the last two are unused stand-ins)."""
    if PRIOR:
        d = m - pm
        g_mu = gkl * d * ipv
        g_lv = gkl * 0.5 * (sd * sd * ipv - 1.0)
        g_pm = -g_mu
        g_pl = gkl * 0.5 * (1.0 - (sd * sd + d * d) * ipv)
    else:
        g_mu = gkl * m
        g_lv = gkl * 0.5 * (sd * sd - 1.0)
        g_pm = g_mu
        g_pl = g_lv
    return g_mu, g_lv, g_pm, g_pl


@triton.jit
def _logq_term(eps, v, zz, pm, pv, ipv, PRIOR: tl.constexpr, RATIO: tl.constexpr, IS_F64: tl.constexpr):
    """One element of log q(z|x), or with RATIO of log q(z|x) - log p(z), for the sample
    zz = m + sd * eps (unrounded)."""
    log_q = -0.5 * eps * eps - 0.5 * v
    if RATIO:
        if PRIOR:
            zp = zz - pm
            out = log_q + 0.5 * (zp * zp * ipv + pv)
        else:
            out = log_q + 0.5 * (zz * zz)
    else:
        out = log_q - _bound(HALF_LOG_2PI, IS_F64)
    return out


@triton.jit
def _add_logq_grads(
    a_mu, a_lv, a_pm, a_pl, gw, eps, sd, isd, zz, pm, ipv,
    PRIOR: tl.constexpr, RATIO: tl.constexpr, PATH: tl.constexpr,
):  # fmt: skip
    """Adds gw times one sample's log-density gradients to the accumulators of (mu, lv, pm,
    pl) (add_logq_grads of elementwise.h): the total derivative through zz = m + sd * eps,
    or with PATH the path derivative (isd = 1 / sd, read only then); a_pm, a_pl change only
    with PRIOR and RATIO."""
    if PATH:
        c_mu = -eps * isd  # (no division in the sample loop)
        c_lv = -0.5 * eps * eps
    if RATIO:
        if PRIOR:
            zp = zz - pm
            r = zp * ipv
            a_pm += gw * -r
            a_pl += gw * 0.5 * (1.0 - zp * r)
        else:
            r = zz
        if PATH:
            c_mu += r
            c_lv += 0.5 * sd * eps * r
        else:
            c_mu = r
            c_lv = -0.5 + 0.5 * sd * eps * r
        a_mu += gw * c_mu
        a_lv += gw * c_lv
    elif PATH:
        a_mu += gw * c_mu
        a_lv += gw * c_lv
    else:  # log q with eps fixed: -0.5 lv, nothing in mu
        a_lv += gw * -0.5
    return a_mu, a_lv, a_pm, a_pl


@triton.jit
def _fwd_kernel(
    mu_ptr, lv_ptr, pm_ptr, pl_ptr, z_ptr, kl_ptr, part_ptr, lq_ptr, lq_part_ptr, seed_ptr,
    R, C, N, SN, NC, lo: "fp64", hi: "fp64",
    ROWS: tl.constexpr, CH4: tl.constexpr, FLAT: tl.constexpr, ALIGNED: tl.constexpr,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
    KL_IS_ELEMENTWISE: tl.constexpr, KL_RED: tl.constexpr, KL_FINAL: tl.constexpr,
    PRIOR: tl.constexpr,  # prior_mu / prior_logvar are read (the KL or log q - log p needs them)
    LOGQ: tl.constexpr, RATIO: tl.constexpr, LQ_FINAL: tl.constexpr,  # the [S, B] log density
    IS_F64: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    seed = tl.load(seed_ptr)  # first, so its latency overlaps the loads and the KL reduction
    row, j0, j, mask = _tile_index(pid, R, C, NC, ROWS, CH4, FLAT)
    m = _load_acc(mu_ptr, j, mask, IS_F64)
    v = _clamp(_load_acc(lv_ptr, j, mask, IS_F64), lo, hi, HAS_LO, HAS_HI, IS_F64)
    sd = tl.exp(0.5 * v)
    pm = m  # (stand-ins without a prior: the terms do not read them)
    pv = v
    ipv = sd
    if PRIOR:
        pm = _load_acc(pm_ptr, j, mask, IS_F64)
        pv = _clamp(_load_acc(pl_ptr, j, mask, IS_F64), lo, hi, HAS_LO, HAS_HI, IS_F64)
        ipv = tl.exp(-pv)
    if KL_IS_ELEMENTWISE:
        kl = _kl_term(m, v, sd, pm, pv, ipv, PRIOR)
        tl.store(kl_ptr + j, kl.to(kl_ptr.dtype.element_ty), mask=mask)
    if KL_RED:
        kl = _kl_term(m, v, sd, pm, pv, ipv, PRIOR)
        _tile_row_sums(kl, mask, pid, R, NC, kl_ptr, part_ptr, ROWS, KL_FINAL)
    off = tl.zeros((), tl.int64)  # s * N, the flat offset of sample s
    srow = tl.zeros((), tl.int64)  # s * R, the first log-density row of sample s
    while off < SN:  # (a while loop: triton 3.6's interpreter cannot range() over an argument)
        eps = _to_acc(_normal(seed, j0, j, off, ALIGNED), IS_F64)
        zz = m + sd * eps
        tl.store(z_ptr + off + j, zz.to(z_ptr.dtype.element_ty), mask=mask)
        if LOGQ:
            lq = _logq_term(eps, v, zz, pm, pv, ipv, PRIOR, RATIO, IS_F64)
            _tile_row_sums(lq, mask, pid, R, NC, lq_ptr + srow, lq_part_ptr + srow * NC, ROWS, LQ_FINAL)
            srow += R
        off += N


@triton.jit
def _bwd_kernel(
    gz_ptr, gkl_ptr, gw_ptr, mu_ptr, lv_ptr, pm_ptr, pl_ptr, gmu_ptr, glv_ptr, gpm_ptr, gpl_ptr, seed_ptr,
    R, C, N, SN, NC, lo: "fp64", hi: "fp64", div: "fp64",
    ROWS: tl.constexpr, CH4: tl.constexpr, FLAT: tl.constexpr, ALIGNED: tl.constexpr,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
    HAS_GZ: tl.constexpr,
    GKL_MODE: tl.constexpr,  # the KL mode of grad_kl, REDUCE_SKIP when there is none
    PRIOR: tl.constexpr,  # the prior is read and its gradients written
    HAS_GW: tl.constexpr, RATIO: tl.constexpr, PATH: tl.constexpr,  # grad_logq [S, B] and its mode
    IS_F64: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    row, j0, j, mask = _tile_index(pid, R, C, NC, ROWS, CH4, FLAT)
    m = _load_acc(mu_ptr, j, mask, IS_F64)
    raw = _load_acc(lv_ptr, j, mask, IS_F64)
    v = _clamp(raw, lo, hi, HAS_LO, HAS_HI, IS_F64)
    sd = tl.exp(0.5 * v)
    if GKL_MODE != REDUCE_SKIP:
        gkl = _reduced_grad(gkl_ptr, j, mask, row, R, div, GKL_MODE, FLAT, IS_F64)
    pm = m  # (stand-ins without a prior)
    ipv = sd
    if PRIOR:
        pm = _load_acc(pm_ptr, j, mask, IS_F64)
        raw_pl = _load_acc(pl_ptr, j, mask, IS_F64)
        ipv = tl.exp(-_clamp(raw_pl, lo, hi, HAS_LO, HAS_HI, IS_F64))
    if HAS_GZ or HAS_GW:
        seed = tl.load(seed_ptr)
        gz_sum = tl.zeros_like(m)
        gz_eps = tl.zeros_like(m)
        if HAS_GW:  # the log density's gradient sums, and the first row of sample s
            lq_mu = tl.zeros_like(m)
            lq_lv = tl.zeros_like(m)
            lq_pm = tl.zeros_like(m)
            lq_pl = tl.zeros_like(m)
            srow = tl.zeros((), tl.int64)
            isd = sd
            if PATH:
                isd = tl.exp(-0.5 * v)
        off = tl.zeros((), tl.int64)
        while off < SN:  # (a while loop: triton 3.6's interpreter cannot range() over an argument)
            eps = _to_acc(_normal(seed, j0, j, off, ALIGNED), IS_F64)
            if HAS_GZ:
                g = _load_acc(gz_ptr + off, j, mask, IS_F64)
                gz_sum += g
                gz_eps += g * eps
            if HAS_GW:
                gw = _row_value(gw_ptr + srow, row, R, FLAT, IS_F64)
                lq_mu, lq_lv, lq_pm, lq_pl = _add_logq_grads(
                    lq_mu, lq_lv, lq_pm, lq_pl, gw, eps, sd, isd, m + sd * eps, pm, ipv, PRIOR, RATIO, PATH
                )
                srow += R
            off += N
    if HAS_GZ:
        gmu = gz_sum
        glv = 0.5 * sd * gz_eps
        if GKL_MODE != REDUCE_SKIP:
            k_mu, k_lv, k_pm, k_pl = _kl_grads(gkl, m, sd, pm, ipv, PRIOR)
            gmu = gmu + k_mu
            glv = glv + k_lv
    elif GKL_MODE != REDUCE_SKIP:
        gmu, glv, k_pm, k_pl = _kl_grads(gkl, m, sd, pm, ipv, PRIOR)
    else:
        gmu = tl.zeros_like(m)
        glv = tl.zeros_like(m)
    if HAS_GW:
        gmu = gmu + lq_mu
        glv = glv + lq_lv
    tl.store(gmu_ptr + j, gmu.to(gmu_ptr.dtype.element_ty), mask=mask)
    glv = _clamp_grad(glv, raw, lo, hi, HAS_LO, HAS_HI, IS_F64)
    tl.store(glv_ptr + j, glv.to(glv_ptr.dtype.element_ty), mask=mask)
    if PRIOR:
        if GKL_MODE != REDUCE_SKIP:
            gpm = k_pm
            gpl = k_pl
            if HAS_GW and RATIO:
                gpm = gpm + lq_pm
                gpl = gpl + lq_pl
        elif HAS_GW and RATIO:
            gpm = lq_pm
            gpl = lq_pl
        else:  # (the launcher reads no prior then)
            gpm = tl.zeros_like(m)
            gpl = tl.zeros_like(m)
        tl.store(gpm_ptr + j, gpm.to(gpm_ptr.dtype.element_ty), mask=mask)
        gpl = _clamp_grad(gpl, raw_pl, lo, hi, HAS_LO, HAS_HI, IS_F64)
        tl.store(gpl_ptr + j, gpl.to(gpl_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _log_prob_fwd_kernel(
    x_ptr, mu_ptr, lv_ptr, out_ptr, part_ptr, R, C, NC, lo: "fp64", hi: "fp64",
    ROWS: tl.constexpr, CH4: tl.constexpr, FLAT: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
    ELEMENTWISE: tl.constexpr, FINAL: tl.constexpr, IS_F64: tl.constexpr,
):  # fmt: skip
    """log N(x; mu, exp(lv)) per element (log_prob_term of elementwise.h): stored, or its
    tile row sums."""
    pid = tl.program_id(0).to(tl.int64)
    row, j0, j, mask = _tile_index(pid, R, C, NC, ROWS, CH4, FLAT)
    d = _load_acc(x_ptr, j, mask, IS_F64) - _load_acc(mu_ptr, j, mask, IS_F64)
    v = _clamp(_load_acc(lv_ptr, j, mask, IS_F64), lo, hi, HAS_LO, HAS_HI, IS_F64)
    lp = -0.5 * d * d * tl.exp(-v) - 0.5 * v - _bound(HALF_LOG_2PI, IS_F64)
    if ELEMENTWISE:
        tl.store(out_ptr + j, lp.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        _tile_row_sums(lp, mask, pid, R, NC, out_ptr, part_ptr, ROWS, FINAL)


@triton.jit
def _log_prob_bwd_kernel(
    g_ptr, x_ptr, mu_ptr, lv_ptr, gx_ptr, gmu_ptr, glv_ptr, R, C, NC, lo: "fp64", hi: "fp64", div: "fp64",
    ROWS: tl.constexpr, CH4: tl.constexpr, FLAT: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
    MODE: tl.constexpr, IS_F64: tl.constexpr,
):  # fmt: skip
    """(g_x, g_mu, g_lv) = g * (-r, r, 0.5 (d r - 1)), r = d exp(-lv), d = x - mu
    (log_prob_grads of elementwise.h), g_lv masked by the clamp."""
    pid = tl.program_id(0).to(tl.int64)
    row, j0, j, mask = _tile_index(pid, R, C, NC, ROWS, CH4, FLAT)
    g = _reduced_grad(g_ptr, j, mask, row, R, div, MODE, FLAT, IS_F64)
    d = _load_acc(x_ptr, j, mask, IS_F64) - _load_acc(mu_ptr, j, mask, IS_F64)
    raw = _load_acc(lv_ptr, j, mask, IS_F64)
    r = d * tl.exp(-_clamp(raw, lo, hi, HAS_LO, HAS_HI, IS_F64))
    tl.store(gx_ptr + j, (-g * r).to(gx_ptr.dtype.element_ty), mask=mask)
    tl.store(gmu_ptr + j, (g * r).to(gmu_ptr.dtype.element_ty), mask=mask)
    glv = _clamp_grad(g * 0.5 * (d * r - 1.0), raw, lo, hi, HAS_LO, HAS_HI, IS_F64)
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


def _num_warps(p: Plan, logq: bool) -> int:
    """The plan's warps, or with the log density (whose sample loop holds more per-element
    state: ~130 registers at 8 elements per thread in the backward on sm_90) twice as many,
    4 elements per thread, so that as many warps stay resident as in the plain kernels."""
    return max(1, min(16, p.ROWS * p.CH4 * 4 // 128)) if logq else p.num_warps


def _rowwise_plan(rowwise: bool, B: int, N: int) -> Plan:
    """The [B, D] tiling when rows matter, else the flat [1, N] one."""
    return plan(B, N // B) if rowwise else plan(1, N)


def _row_sum_target(out, mode: int, rows: int, p: Plan, acc):
    """(final, partials) of a reduced output of ``rows`` row sums (mode per_sample, sum or
    batchmean) under plan p: per_sample with whole rows per tile writes ``out`` itself
    (partials is ``out``); else the tiles write ``[rows, NC]`` partials (the row sums when
    NC == 1) for :func:`_finish_rows`."""
    final = mode == P.REDUCE_PER_SAMPLE and p.NC == 1
    return final, out if final else out.new_empty((rows, p.NC), dtype=acc)


def _finish_rows(part, out, mode: int, rows: int, nc: int, is_f64: bool) -> None:
    """The row pass (per_sample) or the total (sum / batchmean) of ``[rows, nc]`` partials."""
    cb = min(_next_pow2(nc), 256)
    rb = max(1, min(_next_pow2(rows), 4096 // cb))
    warps = max(1, min(8, rb * cb // 512))
    if mode == P.REDUCE_PER_SAMPLE:
        _rowsum_kernel[(math.ceil(rows / rb),)](part, out, rows, nc, RB=rb, CB=cb, IS_F64=is_f64, num_warps=warps)
    else:
        _total_kernel[(1,)](
            part, out, rows, nc, P.divisor(mode, rows), RB=rb, CB=cb, IS_F64=is_f64, num_warps=warps
        )  # fmt: skip


def _logq_flags(logq_mode: int) -> tuple[bool, bool]:
    """(ratio, path) of a log-density mode."""
    return logq_mode in (P.LOGQ_RATIO, P.LOGQ_RATIO_PATH), logq_mode in (P.LOGQ_DENSITY_PATH, P.LOGQ_RATIO_PATH)


def _checked(spec: P.OpSpec, inputs, params, grads=None) -> tuple[int, int]:
    """Runs the protocol's checks of a forward op (a backward op with ``grads``) and the
    device check; returns (B, N) of the first input."""
    if grads is None:
        spec.check_fwd_args(inputs, params)
    else:
        spec.check_bwd_args(grads, inputs, params)
    _check_device(inputs[0])
    return inputs[0].shape[0], inputs[0].numel()


def reparam_kl_fwd(mu, logvar, prior_mu, prior_logvar, seed, num_samples, kl_mode, logq_mode, clamp_lo, clamp_hi):
    """Implementation of ``fused_vae::triton_reparam_kl_fwd`` (see fused_vae/backends/protocol.py)."""
    inputs = (mu, logvar, prior_mu, prior_logvar)
    params = (seed, num_samples, kl_mode, logq_mode, clamp_lo, clamp_hi)
    B, N = _checked(P.REPARAM, inputs, params)
    z, kl, logq = P.REPARAM.alloc(inputs, params)
    reduced = P.is_reduced(kl_mode)
    if N == 0:
        if reduced:
            kl.fill_(P.empty_value(kl_mode, B))
        return z, kl, logq.zero_()  # log q of rows without elements: 0
    if num_samples == 0 and kl_mode == P.REDUCE_SKIP:
        return z, kl, logq
    acc = P.acc_dtype(mu.dtype)
    ratio, _ = _logq_flags(logq_mode)
    # the prior is read where the KL or log q - log p needs it
    prior = prior_mu is not None and (kl_mode != P.REDUCE_SKIP or (logq_mode != P.LOGQ_SKIP and ratio))
    # with logq the tiles follow the [B, D] rows in every sample: its rows are (s, b)
    p = _rowwise_plan(reduced or logq_mode != P.LOGQ_SKIP, B, N)
    final, part = _row_sum_target(kl, kl_mode, B, p, acc) if reduced else (False, kl)
    lq_final, lq_part = (False, logq)
    if logq_mode != P.LOGQ_SKIP:  # a per_sample reduction over the S * B rows
        lq_final, lq_part = _row_sum_target(logq, P.REDUCE_PER_SAMPLE, num_samples * B, p, acc)
    mu_c = mu.contiguous()
    pm, pl = (prior_mu.contiguous(), prior_logvar.contiguous()) if prior else (mu_c, mu_c)
    given = lambda t: t if t.numel() else mu_c  # noqa: E731 - a pointer for an unused output
    lo, hi, has_lo, has_hi = _bounds(clamp_lo, clamp_hi)
    is_f64 = acc == torch.float64
    with _device_guard(mu):
        _fwd_kernel[(p.grid,)](
            mu_c, logvar.contiguous(), pm, pl, given(z), given(kl), given(part), given(logq), given(lq_part),
            seed.reshape(()), p.rows, p.cols, N, num_samples * N, p.NC, lo, hi,
            ROWS=p.ROWS, CH4=p.CH4, FLAT=p.rows == 1, ALIGNED=_aligned(p, num_samples, N),
            HAS_LO=has_lo, HAS_HI=has_hi, KL_IS_ELEMENTWISE=kl_mode == P.REDUCE_ELEMENTWISE, KL_RED=reduced,
            KL_FINAL=final, PRIOR=prior, LOGQ=logq_mode != P.LOGQ_SKIP, RATIO=ratio, LQ_FINAL=lq_final,
            IS_F64=is_f64, num_warps=_num_warps(p, logq_mode != P.LOGQ_SKIP),
        )  # fmt: skip
        if reduced and not final:
            _finish_rows(part, kl, kl_mode, B, p.NC, is_f64)
        if logq_mode and not lq_final:
            _finish_rows(lq_part, logq, P.REDUCE_PER_SAMPLE, num_samples * B, p.NC, is_f64)
    return z, kl, logq


def reparam_kl_bwd(
    grad_z, grad_kl, grad_logq, mu, logvar, prior_mu, prior_logvar, seed, num_samples, kl_mode, logq_mode,
    clamp_lo, clamp_hi,
):  # fmt: skip
    """Implementation of ``fused_vae::triton_reparam_kl_bwd`` (see fused_vae/backends/protocol.py)."""
    grads = (grad_z, grad_kl, grad_logq)
    inputs = (mu, logvar, prior_mu, prior_logvar)
    params = (seed, num_samples, kl_mode, logq_mode, clamp_lo, clamp_hi)
    B, N = _checked(P.REPARAM, inputs, params, grads)
    grad_mu, grad_lv, grad_pm, grad_pl = out = P.REPARAM.alloc_grads(inputs)
    if N == 0:
        return out
    ratio, path = _logq_flags(logq_mode)
    prior = prior_mu is not None and (grad_kl is not None or (grad_logq is not None and ratio))
    if prior_mu is not None and not prior:  # no given output depends on the prior
        grad_pm.zero_()
        grad_pl.zero_()
    if grad_z is None and grad_kl is None and grad_logq is None:
        return grad_mu.zero_(), grad_lv.zero_(), grad_pm, grad_pl
    mu_c = mu.contiguous()
    gkl_mode = kl_mode if grad_kl is not None else P.REDUCE_SKIP
    p = _rowwise_plan(gkl_mode == P.REDUCE_PER_SAMPLE or grad_logq is not None, B, N)
    lo, hi, has_lo, has_hi = _bounds(clamp_lo, clamp_hi)
    samples = num_samples if grad_z is not None or grad_logq is not None else 0
    given = lambda t: mu_c if t is None else t.contiguous()  # noqa: E731 - a pointer for an absent input
    pm, pl, gpm, gpl = (prior_mu, prior_logvar, grad_pm, grad_pl) if prior else (None, None, grad_mu, grad_lv)
    with _device_guard(mu):
        _bwd_kernel[(p.grid,)](
            given(grad_z), given(grad_kl), given(grad_logq), mu_c, logvar.contiguous(), given(pm), given(pl),
            grad_mu, grad_lv, gpm, gpl, seed.reshape(()),
            p.rows, p.cols, N, samples * N, p.NC, lo, hi, P.divisor(kl_mode, B),
            ROWS=p.ROWS, CH4=p.CH4, FLAT=p.rows == 1, ALIGNED=_aligned(p, samples, N),
            HAS_LO=has_lo, HAS_HI=has_hi, HAS_GZ=grad_z is not None, GKL_MODE=gkl_mode, PRIOR=prior,
            HAS_GW=grad_logq is not None, RATIO=ratio, PATH=path, IS_F64=mu.dtype == torch.float64,
            num_warps=_num_warps(p, grad_logq is not None),
        )  # fmt: skip
    return out


def gaussian_log_prob_fwd(x, mu, logvar, reduction, clamp_lo, clamp_hi):
    """Implementation of ``fused_vae::triton_gaussian_log_prob_fwd`` (see fused_vae/backends/protocol.py)."""
    inputs = (x, mu, logvar)
    params = (reduction, clamp_lo, clamp_hi)
    B, N = _checked(P.LOG_PROB, inputs, params)
    (out,) = P.LOG_PROB.alloc(inputs, params)
    reduced = P.is_reduced(reduction)
    if N == 0:
        return out.fill_(P.empty_value(reduction, B)) if reduced else out
    acc = P.acc_dtype(x.dtype)
    p = _rowwise_plan(reduced, B, N)
    final, part = _row_sum_target(out, reduction, B, p, acc) if reduced else (False, out)
    lo, hi, has_lo, has_hi = _bounds(clamp_lo, clamp_hi)
    is_f64 = acc == torch.float64
    with _device_guard(x):
        _log_prob_fwd_kernel[(p.grid,)](
            x.contiguous(), mu.contiguous(), logvar.contiguous(), out, part, p.rows, p.cols, p.NC, lo, hi,
            ROWS=p.ROWS, CH4=p.CH4, FLAT=p.rows == 1, HAS_LO=has_lo, HAS_HI=has_hi,
            ELEMENTWISE=not reduced, FINAL=final, IS_F64=is_f64, num_warps=p.num_warps,
        )  # fmt: skip
        if reduced and not final:
            _finish_rows(part, out, reduction, B, p.NC, is_f64)
    return out


def gaussian_log_prob_bwd(grad, x, mu, logvar, reduction, clamp_lo, clamp_hi):
    """Implementation of ``fused_vae::triton_gaussian_log_prob_bwd`` (see fused_vae/backends/protocol.py)."""
    inputs = (x, mu, logvar)
    params = (reduction, clamp_lo, clamp_hi)
    B, N = _checked(P.LOG_PROB, inputs, params, (grad,))
    out = P.LOG_PROB.alloc_grads(inputs)
    if N == 0:
        return out
    if grad is None:
        return tuple(g.zero_() for g in out)
    p = _rowwise_plan(reduction == P.REDUCE_PER_SAMPLE, B, N)
    lo, hi, has_lo, has_hi = _bounds(clamp_lo, clamp_hi)
    with _device_guard(x):
        _log_prob_bwd_kernel[(p.grid,)](
            grad.contiguous(), x.contiguous(), mu.contiguous(), logvar.contiguous(), *out,
            p.rows, p.cols, p.NC, lo, hi, P.divisor(reduction, B),
            ROWS=p.ROWS, CH4=p.CH4, FLAT=p.rows == 1, HAS_LO=has_lo, HAS_HI=has_hi, MODE=reduction,
            IS_F64=x.dtype == torch.float64, num_warps=p.num_warps,
        )  # fmt: skip
    return out

"""An independent implementation of the contract for the tests: numpy Philox on uint64
words and float64 math. Written from docs/design.md, sharing no code with fused_vae."""

from __future__ import annotations

import numpy as np
import torch

M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
W0, W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
MASK = np.uint64(0xFFFFFFFF)
S32 = np.uint64(32)


def philox4x32_10(ctr: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 (Salmon et al. 2011). ctr: [n, 4] uint32-valued; key: (k0, k1)."""
    c = [ctr[:, i].astype(np.uint64) for i in range(4)]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for r in range(10):
        p0 = M0 * c[0]  # < 2**64: exact in uint64
        p1 = M1 * c[2]
        c = [(p1 >> S32) ^ c[1] ^ k0, p1 & MASK, (p0 >> S32) ^ c[3] ^ k1, p0 & MASK]
        k0 = (k0 + W0) & MASK
        k1 = (k1 + W1) & MASK
    return np.stack(c, axis=1).astype(np.uint32)


def stream(seed: int, numel: int, offset: int = 0) -> np.ndarray:
    """The docs/design.md normal stream as float32 numpy, elements [0, numel)."""
    groups = np.arange((numel + 3) // 4, dtype=np.uint64) + np.uint64(offset)
    ctr = np.zeros((groups.size, 4), dtype=np.uint64)
    ctr[:, 0] = groups & MASK
    ctr[:, 1] = groups >> S32
    with np.errstate(over="ignore"):
        r = philox4x32_10(ctr, (seed & 0xFFFFFFFF, seed >> 32))
    x = r.view(np.int32)
    x = np.where(x < 0, ~x, x)
    u = x.astype(np.float32) * np.float32(4.6566127342e-10)
    ua = np.maximum(np.float32(1e-7), u[:, 0::2])
    ub = u[:, 1::2]
    rad = np.sqrt(np.float32(-2.0) * np.log(ua))
    th = np.float32(6.283185307179586) * ub
    out = np.empty_like(u)
    out[:, 0::2] = rad * np.cos(th)
    out[:, 1::2] = rad * np.sin(th)
    return out.reshape(-1)[:numel]


def math64(mu, logvar, seed, num_samples=None, clamp=None):
    """float64 z ([S, *shape] or shape), elementwise KL and the clamped logvar."""
    m = mu.detach().double().cpu()
    lv = logvar.detach().double().cpu()
    if clamp is not None:
        lv = lv.clamp(min=clamp[0], max=clamp[1])
    s = 1 if num_samples is None else num_samples
    eps = torch.from_numpy(stream(seed, s * m.numel()).astype(np.float64)).reshape(s, *m.shape)
    z = m + torch.exp(0.5 * lv) * eps
    if num_samples is None:
        z = z[0]
    kl = 0.5 * (m * m + torch.exp(lv) - lv - 1.0)
    return z, kl, eps


def reduce64(kl: torch.Tensor, reduction: str) -> torch.Tensor:
    """Applies a public reduction name to a float64 elementwise KL."""
    if reduction == "none":
        return kl
    b = kl.shape[0]
    rows = kl.reshape(b, -1).sum(1) if kl.numel() else torch.zeros(b, dtype=kl.dtype)
    if reduction == "per_sample":
        return rows
    total = rows.sum()
    return total / b if reduction == "batchmean" else total


def grads64(mu, logvar, seed, num_samples, reduction, gz, gkl, clamp=None):
    """d(z, kl)/d(mu, logvar) against output gradients (gz [S, *shape], gkl of the reduced
    KL's shape) by float64 autograd of the math above; float64 CPU tensors."""
    m = mu.detach().double().cpu().requires_grad_()
    l_raw = logvar.detach().double().cpu().requires_grad_()
    lv = l_raw.clamp(min=clamp[0], max=clamp[1]) if clamp is not None else l_raw
    eps = torch.from_numpy(stream(seed, num_samples * m.numel()).astype(np.float64)).reshape(num_samples, *m.shape)
    z = m + torch.exp(0.5 * lv) * eps
    kl = reduce64(0.5 * (m * m + torch.exp(lv) - lv - 1.0), reduction)
    return torch.autograd.grad((z, kl), (m, l_raw), (gz.double().cpu(), gkl.double().cpu()))


HALF_LOG_2PI = 0.5 * np.log(2.0 * np.pi)


def _leaf64(t):
    return None if t is None else t.detach().double().cpu().requires_grad_()


def _clamp64(t, clamp):
    return t if clamp is None or t is None else t.clamp(min=clamp[0], max=clamp[1])


def terms64(mu, logvar, seed, num_samples=None, prior=None, clamp=None, path=False):
    """The sampling op's terms in float64, written from the densities themselves:
    KL(N(m, v) || N(pm, pv)) = 0.5 (log pv/v + (v + (m - pm)^2)/pv - 1) per element and
    log N(z; m, v) = -0.5 ((z - m)^2 / v + log v + log 2 pi) summed per sample and row.

    Inputs become float64 CPU leaves that require grad, so autograd of the returned terms
    gives independent gradients: the total derivative through z = m + sqrt(v) eps, or with
    ``path=True`` the path derivative (m, v held constant inside log q). ``prior`` is None
    (N(0, I)) or a pair; the clamp applies to both logvars.

    Returns:
        ``(leaves, z, kl, log_q, log_ratio)``: leaves ``[mu, logvar(, prior_mu, prior_logvar)]``;
        z ``[S, *shape]`` (shape for num_samples=None); the elementwise KL; log q(z|x) and
        log q(z|x) - log p(z), ``[S, B]`` (``[B]``).
    """
    m, raw_lv = _leaf64(mu), _leaf64(logvar)
    leaves = [m, raw_lv]
    lv = _clamp64(raw_lv, clamp)
    if prior is None:
        pm, plv = torch.zeros_like(m), torch.zeros_like(m)
    else:
        pm, raw_plv = _leaf64(prior[0]), _leaf64(prior[1])
        leaves += [pm, raw_plv]
        plv = _clamp64(raw_plv, clamp)
    s = 1 if num_samples is None else num_samples
    eps = torch.from_numpy(stream(seed, s * m.numel()).astype(np.float64)).reshape(s, *m.shape)
    var, pvar = torch.exp(lv), torch.exp(plv)
    z = m + torch.sqrt(var) * eps
    kl = 0.5 * (torch.log(pvar / var) + (var + (m - pm) ** 2) / pvar - 1.0)
    qm, qlv = (m.detach(), lv.detach()) if path else (m, lv)
    log_q = (-0.5 * ((z - qm) ** 2 / torch.exp(qlv) + qlv + 2 * HALF_LOG_2PI)).reshape(s, m.shape[0], -1).sum(-1)
    log_p = (-0.5 * ((z - pm) ** 2 / pvar + plv + 2 * HALF_LOG_2PI)).reshape(s, m.shape[0], -1).sum(-1)
    if num_samples is None:
        z, log_q, log_p = z[0], log_q[0], log_p[0]
    return leaves, z, kl, log_q, log_q - log_p


def log_prob64(x, mu, logvar, clamp=None):
    """float64 elementwise ``log N(x; mu, exp(logvar))`` = ``-0.5 ((x - mu)^2 / var + log var + log 2 pi)``,
    with float64 CPU leaves ``[x, mu, logvar]`` that require grad: ``(leaves, log_prob)``."""
    leaves = [_leaf64(t) for t in (x, mu, logvar)]
    d = leaves[0] - leaves[1]
    lv = _clamp64(leaves[2], clamp)
    return leaves, -0.5 * (d * d / torch.exp(lv) + lv + 2 * HALF_LOG_2PI)

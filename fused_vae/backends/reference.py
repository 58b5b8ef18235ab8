"""The ``reference`` backend and the composite (plain PyTorch) form of the fused op.

:func:`forward_from_eps` is the op's math written with differentiable tensor operations.
It is the reference backend (with eps from :func:`fused_vae.philox.normal_stream`), the
path the public functions take under forward-mode AD and torch.func transforms (with eps
from the running backend's own kernel), and the source of the fused ops' second and
higher derivatives (fused_vae/backends/registration.py). It is also the yardstick the
tests hold the fused backends against.
"""

from __future__ import annotations

import torch

from ..philox import normal_stream
from . import protocol as P


def forward_from_eps(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor | None,
    kl_mode: int,
    clamp_lo: float | None,
    clamp_hi: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, kl)`` of the op for given noise, differentiable in mu, logvar (and eps).

    Args:
        mu, logvar: ``[B, ...]`` of one floating dtype.
        eps: ``[S, *mu.shape]`` noise in the accumulation dtype, or None for no z (S = 0).
        kl_mode, clamp_lo, clamp_hi: as the forward op (fused_vae/backends/protocol.py).

    Returns:
        z ``[S, *mu.shape]`` in mu's dtype (``[0]`` without eps) and kl per ``kl_mode``.
    """
    acc = P.acc_dtype(mu.dtype)
    m = mu.to(acc)
    lv = logvar.to(acc)
    if clamp_lo is not None or clamp_hi is not None:
        lv = lv.clamp(min=clamp_lo, max=clamp_hi)
    z = (m + torch.exp(0.5 * lv) * eps).to(mu.dtype) if eps is not None else mu.new_empty(0)
    if kl_mode == P.KL_SKIP:
        return z, mu.new_empty(0)
    elem = 0.5 * (m * m + torch.exp(lv) - lv - 1.0)
    if kl_mode == P.KL_NONE:
        return z, elem.to(mu.dtype)
    batch = mu.shape[0]
    rows = elem.reshape(batch, -1).sum(dim=1) if batch else elem.new_zeros(0)
    if kl_mode == P.KL_PER_SAMPLE:
        return z, rows
    total = rows.sum()
    if kl_mode == P.KL_BATCHMEAN:
        total = total / batch
    return z, total


def noise(mu: torch.Tensor, seed: torch.Tensor, num_samples: int) -> torch.Tensor:
    """eps ``[num_samples, *mu.shape]`` of the stream of ``seed``, in the accumulation dtype."""
    eps = normal_stream(seed, 0, num_samples * mu.numel(), device=mu.device)
    return eps.to(P.acc_dtype(mu.dtype)).reshape(num_samples, *mu.shape)


def reparam_kl(mu, logvar, seed, num_samples, kl_mode, clamp_lo, clamp_hi):
    """The forward op's contract in plain PyTorch (autograd is PyTorch's own; eps is kept).

    Raises:
        TypeError / ValueError: the forward op's checks (fused_vae/backends/protocol.py).
    """
    P.check_fwd_args(mu, logvar, seed, num_samples, kl_mode)
    eps = noise(mu, seed, num_samples) if num_samples > 0 else None
    return forward_from_eps(mu, logvar, eps, kl_mode, clamp_lo, clamp_hi)


class ReferenceBackend:
    """Plain PyTorch on any device: the fallback and the tests' yardstick."""

    name = "reference"

    def unavailable_reason(self, device_type: str) -> str | None:
        return None

    def reparam_kl(self, mu, logvar, seed, num_samples, kl_mode, clamp_lo, clamp_hi):
        return reparam_kl(mu, logvar, seed, num_samples, kl_mode, clamp_lo, clamp_hi)


"""Reference backend: plain differentiable PyTorch on any device.

It is the fallback wherever no compiled backend is available and the yardstick the
tests hold the fused backends against. Autograd is PyTorch's own (eps is kept for the
backward pass, which the fused backends avoid).
"""

from __future__ import annotations

import torch

from .. import _validation as V
from ..philox import normal_stream


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Math dtype of the ops: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reparam_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    seed: torch.Tensor,
    num_samples: int,
    kl_mode: int,
    clamp_lo: float | None,
    clamp_hi: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``torch.ops.fused_vae.reparam_kl_fwd`` (z is [S, *shape] or [0])."""
    acc = acc_dtype(mu.dtype)
    m = mu.to(acc)
    lv = logvar.to(acc)
    if clamp_lo is not None or clamp_hi is not None:
        lv = lv.clamp(min=clamp_lo, max=clamp_hi)
    if num_samples > 0:
        eps = normal_stream(seed, 0, num_samples * mu.numel(), device=mu.device)
        eps = eps.to(acc).reshape(num_samples, *mu.shape)
        z = (m + torch.exp(0.5 * lv) * eps).to(mu.dtype)
    else:
        z = mu.new_empty(0)
    if kl_mode == V.KL_SKIP:
        return z, mu.new_empty(0)
    elem = 0.5 * (m * m + torch.exp(lv) - lv - 1.0)
    if kl_mode == V.KL_MODES["none"]:
        return z, elem.to(mu.dtype)
    batch = mu.shape[0]
    rows = elem.reshape(batch, mu.numel() // batch if batch else 0).sum(dim=1)
    if kl_mode == V.KL_MODES["per_sample"]:
        return z, rows
    total = rows.sum()
    if kl_mode == V.KL_MODES["batchmean"]:
        total = total / batch
    return z, total

"""Fake (meta) and autograd registrations for the fused forward/backward op pairs.

Each compiled backend exposes two ops with the schemas of csrc/ops.cpp:
``*_fwd(mu, logvar, seed, num_samples, kl_mode, clamp_lo, clamp_hi) -> (z, kl)`` and
``*_bwd(grad_z, grad_kl, mu, logvar, seed, ...) -> (grad_mu, grad_logvar)``.
This module gives any such pair the shape functions torch.compile needs and the
autograd formula (the backward op regenerates eps from the seed; nothing else is saved).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import _validation as V

_registered: set[str] = set()


def fwd_output_shapes(mu: torch.Tensor, num_samples: int, kl_mode: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty outputs of a forward op with the right shapes and dtypes (fake impl)."""
    z = mu.new_empty((num_samples, *mu.shape)) if num_samples > 0 else mu.new_empty(0)
    acc = torch.float64 if mu.dtype == torch.float64 else torch.float32
    if kl_mode == V.KL_MODES["none"]:
        kl = mu.new_empty(mu.shape)
    elif kl_mode == V.KL_MODES["per_sample"]:
        kl = mu.new_empty(mu.shape[0], dtype=acc)
    elif kl_mode in (V.KL_MODES["sum"], V.KL_MODES["batchmean"]):
        kl = mu.new_empty((), dtype=acc)
    else:
        kl = mu.new_empty(0)
    return z, kl


def _fake_fwd(mu, logvar, seed, num_samples, kl_mode, clamp_lo, clamp_hi):
    return fwd_output_shapes(mu, num_samples, kl_mode)


def _fake_bwd(grad_z, grad_kl, mu, logvar, seed, num_samples, kl_mode, clamp_lo, clamp_hi):
    return mu.new_empty(mu.shape), mu.new_empty(mu.shape)


def register_pair(fwd_name: str, bwd_op: Callable, *, with_fake: bool = True) -> None:
    """Registers fake impls (unless the op derives its own) and autograd for a pair.

    Args:
        fwd_name: qualified name of the forward op, e.g. "fused_vae::reparam_kl_fwd".
        bwd_op: the backward op (an OpOverloadPacket or callable with its schema).
        with_fake: False for ops whose fake impl already exists (torch.library.triton_op).
    """
    if fwd_name in _registered:
        return
    if with_fake:
        torch.library.register_fake(fwd_name)(_fake_fwd)
        torch.library.register_fake(fwd_name.replace("_fwd", "_bwd"))(_fake_bwd)

    def setup_context(ctx, inputs, output):
        mu, logvar, seed, num_samples, kl_mode, clamp_lo, clamp_hi = inputs
        ctx.save_for_backward(mu, logvar, seed)
        ctx.args = (num_samples, kl_mode, clamp_lo, clamp_hi)
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_z, grad_kl):
        mu, logvar, seed = ctx.saved_tensors
        num_samples, kl_mode, clamp_lo, clamp_hi = ctx.args
        if num_samples == 0:
            grad_z = None
        if kl_mode == V.KL_SKIP:
            grad_kl = None
        if grad_z is None and grad_kl is None:
            return None, None, None, None, None, None, None
        grad_mu, grad_logvar = bwd_op(grad_z, grad_kl, mu, logvar, seed, num_samples, kl_mode, clamp_lo, clamp_hi)
        return grad_mu, grad_logvar, None, None, None, None, None

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)
    _registered.add(fwd_name)


def register_extension_ops() -> None:
    """Registrations for the C++/CUDA extension's ``fused_vae::reparam_kl_*`` ops."""
    register_pair("fused_vae::reparam_kl_fwd", torch.ops.fused_vae.reparam_kl_bwd)

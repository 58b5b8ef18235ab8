"""The VAE objective: reconstruction + beta * KL, with KL warm-up and free bits."""

from __future__ import annotations

import torch


def kl_warmup_beta(step: int, beta: float, warmup_steps: int) -> float:
    """KL weight at optimizer step ``step`` (0-based): linear from 0 to ``beta`` over
    ``warmup_steps`` steps, then ``beta``. ``warmup_steps <= 0`` means no warm-up."""
    if warmup_steps <= 0:
        return float(beta)
    return float(beta) * min(1.0, step / warmup_steps)


def free_bits_kl(kl_elements: torch.Tensor, free_bits: float) -> torch.Tensor:
    """KL penalty with a per-dimension floor ("free bits", Kingma et al. 2016).

    ``kl_elements``: ``[B, ...]`` per-element KL. Each latent dim's batch-mean KL is
    clamped from below at ``free_bits`` nats, then summed: a scalar (float32). With
    ``free_bits == 0`` this is the batch-mean KL.
    """
    per_dim = kl_elements.float().mean(0)
    if free_bits > 0:
        per_dim = per_dim.clamp(min=free_bits)
    return per_dim.sum()


def kl_penalty(kl: torch.Tensor, free_bits: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kl_mean, kl_penalty)`` of a batch's KL: ``kl`` is the batch-mean KL (a scalar), per
    example (``[B]``) or per element (``[B, ...]``, needed for free bits). ``kl_mean`` is the
    batch-mean true KL and ``kl_penalty`` what the loss weights by beta (:func:`free_bits_kl`
    with ``free_bits > 0``, else ``kl_mean``); float32 scalars.

    Raises:
        ValueError: free_bits > 0 with a KL that is not per element.
    """
    kl = kl.float()
    kl_mean = kl if kl.dim() == 0 else (kl.flatten(1).sum(1) if kl.dim() > 1 else kl).mean()
    if free_bits <= 0:
        return kl_mean, kl_mean
    if kl.dim() < 2:
        raise ValueError(f"free bits need the per-element KL ([B, latent...]), got a tensor of shape {list(kl.shape)}")
    return kl_mean, free_bits_kl(kl, free_bits)


def weighted_loss(recon: torch.Tensor, kl_term: torch.Tensor, beta) -> torch.Tensor:
    """``recon + beta * kl_term``: a float or a 0-d float32 tensor ``beta`` (a captured step's
    warm-up); no extra autograd node for a float ``beta = 1``."""
    return recon + (beta * kl_term if isinstance(beta, torch.Tensor) or beta != 1.0 else kl_term)


def vae_loss(recon_nll: torch.Tensor, kl: torch.Tensor, *, beta: float = 1.0, free_bits: float = 0.0) -> dict:
    """The training loss for one batch.

    Args:
        recon_nll: ``[B]`` reconstruction NLL per example (nats).
        kl: ``[B]`` KL(q(z|x) || p(z)) per example, or ``[B, ...]`` per element (needed
            for free bits).
        beta: KL weight (after warm-up): a float or a 0-d float32 tensor.
        free_bits: per-dimension floor on the batch-mean KL (nats); 0 disables.

    Returns:
        dict of float32 scalars: ``loss`` (recon + beta * kl_penalty, what is minimised),
        ``recon`` (batch-mean NLL), ``kl`` (batch-mean true KL), ``kl_penalty`` (the
        KL term after free bits) and ``elbo`` (-(recon + kl), per-example mean).

    Raises:
        ValueError: free_bits > 0 with a per-example ``[B]`` KL.
    """
    recon = recon_nll.float().mean()
    kl_mean, kl_pen = kl_penalty(kl, free_bits)
    loss = weighted_loss(recon, kl_pen, beta)
    return {"loss": loss, "recon": recon, "kl": kl_mean, "kl_penalty": kl_pen, "elbo": -(recon + kl_mean)}

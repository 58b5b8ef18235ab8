"""The plain PyTorch expressions a user would write: the benchmarks' baselines."""

from __future__ import annotations

import torch


def reparameterize_kl_eager(mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z = mu + exp(0.5*logvar) * randn; KL batch mean, as in most VAE code."""
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn_like(std)
    kl = 0.5 * torch.sum(mu.pow(2) + logvar.exp() - logvar - 1) / mu.shape[0]
    return z, kl

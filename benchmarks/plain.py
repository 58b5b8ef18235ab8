"""The plain PyTorch code a user would write: the baselines of every benchmark script."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def reparameterize_kl_eager(mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z = mu + exp(0.5*logvar) * randn; KL batch mean, as in most VAE code.

    ``mu``, ``logvar``: ``[B, ...]`` of one shape. Returns ``(z, kl)``: z of mu's shape,
    kl a scalar of mu's dtype.
    """
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn_like(std)
    kl = 0.5 * torch.sum(mu.pow(2) + logvar.exp() - logvar - 1) / mu.shape[0]
    return z, kl


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class PlainMLPVAE(nn.Module):
    """The textbook MLP VAE with a Bernoulli decoder: ``nn.Linear`` + tanh layers,
    ``randn_like`` reparameterization, KL in closed form, BCE with logits.

    Same layers, in the same order, as ``fused_vae.models.MLPVAE(input_shape,
    latent_dim, hidden, activation="tanh", likelihood="bernoulli")``, so
    :meth:`copy_from` can load that model's weights.

    Args:
        input_dim: pixels per example (inputs ``[B, ...]`` are flattened).
        latent_dim: latent units.
        hidden: encoder hidden widths (the decoder mirrors them).
    """

    def __init__(self, input_dim: int, latent_dim: int = 50, hidden=(200, 200)):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = _mlp([input_dim, *hidden, 2 * latent_dim])
        self.decoder = _mlp([latent_dim, *reversed(hidden), input_dim])

    def copy_from(self, model: nn.Module) -> "PlainMLPVAE":
        """Copies the weights of a fused_vae ``MLPVAE`` of the same sizes (parameter order).

        Raises:
            ValueError: the parameter shapes differ.
        """
        mine, theirs = list(self.parameters()), list(model.parameters())
        if [p.shape for p in mine] != [p.shape for p in theirs]:
            raise ValueError("copy_from needs a model with the same layer sizes")
        with torch.no_grad():
            for dst, src in zip(mine, theirs):
                dst.copy_(src)
        return self

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """The negative ELBO averaged over the batch ``x`` (``[B, ...]`` in [0, 1]), a
        float32 scalar. ``eps`` (``[B, latent_dim]``) replaces ``randn_like`` when given."""
        x = x.flatten(1)
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        std = torch.exp(0.5 * logvar)
        z = mu + std * (torch.randn_like(std) if eps is None else eps)
        kl = 0.5 * torch.sum(mu.pow(2) + logvar.exp() - logvar - 1, dim=1)
        recon = F.binary_cross_entropy_with_logits(self.decoder(z), x, reduction="none").sum(1)
        return (recon + kl).mean()

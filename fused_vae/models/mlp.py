"""MLP VAE (Kingma & Welling 2013; the IWAE paper's one-stochastic-layer net)."""

from __future__ import annotations

import math

from torch import nn

from .base import VAE, make_activation, model_spec
from .likelihoods import build_likelihood


def mlp(sizes: list[int], activation: str) -> nn.Sequential:
    """Linear layers between consecutive ``sizes``, ``activation`` between them (not after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(make_activation(activation))
    return nn.Sequential(*layers)


class MLPVAE(VAE):
    """Fully connected VAE on flattened inputs.

    The defaults are the IWAE paper's MNIST net with one stochastic layer (Burda et al.
    2015): encoder and decoder each have 2 hidden layers of 200 tanh units, 50 latents.
    Kingma & Welling (2013) used ``hidden=(500,)``.

    Args:
        input_shape: shape of one example, e.g. ``(1, 28, 28)``; inputs are flattened.
        latent_dim: latent units.
        hidden: hidden layer widths (the decoder mirrors them).
        activation: hidden activation name.
        likelihood: ``"bernoulli"`` or ``"gaussian"``; ``sigma``/``learn_sigma`` for Gaussian.
        logvar_clamp, backend: passed to :class:`~fused_vae.models.base.VAE`.

    Raises:
        ValueError: bad sizes, activation or likelihood.
    """

    def __init__(
        self,
        input_shape,
        latent_dim: int = 50,
        hidden=(200, 200),
        activation: str = "tanh",
        likelihood: str = "bernoulli",
        sigma: float = 1.0,
        learn_sigma: bool = False,
        logvar_clamp=None,
        backend: str | None = None,
    ):
        input_shape = tuple(int(s) for s in input_shape)
        hidden = [int(h) for h in hidden]
        if latent_dim < 1 or any(h < 1 for h in hidden) or any(s < 1 for s in input_shape):
            raise ValueError(f"sizes must be >= 1: input_shape={input_shape}, latent_dim={latent_dim}, hidden={hidden}")
        d = math.prod(input_shape)
        encoder = nn.Sequential(nn.Flatten(), mlp([d, *hidden, 2 * latent_dim], activation))
        decoder = mlp([latent_dim, *reversed(hidden), d], activation)
        spec = model_spec(
            "mlp", input_shape, latent_dim, activation, likelihood, sigma, learn_sigma, logvar_clamp, hidden=hidden
        )
        super().__init__(
            encoder,
            decoder,
            build_likelihood(likelihood, sigma=sigma, learn_sigma=learn_sigma),
            input_shape,
            latent_dim,
            logvar_clamp=logvar_clamp,
            backend=backend,
            spec=spec,
        )

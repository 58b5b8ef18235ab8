"""Decoder likelihoods p(x|z): Bernoulli (logits) and Gaussian (fixed or learned variance)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_LOG_2PI = math.log(2.0 * math.pi)


def _sum_event(t: torch.Tensor, event_dims: int) -> torch.Tensor:
    return t.flatten(start_dim=t.dim() - event_dims).sum(-1)


class Likelihood(nn.Module):
    """Base class. ``params`` is what the decoder outputs, ``[*S, B, *event]``; ``x`` is
    ``[B, *event]`` (broadcast over the leading sample dims ``S``)."""

    name = "likelihood"

    def nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``-log p(x | params)`` summed over ``x``'s event dims: ``[*S, B]``, float32."""
        raise NotImplementedError

    def mean_nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """:meth:`nll` averaged over the leading dims ``[*S, B]``: a float32 scalar (what an
        ELBO loss needs; subclasses compute it without the per-example tensor)."""
        return self.nll(params, x).mean()

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """E[x | params], the image to show; same shape as ``params``."""
        raise NotImplementedError

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw x ~ p(x | params); same shape as ``params``."""
        raise NotImplementedError


class BernoulliLikelihood(Likelihood):
    """Bernoulli pixels with logits: the NLL is binary cross-entropy with logits.

    Targets may be binary or in [0, 1] (the usual "soft" BCE for grey-level data).
    """

    name = "bernoulli"

    def nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        event_dims = x.dim() - 1
        logits = params.float().flatten(start_dim=params.dim() - event_dims)  # [*S, B, D]
        target = x.float().flatten(start_dim=1).expand_as(logits)  # a view: no copy per sample
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1)

    def mean_nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        logits = params.float()
        target = x.float().expand_as(logits)
        rows = math.prod(logits.shape[:logits.dim() - x.dim() + 1])  # K * B
        return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / rows

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params.float())

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.bernoulli(self.mean(params), generator=generator)


class GaussianLikelihood(Likelihood):
    """N(x; decoder mean, sigma^2): the NLL is ``MSE / (2 sigma^2) + log sigma + log(2 pi)/2``
    per element, so with a fixed sigma it is a scaled MSE plus a constant (ELBO in nats).

    Args:
        sigma: fixed standard deviation (> 0), or the initial one when ``learn_sigma``.
        learn_sigma: learn one shared log-sigma (the "sigma-VAE" choice).

    Raises:
        ValueError: sigma <= 0 or not finite.
    """

    name = "gaussian"

    def __init__(self, sigma: float = 1.0, learn_sigma: bool = False):
        super().__init__()
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a finite number > 0, got {sigma}")
        log_sigma = torch.tensor(math.log(sigma), dtype=torch.float32)
        if learn_sigma:
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)
        self.learn_sigma = learn_sigma

    def nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        mean = params.float()
        log_sigma = self.log_sigma.float()
        sq = (x.float() - mean) ** 2
        el = 0.5 * sq * torch.exp(-2.0 * log_sigma) + log_sigma + 0.5 * _LOG_2PI
        return _sum_event(el, x.dim() - 1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return params.float()

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mean = self.mean(params)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + self.log_sigma.exp() * noise

    def extra_repr(self) -> str:
        return f"sigma={float(self.log_sigma.exp()):.4g}, learn_sigma={self.learn_sigma}"


LIKELIHOODS = ("bernoulli", "gaussian")


def build_likelihood(name: str, *, sigma: float = 1.0, learn_sigma: bool = False) -> Likelihood:
    """A likelihood by name: ``"bernoulli"`` or ``"gaussian"``.

    Raises:
        ValueError: unknown name or bad sigma.
    """
    if name == "bernoulli":
        return BernoulliLikelihood()
    if name == "gaussian":
        return GaussianLikelihood(sigma=sigma, learn_sigma=learn_sigma)
    raise ValueError(f"likelihood must be one of {', '.join(LIKELIHOODS)}, got {name!r}")

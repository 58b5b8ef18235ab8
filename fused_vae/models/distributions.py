"""A diagonal Gaussian posterior q(z|x) = N(mu, exp(logvar)) backed by the fused ops."""

from __future__ import annotations

import math

import torch

from .. import _validation, api

_LOG_2PI = math.log(2.0 * math.pi)


class DiagonalGaussian:
    """N(mu, diag(exp(logvar))) over the non-batch dims of ``mu``.

    ``mu`` and ``logvar`` are ``[B, ...]`` tensors of one shape, dtype and device (what an
    encoder outputs). Sampling, the KL to N(0, I) or to another DiagonalGaussian (a learned
    prior) and the log densities go through the fused ops (:func:`fused_vae.sample_gaussian`,
    :func:`fused_vae.gaussian_log_prob`), so ``dist.sample_with_kl(prior=p)`` is one kernel
    forward and one backward.

    Args:
        mu, logvar: ``[B, ...]`` floating tensors.
        logvar_clamp: optional ``(lo, hi)`` applied to logvar everywhere (sampling, KL,
            densities), as in diffusers' ``DiagonalGaussianDistribution``.
        backend: fused-op backend name, or None for the automatic choice.

    Raises:
        TypeError: non-tensors, unsupported or differing dtypes; a bad logvar_clamp type.
        ValueError: 0-d tensors, differing shapes or devices, a NaN or reversed clamp.
    """

    def __init__(self, mu: torch.Tensor, logvar: torch.Tensor, *, logvar_clamp=None, backend: str | None = None):
        _validation.check_pair(mu, logvar)
        lo, hi = _validation.check_clamp(logvar_clamp)
        self.mu = mu
        self.logvar = logvar
        self.logvar_clamp = None if lo is None and hi is None else (lo, hi)
        self.backend = backend

    # -- parameters -------------------------------------------------------------------
    @property
    def event_dims(self) -> int:
        """Number of trailing (non-batch) dims a sample's log density sums over."""
        return self.mu.dim() - 1

    def _logvar(self) -> torch.Tensor:
        if self.logvar_clamp is None:
            return self.logvar
        lo, hi = self.logvar_clamp
        return self.logvar.clamp(min=lo, max=hi)  # one bound may be None

    @property
    def mean(self) -> torch.Tensor:
        """``mu``, shape ``[B, ...]``."""
        return self.mu

    def mode(self) -> torch.Tensor:
        """The most likely z, ``mu`` (shape ``[B, ...]``)."""
        return self.mu

    @property
    def var(self) -> torch.Tensor:
        """``exp(logvar)``, shape ``[B, ...]``."""
        return self._logvar().exp()

    @property
    def std(self) -> torch.Tensor:
        """``exp(0.5 * logvar)``, shape ``[B, ...]``."""
        return (0.5 * self._logvar()).exp()

    # -- fused ops -----------------------------------------------------------------------
    def sample(self, *, seed=None, num_samples: int | None = None) -> torch.Tensor:
        """Reparameterized sample(s) ``mu + std * eps`` (differentiable).

        Returns ``[B, ...]``, or ``[num_samples, B, ...]`` when num_samples is an int.
        ``seed=None`` draws from torch's default generator; an int picks the stream.
        """
        return api.reparameterize(
            self.mu, self.logvar, seed=seed, num_samples=num_samples, logvar_clamp=self.logvar_clamp, backend=self.backend
        )

    def sample_with_kl(self, *, seed=None, num_samples: int | None = None, reduction: str = "batchmean",
                       prior: DiagonalGaussian | None = None):
        """``(z, kl)`` in one fused pass: a sample as :meth:`sample` and the KL as :meth:`kl`."""
        z, kl, _ = self.sample_terms(seed=seed, num_samples=num_samples, kl=reduction, prior=prior)
        return z, kl

    def sample_terms(self, *, seed=None, num_samples: int | None = None, kl: str | None = None,
                     log_density: str | None = None, prior: DiagonalGaussian | None = None,
                     path_gradient: bool = False) -> api.GaussianSample:
        """A sample with any of its Gaussian terms in one fused pass
        (:func:`fused_vae.sample_gaussian`): ``(z, kl, log_density)``, where ``kl`` is
        KL(self || prior) with reduction ``kl`` and ``log_density`` each sample's ``log q(z)``
        (``"q"``) or ``log q(z) - log prior(z)`` (``"ratio"``), ``[B]`` or ``[num_samples, B]``;
        None where not asked for. The prior (N(0, I) when None) must have this
        distribution's shape; this distribution's clamp applies to both."""
        return api.sample_gaussian(
            self.mu,
            self.logvar,
            prior=_prior_pair(prior),
            num_samples=num_samples,
            kl=kl,
            log_density=log_density,
            path_gradient=path_gradient,
            seed=seed,
            logvar_clamp=self.logvar_clamp,
            backend=self.backend,
        )

    def kl(self, reduction: str = "batchmean", prior: DiagonalGaussian | None = None) -> torch.Tensor:
        """KL(self || prior), N(0, I) when ``prior`` is None; reductions
        ``none``/``per_sample``/``sum``/``batchmean``."""
        return api.gaussian_kl(self.mu, self.logvar, prior=_prior_pair(prior), reduction=reduction,
                               logvar_clamp=self.logvar_clamp, backend=self.backend)

    # -- densities -----------------------------------------------------------------------
    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z), summed over the event dims, by the fused log-density op.

        ``z``: ``[*S, B, ...]`` (any leading sample dims; mu and logvar are then expanded to
        z's shape, a copy). Returns ``[*S, B]`` in float32 (float64 for float64 inputs),
        differentiable in z, mu and logvar.
        """
        event = self.mu.shape[1:]
        if z.shape[z.dim() - self.mu.dim():] != self.mu.shape:
            raise ValueError(f"z must have shape [*S, {', '.join(map(str, self.mu.shape))}], got {list(z.shape)}")
        lead = z.shape[: z.dim() - self.mu.dim() + 1]
        mu, logvar = self.mu.expand(z.shape), self.logvar.expand(z.shape)
        flat = [t.reshape(-1, *event) for t in (z.to(self.mu.dtype), mu, logvar)]
        lp = api.gaussian_log_prob(*flat, reduction="per_sample" if event else "none",
                                   logvar_clamp=self.logvar_clamp, backend=self.backend)
        return lp.reshape(lead).to(torch.float64 if self.mu.dtype == torch.float64 else torch.float32)

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Negative log density ``-log N(x; mu, var)`` summed over the event dims, ``[*S, B]``."""
        return -self.log_prob(x)

    def __repr__(self) -> str:
        return f"DiagonalGaussian(shape={tuple(self.mu.shape)}, dtype={self.mu.dtype}, device={self.mu.device})"


def _prior_pair(prior: DiagonalGaussian | None):
    """The ``prior=`` argument of the fused functions for a prior distribution (None: N(0, I))."""
    if prior is None:
        return None
    if not isinstance(prior, DiagonalGaussian):
        raise TypeError(f"prior must be None or a DiagonalGaussian, got {type(prior).__name__}")
    return prior.mu, prior.logvar


def _sum_event(t: torch.Tensor, event_dims: int) -> torch.Tensor:
    return t.flatten(start_dim=t.dim() - event_dims).sum(-1) if event_dims else t


def standard_normal_log_prob(z: torch.Tensor, event_dims: int) -> torch.Tensor:
    """log N(z; 0, I) summed over the last ``event_dims`` dims of ``z``, in float32 (float64 kept)."""
    dt = torch.float64 if z.dtype == torch.float64 else torch.float32
    n = math.prod(z.shape[z.dim() - event_dims:])
    return -0.5 * (_sum_event(z.to(dt).square(), event_dims) + n * _LOG_2PI)

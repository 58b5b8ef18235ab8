"""The VAE: encoder -> (mu, logvar) -> fused sample + KL -> decoder -> likelihood."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from .. import api
from .distributions import DiagonalGaussian
from .likelihoods import Likelihood
from .losses import kl_penalty, weighted_loss
from .seeds import derive_seed

ACTIVATIONS = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
}


def make_activation(name: str) -> nn.Module:
    """An activation module by name (tanh, relu, silu, gelu, elu, softplus).

    Raises:
        ValueError: unknown name.
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


OBJECTIVES = ("elbo", "iwae")
# What ``VAE.forward(..., return_stats=True)`` returns per batch, in order (batch means; ``bound``:
# the bound being trained, the ELBO or L_K; ``elbo``: the K-sample mean ELBO). Hierarchical
# models append each stochastic layer's KL (``VAE.stat_names``).
LOSS_STATS = ("loss", "recon", "kl", "elbo", "bound")


class ObjectiveTerms(NamedTuple):
    """A batch's objective: ``loss`` (differentiable), the statistics' terms as float32
    scalars (batch means), ``bound`` (None where it is the ELBO ``-(recon + kl)``) and, for
    hierarchical models, ``layer_kl``: each stochastic layer's KL, a ``[L]`` tensor."""

    loss: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    kl_penalty: torch.Tensor
    bound: torch.Tensor | None = None
    layer_kl: torch.Tensor | None = None


def check_train_samples(objective: str, num_samples: int, beta: float = 1.0, free_bits: float = 0.0) -> int:
    """Checks an objective and its sample count K; returns K.

    Raises:
        ValueError: unknown objective, K not an int >= 1, or ``iwae`` with beta != 1 or
            free bits (the importance-weighted bound has no separate KL term to weight).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"train samples (K) must be an int >= 1, got {num_samples!r}")
    if objective == "iwae" and (isinstance(beta, torch.Tensor) or beta != 1.0 or free_bits > 0):
        raise ValueError(f"objective 'iwae' trains the bound itself: it needs beta = 1 (no KL warm-up) and "
                         f"free_bits = 0, got beta={beta}, free_bits={free_bits}")
    return num_samples


def model_spec(kind: str, input_shape, latent_dim: int, activation: str, likelihood: str, sigma: float,
               learn_sigma: bool, logvar_clamp, **extra) -> dict:
    """The JSON-able description of a model that a checkpoint stores to rebuild it."""
    return dict(
        kind=kind,
        input_shape=list(input_shape),
        latent_dim=int(latent_dim),
        **extra,
        activation=activation,
        likelihood=likelihood,
        sigma=float(sigma),
        learn_sigma=bool(learn_sigma),
        logvar_clamp=list(logvar_clamp) if logvar_clamp is not None else None,
    )


class VAE(nn.Module):
    """A VAE with a flat latent of ``latent_dim`` units.

    Args:
        encoder: maps ``[B, *input_shape]`` to ``[B, 2 * latent_dim]`` (mu, logvar).
        decoder: maps ``[N, latent_dim]`` to ``[N, *input_shape]`` likelihood parameters.
        likelihood: a :class:`~fused_vae.models.likelihoods.Likelihood`.
        input_shape: the shape of one example, e.g. ``(1, 28, 28)``.
        latent_dim: number of latent units.
        logvar_clamp: optional ``(lo, hi)`` for the posterior's logvar.
        backend: fused-op backend name or None (automatic).
        spec: the keyword arguments that rebuild this model (see :func:`build_model`).
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        likelihood: Likelihood,
        input_shape,
        latent_dim: int,
        *,
        logvar_clamp=None,
        backend: str | None = None,
        spec: dict | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.likelihood = likelihood
        self.input_shape = tuple(int(s) for s in input_shape)
        self.latent_dim = int(latent_dim)
        self.logvar_clamp = tuple(logvar_clamp) if logvar_clamp is not None else None
        self.backend = backend
        self.spec = dict(spec or {})

    # -- building blocks ---------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, self.input_shape))}], got {list(x.shape)}")

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """q(z|x) for ``x`` of shape ``[B, *input_shape]``; mu/logvar are float32 ``[B, latent_dim]``.

        Raises:
            ValueError: x has the wrong shape.
        """
        self._check_input(x)
        h = self.encoder(x)
        mu, logvar = h.float().chunk(2, dim=-1)
        return DiagonalGaussian(mu, logvar, logvar_clamp=self.logvar_clamp, backend=self.backend)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Likelihood parameters for ``z`` of shape ``[*S, latent_dim]``: ``[*S, *input_shape]``."""
        lead = z.shape[:-1]
        out = self.decoder(z.reshape(-1, self.latent_dim))
        return out.reshape(*lead, *self.input_shape)

    # -- objectives ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *, beta: float = 1.0, free_bits: float = 0.0, seed=None,
                objective: str = "elbo", num_samples: int = 1, return_stats: bool = False):
        """The training objective on a batch ``x`` (``[B, *input_shape]``).

        One fused op call draws all ``num_samples`` (K) samples of z and computes the KL.
        ``objective="elbo"`` averages K single-sample ELBOs (analytic KL);
        ``objective="iwae"`` is the importance-weighted bound L_K of Burda et al. (2015),
        ``logsumexp_k(log p(x, z_k) - log q(z_k | x)) - log K``; with K = 1 it is the ELBO and
        uses the same (analytic-KL) estimator. ``seed=None`` draws the noise from torch's
        default generator; an int (or a 0-d int64 tensor on x's device) fixes it.

        Returns the dict of :func:`~fused_vae.models.losses.vae_loss` (float32 scalars;
        ``loss`` is minimised) plus ``bound``: the batch mean of the bound being trained.
        With ``return_stats=True`` (what a training step needs): ``(loss, stats)``, the
        differentiable loss and a detached float32 ``[5]`` tensor of the batch's
        :data:`LOSS_STATS` (the dict's values, computed without autograd).

        Raises:
            ValueError: unknown objective, num_samples < 1, or beta != 1 / free_bits with ``iwae``.
        """
        k = check_train_samples(objective, num_samples, beta, free_bits)
        t = self._objective_terms(x, beta, free_bits, seed, objective, k, stats_grad=not return_stats)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not return_stats):
            elbo = -(t.recon + t.kl)
            bound = elbo if t.bound is None else t.bound
            if return_stats:
                stats = torch.stack([t.loss, t.recon, t.kl, elbo, bound])
                return t.loss, stats if t.layer_kl is None else torch.cat([stats, t.layer_kl.float()])
        out = {"loss": t.loss, "recon": t.recon, "kl": t.kl, "kl_penalty": t.kl_penalty, "elbo": elbo, "bound": bound}
        if t.layer_kl is not None:
            out.update(zip(self.stat_names[len(LOSS_STATS):], t.layer_kl.unbind(0)))
        return out

    @property
    def stat_names(self) -> tuple[str, ...]:
        """What ``forward(..., return_stats=True)``'s statistics hold, in order: :data:`LOSS_STATS`
        (hierarchical models add ``kl_<layer>`` per stochastic layer)."""
        return LOSS_STATS

    def _objective_terms(self, x: torch.Tensor, beta, free_bits: float, seed, objective: str, k: int, *,
                         stats_grad: bool = True) -> ObjectiveTerms:
        """The :class:`ObjectiveTerms` of :meth:`forward` (batch means). ``loss`` is
        differentiable; with ``stats_grad=False`` the values only the statistics read may be
        computed without autograd."""
        q = self.encode(x)
        if objective == "elbo" or k == 1:
            z, kl = q.sample_with_kl(seed=seed, num_samples=k if k > 1 else None,
                                     reduction="none" if free_bits > 0 else "batchmean")
            recon = self.likelihood.mean_nll(self.decode(z), x)  # over the K samples and the batch
            kl_mean, kl_pen = kl_penalty(kl, free_bits)
            return ObjectiveTerms(weighted_loss(recon, kl_pen, beta), recon, kl_mean, kl_pen)
        # z: [K, B, L]; the KL for the statistics and log q(z|x) - log p(z) per sample, one pass
        z, kl, log_ratio = q.sample_terms(seed=seed, num_samples=k, kl="batchmean", log_density="ratio")
        nll = self.likelihood.nll(self.decode(z), x)
        loss = math.log(k) - torch.logsumexp(-nll - log_ratio, dim=0).mean()
        with torch.set_grad_enabled(stats_grad and torch.is_grad_enabled()):
            return ObjectiveTerms(loss, nll.mean(), kl, kl, -loss)

    def _log_weights(self, q: DiagonalGaussian, x: torch.Tensor, k: int, seed) -> torch.Tensor:
        """``log p(x, z_k) - log q(z_k | x)`` of ``k`` samples of ``q`` (``[k, B]`` float32),
        ``log q - log p(z)`` from the fused op's own noise."""
        z, _, log_ratio = q.sample_terms(seed=seed, num_samples=k, log_density="ratio")
        return -self.likelihood.nll(self.decode(z), x) - log_ratio

    def elbo(self, x: torch.Tensor, *, seed=None) -> dict:
        """Single-sample ELBO per example: dict of ``elbo``, ``recon``, ``kl``, each ``[B]`` float32."""
        q = self.encode(x)
        z, kl = q.sample_with_kl(seed=seed, reduction="per_sample")
        recon = self.likelihood.nll(self.decode(z), x)
        return {"elbo": -(recon + kl), "recon": recon, "kl": kl.float()}

    def iwae_log_likelihood(self, x: torch.Tensor, num_samples: int, *, seed=None, chunk_size: int | None = None):
        """Importance-sampled estimate of ``log p(x)`` (the IWAE bound L_k), ``[B]`` float32.

        ``log p(x) >= E[log mean_k p(x, z_k) / q(z_k | x)]`` with ``z_k ~ q(z|x)`` drawn by the
        fused op's ``num_samples``. Samples are processed ``chunk_size`` at a time
        (default: all) and combined with a running logsumexp. An int ``seed`` makes
        the estimate deterministic.

        Raises:
            ValueError: num_samples < 1.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        chunk = num_samples if not chunk_size else max(1, min(int(chunk_size), num_samples))
        posterior = self._posterior(x)
        total = None
        for i, done in enumerate(range(0, num_samples, chunk)):
            s = None if seed is None else derive_seed(int(seed), i)
            part = torch.logsumexp(self._log_weights(posterior, x, min(chunk, num_samples - done), s), dim=0)
            total = part if total is None else torch.logaddexp(total, part)
        return total - math.log(num_samples)

    def _posterior(self, x: torch.Tensor):
        """What :meth:`_log_weights` needs of ``x`` that does not depend on the samples (the
        encoder's output), computed once per :meth:`iwae_log_likelihood`."""
        return self.encode(x)

    # -- images ------------------------------------------------------------------------
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """E[x | z = posterior mode] for ``x``: ``[B, *input_shape]`` float32."""
        return self.likelihood.mean(self.decode(self.encode(x).mode()))

    def generate(self, n: int, *, seed: int = 0, device=None) -> torch.Tensor:
        """Means of p(x|z) for ``n`` prior draws z ~ N(0, I) (noise stream ``seed``): ``[n, *input_shape]``."""
        device = device if device is not None else next(self.parameters()).device
        z = api.standard_normal((n, self.latent_dim), seed, device=device)
        return self.likelihood.mean(self.decode(z))

    def interpolate(self, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 10) -> torch.Tensor:
        """Decoded means along the straight line between the posterior means of two
        examples (each ``[*input_shape]``): ``[steps, *input_shape]``."""
        mu = self.encode(torch.stack([x_a, x_b])).mode()
        t = torch.linspace(0.0, 1.0, steps, device=mu.device).unsqueeze(1)
        z = (1 - t) * mu[0] + t * mu[1]
        return self.likelihood.mean(self.decode(z))

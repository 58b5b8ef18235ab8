"""VAE models built on the fused ops.

    from fused_vae.models import MLPVAE, DiagonalGaussian
    model = MLPVAE((1, 28, 28))                  # the IWAE paper's 200-200-50 tanh net
    out = model(x, beta=1.0)                     # dict: loss, recon, kl, kl_penalty, elbo, bound
    out["loss"].backward()
"""

from __future__ import annotations

from .base import ACTIVATIONS, LOSS_STATS, OBJECTIVES, VAE, check_train_samples
from .conv import ConvVAE
from .distributions import DiagonalGaussian, standard_normal_log_prob
from .hierarchical import HierarchicalVAE, IWAETwoLayerVAE, TopDownConvVAE, TopDownVAE
from .likelihoods import LIKELIHOODS, BernoulliLikelihood, GaussianLikelihood, Likelihood, build_likelihood
from .losses import free_bits_kl, kl_penalty, kl_warmup_beta, vae_loss, weighted_loss
from .mlp import MLPVAE
from .seeds import derive_seed

MODELS = {"mlp": MLPVAE, "conv": ConvVAE, "mlp2": IWAETwoLayerVAE, "topdown": TopDownVAE,
          "topdown-conv": TopDownConvVAE}


def build_model(spec: dict, *, backend: str | None = None) -> VAE:
    """A model from its spec (``model.spec``, stored in checkpoints): a dict with ``kind``
    (a key of :data:`MODELS`) and that class's keyword arguments.

    Raises:
        ValueError: unknown kind, or arguments the class does not take.
    """
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in MODELS:
        raise ValueError(f"model kind must be one of {', '.join(MODELS)}, got {kind!r}")
    try:
        return MODELS[kind](**spec, backend=backend)
    except TypeError as e:
        raise ValueError(f"bad model spec for {kind!r}: {e}") from None


__all__ = [
    "ACTIVATIONS",
    "LIKELIHOODS",
    "LOSS_STATS",
    "MODELS",
    "OBJECTIVES",
    "VAE",
    "BernoulliLikelihood",
    "ConvVAE",
    "DiagonalGaussian",
    "GaussianLikelihood",
    "HierarchicalVAE",
    "IWAETwoLayerVAE",
    "Likelihood",
    "MLPVAE",
    "TopDownConvVAE",
    "TopDownVAE",
    "build_likelihood",
    "build_model",
    "check_train_samples",
    "derive_seed",
    "free_bits_kl",
    "kl_penalty",
    "kl_warmup_beta",
    "standard_normal_log_prob",
    "vae_loss",
    "weighted_loss",
]

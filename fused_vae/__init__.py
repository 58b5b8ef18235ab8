"""fused_vae: fused kernels for the Gaussian terms of VAE objectives.

    import fused_vae as fv
    z, kl = fv.reparameterize_kl(mu, logvar)          # KL to N(0, I), reduced with "batchmean"
    loss = recon_loss(decoder(z), x) + beta * kl
    z, kl = fv.reparameterize_kl(mu, logvar, prior=(prior_mu, prior_logvar))  # a learned prior
    s = fv.sample_gaussian(mu, logvar, num_samples=K, log_density="ratio")    # IWAE: s.z, log q - log p
    lp = fv.gaussian_log_prob(x, mu, logvar)          # log N(x; mu, exp(logvar)) per example

Backends: "cpu" (C++), "cuda" (CUDA C++), "triton", "reference" (pure PyTorch);
``print(fv.available_backends())`` shows which run here. docs/design.md is the contract.
"""

from .api import (
    GaussianSample,
    gaussian_kl,
    gaussian_log_prob,
    reparameterize,
    reparameterize_kl,
    sample_gaussian,
    standard_normal,
)
from .backends import BackendInfo, available_backends, backend_for

__version__ = "0.1.0"

__all__ = [
    "BackendInfo",
    "GaussianSample",
    "available_backends",
    "backend_for",
    "gaussian_kl",
    "gaussian_log_prob",
    "reparameterize",
    "reparameterize_kl",
    "sample_gaussian",
    "standard_normal",
]

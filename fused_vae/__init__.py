"""fused_vae: fused reparameterization-trick and Gaussian-KL kernels for VAEs.

    import fused_vae as fv
    z, kl = fv.reparameterize_kl(mu, logvar)          # KL reduced with "batchmean"
    loss = recon_loss(decoder(z), x) + beta * kl

Backends: "cpu" (C++), "cuda" (CUDA C++), "triton", "reference" (pure PyTorch);
``print(fv.available_backends())`` shows which run here. docs/design.md is the contract.
"""

from .api import gaussian_kl, reparameterize, reparameterize_kl, standard_normal
from .backends import BackendInfo, available_backends, backend_for

__version__ = "0.1.0"

__all__ = [
    "BackendInfo",
    "available_backends",
    "backend_for",
    "gaussian_kl",
    "reparameterize",
    "reparameterize_kl",
    "standard_normal",
]

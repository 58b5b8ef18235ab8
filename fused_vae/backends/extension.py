"""The ``cpu`` and ``cuda`` backends: the C++/CUDA extension's ``fused_vae::reparam_kl_*`` ops.

Under ``FUSED_VAE_CUDA_EMULATE=1`` (tests only) the ``cuda`` backend also takes CPU tensors,
which it runs through the emulated CUDA kernels of :mod:`fused_vae.backends.cuda_emulation`;
it is never chosen automatically for them.
"""

from __future__ import annotations

import torch

from . import build, cuda_emulation


class ExtensionBackend:
    """Runs ``torch.ops.fused_vae.reparam_kl_fwd`` on tensors of one device type."""

    def __init__(self, device_type: str) -> None:
        self.name = device_type
        self.device_type = device_type

    def unavailable_reason(self, device_type: str) -> str | None:
        if self.device_type == "cuda" and device_type == "cpu" and cuda_emulation.enabled():
            return cuda_emulation.status().reason
        if self.device_type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is available"
        if device_type != self.device_type:
            return f"it runs on {self.device_type} tensors only"
        st = build.status()
        if not st.loaded:
            return st.reason
        if not getattr(st, self.device_type):
            return st.reason or f"the extension has no {self.device_type} kernels"
        return None

    def reparam_kl(self, mu, logvar, seed, num_samples, kl_mode, clamp_lo, clamp_hi):
        if self.device_type == "cuda" and mu.device.type == "cpu":
            return cuda_emulation.reparam_kl(mu, logvar, seed, num_samples, kl_mode, clamp_lo, clamp_hi)
        return torch.ops.fused_vae.reparam_kl_fwd(mu, logvar, seed, num_samples, kl_mode, clamp_lo, clamp_hi)

"""Triton backend (placeholder until the Triton kernels land)."""

from __future__ import annotations


class TritonBackend:
    name = "triton"

    def unavailable_reason(self, device_type: str) -> str | None:
        return "the Triton kernels are not implemented yet"

    def reparam_kl(self, mu, logvar, seed, num_samples, kl_mode, clamp_lo, clamp_hi):
        raise NotImplementedError

"""Backend registry and selection.

Automatic choice by the tensors' device: cuda > triton > reference for CUDA tensors,
cpu > reference for CPU tensors, reference elsewhere. ``FUSED_VAE_BACKEND`` overrides
the automatic choice; an explicit ``backend=`` argument overrides both.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import torch

from . import reference
from .base import Backend
from .extension import ExtensionBackend
from .triton_backend import TritonBackend

ENV_VAR = "FUSED_VAE_BACKEND"


class _ReferenceBackend:
    name = "reference"

    def unavailable_reason(self, device_type: str) -> str | None:
        return None

    def reparam_kl(self, mu, logvar, seed, num_samples, kl_mode, clamp_lo, clamp_hi):
        return reference.reparam_kl(mu, logvar, seed, num_samples, kl_mode, clamp_lo, clamp_hi)


BACKENDS: dict[str, Backend] = {
    "reference": _ReferenceBackend(),
    "cpu": ExtensionBackend("cpu"),
    "cuda": ExtensionBackend("cuda"),
    "triton": TritonBackend(),
}

AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
_warned_fallback: set[str] = set()


class BackendInfo(NamedTuple):
    """Whether a backend is usable here, for which device types, and if not, why."""

    available: bool
    devices: tuple[str, ...]
    reason: str | None


def _local_device_types() -> tuple[str, ...]:
    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def available_backends() -> dict[str, BackendInfo]:
    """Every backend with whether it can run here, on which device types, and why not.

    Returns:
        ``{name: BackendInfo(available, devices, reason)}``; ``reason`` is None for an
        available backend, else the reason it cannot run on any local device.
    """
    out = {}
    for name, backend in BACKENDS.items():
        reasons = {d: backend.unavailable_reason(d) for d in _local_device_types()}
        devices = tuple(d for d, r in reasons.items() if r is None)
        reason = None if devices else "; ".join(dict.fromkeys(r for r in reasons.values() if r))
        out[name] = BackendInfo(bool(devices), devices, reason)
    return out


def _check_name(name: object, source: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        names = ", ".join(repr(n) for n in BACKENDS)
        raise ValueError(f"{source} must be one of {names} or None, got {name!r}")
    return name


@torch.compiler.assume_constant_result
def _resolve_name(requested: str | None, device_type: str) -> str:
    if requested is not None:
        name = _check_name(requested, "backend")
        source = "backend"
    else:
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env != "auto":
            name = _check_name(env, f"the {ENV_VAR} environment variable")
            source = f"{ENV_VAR}={env}"
        else:
            return _auto_name(device_type)
    reason = BACKENDS[name].unavailable_reason(device_type)
    if reason is not None:
        raise ValueError(f"{source}: backend {name!r} is not available for {device_type} tensors: {reason}")
    return name


def _auto_name(device_type: str) -> str:
    order = AUTO_ORDER.get(device_type, ("reference",))
    skipped = []
    for name in order:
        reason = BACKENDS[name].unavailable_reason(device_type)
        if reason is None:
            if skipped and name == "reference" and device_type not in _warned_fallback:
                _warned_fallback.add(device_type)
                warnings.warn(
                    f"fused_vae: using the slow reference backend for {device_type} tensors because "
                    + "; ".join(skipped)
                    + ". See fused_vae.available_backends().",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return name
        skipped.append(f"{name!r} is unavailable ({reason})")
    raise AssertionError("the reference backend is always available")


def resolve(requested: str | None, device: torch.device) -> Backend:
    """The backend to run for tensors on ``device``.

    Raises:
        ValueError: an unknown name, or a backend that cannot run here (with the reason).
    """
    return BACKENDS[_resolve_name(requested, device.type)]

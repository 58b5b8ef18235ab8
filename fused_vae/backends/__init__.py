"""Backend registry and selection.

Automatic choice by the tensors' device: cuda > triton > reference for CUDA tensors,
cpu > reference for CPU tensors, reference elsewhere. ``FUSED_VAE_BACKEND`` overrides
the automatic choice; an explicit ``backend=`` argument overrides both. The choice is
cached per (argument, device type, environment value).
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple, Protocol

import torch

from . import cuda_emulation, extension
from .extension import ExtensionBackend
from .reference import ReferenceBackend
from .triton_backend import TritonBackend

ENV_VAR = "FUSED_VAE_BACKEND"


class Backend(Protocol):
    """What every backend provides: the fused ops for tensors of some device types.

    ``run(op, *args)`` runs the forward op of the op family ``op`` (a key of
    :data:`fused_vae.backends.protocol.OPS`) with that family's arguments; it has the
    contract of ``torch.ops.fused_vae.<op>_fwd`` and is differentiable in the family's inputs.
    """

    name: str

    def unavailable_reason(self, device_type: str) -> str | None:
        """None when the backend can run on tensors of ``device_type``, else why not."""
        ...

    def run(self, op: str, *args): ...


BACKENDS: dict[str, Backend] = {
    "reference": ReferenceBackend(),
    "cpu": ExtensionBackend("cpu"),
    "cuda": ExtensionBackend("cuda"),
    "triton": TritonBackend(),
}

AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
_warned_fallback: set[str] = set()
_chosen: dict[tuple, str] = {}


class BackendInfo(NamedTuple):
    """Whether a backend is usable here, for which device types, and if not, why."""

    available: bool
    devices: tuple[str, ...]
    reason: str | None


class BackendReport(dict):
    """``{name: BackendInfo}`` that prints as a table with the automatic choice per device."""

    def __init__(self, entries: dict[str, BackendInfo], auto: dict[str, str], extension: str) -> None:
        super().__init__(entries)
        self.auto = auto
        self.extension = extension

    def __str__(self) -> str:
        lines = ["fused_vae backends:"]
        for name, info in self.items():
            where = ", ".join(info.devices) + " tensors" if info.available else "unavailable"
            lines.append(f"  {name:<10} {where}" + (f": {info.reason}" if info.reason else ""))
        picks = "; ".join(f"{dev} tensors -> {name}" for dev, name in self.auto.items())
        lines.append(f"automatic choice: {picks}")
        lines.append(f"C++/CUDA extension: {self.extension}")
        return "\n".join(lines)


def _local_device_types() -> tuple[str, ...]:
    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def _extension_summary() -> str:
    st = extension.status()
    if not st.loaded:
        return f"not loaded ({st.reason})"
    how = "built ahead of time by setup.py" if st.how == "prebuilt" else "JIT-built with ninja, cached by torch"
    devices = ", ".join(d for d in ("cpu", "cuda") if getattr(st, d))
    return f"loaded ({how}; kernels for {devices})"


def available_backends() -> BackendReport:
    """Every backend with whether it can run here, on which device types, and why not.

    Returns:
        ``{name: BackendInfo(available, devices, reason)}`` (a dict; ``print()`` shows a
        table with the automatic choice per device type and how the extension was loaded).
        ``reason`` is None for an available backend, else why it cannot run on any
        local device.
    """
    out = {}
    for name, backend in BACKENDS.items():
        reasons = {d: backend.unavailable_reason(d) for d in _local_device_types()}
        devices = tuple(d for d, r in reasons.items() if r is None)
        reason = None if devices else "; ".join(dict.fromkeys(r for r in reasons.values() if r))
        out[name] = BackendInfo(bool(devices), devices, reason)
    auto = {d: _auto_name(d, warn=False) for d in _local_device_types()}
    return BackendReport(out, auto, _extension_summary())


def _check_name(name: object, source: str, default: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        names = ", ".join(repr(n) for n in BACKENDS)
        raise ValueError(f"{source} must be one of {names} or {default}, got {name!r}")
    return name


def _choice_key(requested: str | None, device_type: str) -> tuple:
    # The emulated CUDA device (tests) changes what "cuda" accepts for CPU tensors.
    return (requested, device_type, os.environ.get(ENV_VAR, ""), os.environ.get(cuda_emulation.ENV_VAR, ""))


def _resolve_name(requested: str | None, device_type: str) -> str:
    key = _choice_key(requested, device_type)
    name = _chosen.get(key)
    if name is None:
        name = _choose(requested, device_type, key[2].strip())
        _chosen[key] = name
    return name


# torch.compile treats the choice as a constant of the traced graph (what
# torch.compiler.assume_constant_result marks, without importing torch._dynamo here).
# Changing FUSED_VAE_BACKEND after compiling needs torch._dynamo.reset().
_resolve_name._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _choose(requested: str | None, device_type: str, env: str) -> str:
    if requested is not None:
        name = _check_name(requested, "backend", "None")
        source = ""
    elif env and env != "auto":
        name = _check_name(env, f"the {ENV_VAR} environment variable", "'auto'")
        source = f"{ENV_VAR}={env}: "
    else:
        return _auto_name(device_type)
    reason = BACKENDS[name].unavailable_reason(device_type)
    if reason is not None:
        raise ValueError(f"{source}backend {name!r} is not available for {device_type} tensors: {reason}")
    return name


def _auto_name(device_type: str, warn: bool = True) -> str:
    order = AUTO_ORDER.get(device_type, ("reference",))
    skipped = []
    for name in order:
        reason = BACKENDS[name].unavailable_reason(device_type)
        if reason is None:
            if warn and skipped and name == "reference" and device_type not in _warned_fallback:
                _warned_fallback.add(device_type)
                warnings.warn(
                    f"fused_vae: using the slow reference backend for {device_type} tensors because "
                    + "; ".join(skipped)
                    + ". See fused_vae.available_backends().",
                    RuntimeWarning,
                    stacklevel=_user_stacklevel(),
                )
            return name
        skipped.append(f"{name!r} is unavailable ({reason})")
    raise AssertionError("the reference backend is always available")


def _user_stacklevel() -> int:
    """``stacklevel`` for a warning raised by this function's caller that points at the
    first frame outside fused_vae (the user's line)."""
    import sys

    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def resolve(requested: str | None, device: torch.device) -> Backend:
    """The backend to run for tensors on ``device``.

    Raises:
        ValueError: an unknown name, or a backend that cannot run here (with the reason).
    """
    if torch.compiler.is_compiling():  # the choice is a constant of the traced graph
        return BACKENDS[_resolve_name(requested, device.type)]
    name = _chosen.get(_choice_key(requested, device.type))
    return BACKENDS[name if name is not None else _resolve_name(requested, device.type)]


def backend_for(device: torch.device | str, backend: str | None = None) -> str:
    """Name of the backend the public functions would run for tensors on ``device``.

    Args:
        device: a torch.device or a string such as "cpu" or "cuda:0".
        backend: an explicit name as the functions' ``backend=`` argument, or None for
            ``FUSED_VAE_BACKEND`` and then the automatic choice.

    Raises:
        ValueError: an unknown name, or a backend that cannot run there (with the reason).
    """
    return resolve(backend, torch.device(device)).name

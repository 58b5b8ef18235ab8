"""The ``cpu`` and ``cuda`` backends: the C++/CUDA extension's ``fused_vae::reparam_kl_*`` ops.

Loading order: the module built ahead of time by setup.py (``fused_vae._C``), else a JIT
build of csrc/ with ninja (cached by torch under ~/.cache/torch_extensions, or
``TORCH_EXTENSIONS_DIR``), both with the settings of :mod:`fused_vae.backends.build`
(which also names the environment switches). Any failure is recorded, not raised:
:func:`status` says why, and backend selection falls back.

Right after the library loads, :func:`fused_vae.backends.registration.register_pair`
gives its ops their fake impls and the backward op its derivative (the forward op's
autograd kernel is C++: csrc/ops.cpp).

Under ``FUSED_VAE_CUDA_EMULATE=1`` (tests only) the ``cuda`` backend also takes CPU tensors,
which it runs through the emulated CUDA kernels of :mod:`fused_vae.backends.cuda_emulation`;
it is never chosen automatically for them.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from . import build, cuda_emulation
from .protocol import OPS

log = logging.getLogger(__name__)

_lock = threading.Lock()
_status: ExtensionStatus | None = None


@dataclass(frozen=True)
class ExtensionStatus:
    """Whether the extension is loaded, how, and which devices it implements."""

    loaded: bool
    how: str  # "prebuilt", "jit" or "" when not loaded
    cpu: bool
    cuda: bool
    reason: str | None  # why it is not loaded, or why CUDA kernels are missing


def _has_kernel(key: str) -> bool:
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_vae::{op}_fwd", key) for op in OPS)


def _ops_defined() -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw("fused_vae::reparam_kl_fwd", "")
        return True
    except RuntimeError:
        return False


def _prebuilt_is_stale(library: Path) -> bool:
    """In a source checkout, a library older than any C++ source would run old code."""
    try:
        return build.newest_source_mtime() > library.stat().st_mtime
    except FileNotFoundError:
        return False


def _load_prebuilt() -> bool:
    spec = importlib.util.find_spec("fused_vae._C")
    if spec is None or spec.origin is None:
        return False
    if _prebuilt_is_stale(Path(spec.origin)):
        log.warning("fused_vae: %s is older than the C++ sources; JIT-building instead", spec.origin)
        return False
    torch.ops.load_library(spec.origin)
    return True


def _cuda_toolkit_present() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and torch.cuda.is_available() and CUDA_HOME is not None


def _jit_cache_is_warm(name: str, with_cuda: bool) -> bool:
    """Whether torch's JIT cache holds a library of ``name`` newer than every source."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        library = Path(_get_build_directory(name, verbose=False)) / f"{name}.so"
        return library.is_file() and library.stat().st_mtime >= build.newest_source_mtime(with_cuda)
    except Exception:  # noqa: BLE001 - a private torch helper; unknown means "say we build"
        return False


def _load_jit() -> None:
    from torch.utils.cpp_extension import load

    with_cuda = _cuda_toolkit_present()
    name = "fused_vae_ext_cuda" if with_cuda else "fused_vae_ext_cpu"
    if not _jit_cache_is_warm(name, with_cuda):
        log.warning("fused_vae: building the C++ extension %s (first use only, about a minute on 2 CPU cores; "
                    "cached)", name)
    load(
        name=name,
        sources=[str(p) for p in build.sources(with_cuda)],
        extra_include_paths=[str(build.include_dir())],
        extra_cflags=build.CXX_FLAGS,
        extra_ldflags=build.LD_FLAGS,
        extra_cuda_cflags=build.NVCC_FLAGS if with_cuda else None,
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=build.verbose(),
    )


def status() -> ExtensionStatus:
    """Loads the extension on first call (building it if needed) and reports the result."""
    global _status
    if _status is not None:
        return _status
    with _lock:
        if _status is None:
            _status = _try_load()
    return _status


def _try_load() -> ExtensionStatus:
    if build.disabled():
        return ExtensionStatus(False, "", False, False, f"disabled by {build.DISABLE_ENV}=1")
    try:
        if _ops_defined() or _load_prebuilt():
            how = "prebuilt"
        else:
            _load_jit()
            how = "jit"
    except Exception as exc:  # any build or load failure means "not available"
        reason = (
            f"the C++ extension could not be built or loaded ({build.failure_cause(exc)}); "
            f"set {build.VERBOSE_ENV}=1 for the full build log"
        )
        log.debug("fused_vae extension failed", exc_info=True)
        return ExtensionStatus(False, "", False, False, reason)
    from .registration import register_ops

    register_ops("", python_autograd=False)
    cpu, cuda = _has_kernel("CPU"), _has_kernel("CUDA")
    reason = None
    if not cuda:
        reason = "the extension was built without CUDA kernels (no CUDA device or toolkit at build time)"
    return ExtensionStatus(True, how, cpu, cuda, reason)


class ExtensionBackend:
    """Runs ``torch.ops.fused_vae.<op>_fwd`` on tensors of one device type."""

    def __init__(self, device_type: str) -> None:
        self.name = device_type
        self.device_type = device_type
        self._ops: dict = {}

    def unavailable_reason(self, device_type: str) -> str | None:
        if self.device_type == "cuda" and device_type == "cpu" and cuda_emulation.enabled():
            return cuda_emulation.status().reason
        if self.device_type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is available"
        if device_type != self.device_type:
            return f"it runs on {self.device_type} tensors only"
        st = status()
        if not st.loaded:
            return st.reason
        if not getattr(st, self.device_type):
            return st.reason or f"the extension has no {self.device_type} kernels"
        return None

    def run(self, op: str, *args):
        if self.device_type == "cuda" and args[0].device.type == "cpu":
            return cuda_emulation.run(op, *args)
        fn = self._ops.get(op)
        if fn is None:
            fn = self._ops[op] = getattr(torch.ops.fused_vae, f"{op}_fwd").default
        return fn(*args)

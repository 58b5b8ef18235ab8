"""The emulated CUDA device: the ``cuda`` backend's kernels run on CPU tensors, for tests.

With ``FUSED_VAE_CUDA_EMULATE=1`` the CUDA kernels (csrc/cuda/) and their ATen glue are
compiled as host C++ against csrc/emulate/cuda_emulation.h, which runs the threads of
each block concurrently (one OS thread per CUDA thread), checks barriers, full-mask
shuffles and 16-byte vector alignment, and fills outputs and shared memory with NaN
before the kernels run. The result is a separate JIT extension, ``fused_vae_ext_cuda_emu``,
whose ops ``fused_vae::cuda_emu_<op>_fwd`` / ``_bwd`` take CPU tensors and have the
schemas of ``<op>_fwd`` / ``_bwd`` (every op family of fused_vae/backends/protocol.py).

Like ``TRITON_INTERPRET=1`` this is a test device: slow (thousands of thread switches per
block), built only when the variable is set, and never chosen automatically.
``FUSED_VAE_CUDA_EMULATE_SMS`` (default 2) sets the emulated device's SM count, which
sizes the grids (results do not depend on it).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

import torch

from . import build

log = logging.getLogger(__name__)

ENV_VAR = "FUSED_VAE_CUDA_EMULATE"
EXTENSION_NAME = "fused_vae_ext_cuda_emu"
PREFIX = "cuda_emu_"
# -fno-strict-aliasing: the kernels read torch's storage through their vector types, which
# is how CUDA code is written but an aliasing violation for a host optimiser.
CXX_FLAGS = ["-O2", "-fno-strict-aliasing", "-DFUSED_VAE_CUDA_EMULATE=1"]
# The emulator, the kernels and glue of csrc/cuda/ as host C++, the emulator's self-test.
SOURCE_FILES = ("cuda_emulation.cpp", "emulated_kernels.cpp", "emulated_ops.cpp", "emulator_selftest.cpp")
_lock = threading.Lock()
_status: EmulationStatus | None = None


@dataclass(frozen=True)
class EmulationStatus:
    """Whether the emulated CUDA ops are loaded, and if not, why."""

    loaded: bool
    reason: str | None


def enabled() -> bool:
    """True when ``FUSED_VAE_CUDA_EMULATE=1`` asks for the emulated CUDA device."""
    return os.environ.get(ENV_VAR) == "1"


def sources() -> list[str]:
    """The emulated extension's source files (csrc/emulate/)."""
    emulate = build.csrc_dir() / "emulate"
    return [str(emulate / name) for name in SOURCE_FILES]


def _build() -> None:
    from torch.utils.cpp_extension import load

    root = build.csrc_dir()
    log.warning("fused_vae: building the emulated CUDA extension %s (tests only; cached)", EXTENSION_NAME)
    load(
        name=EXTENSION_NAME,
        sources=sources(),
        extra_include_paths=[str(build.include_dir(root)), str(root / "emulate"), str(root / "cuda")],
        extra_cflags=CXX_FLAGS,
        with_cuda=False,
        is_python_module=False,
        verbose=build.verbose(),
    )


def _ops_defined() -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"fused_vae::{PREFIX}reparam_kl_fwd", "")
        return True
    except RuntimeError:
        return False


def _register() -> None:
    from .registration import register_ops

    register_ops(PREFIX, python_autograd=True)


def status() -> EmulationStatus:
    """Builds and loads the emulated ops on first call when enabled; reports the result.

    Never raises: a build failure is returned as the reason.
    """
    global _status
    if not enabled():
        return EmulationStatus(False, f"the emulated CUDA device is off (set {ENV_VAR}=1 to test on the CPU)")
    if _status is not None:
        return _status
    with _lock:
        if _status is None:
            try:
                if not _ops_defined():
                    _build()
                _register()
                _status = EmulationStatus(True, None)
            except Exception as exc:  # a build failure means "not available", with the reason
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                log.debug("emulated CUDA extension failed", exc_info=True)
                _status = EmulationStatus(False, f"the emulated CUDA extension could not be built ({first[:300]})")
    return _status


def run(op: str, *args):
    """``torch.ops.fused_vae.<op>_fwd`` run by the emulated CUDA kernels (CPU tensors).

    Raises:
        RuntimeError: the emulated extension is not loaded (see :func:`status`), or a
            kernel faulted (the message names the thread, the source line and the fault).
    """
    st = status()
    if not st.loaded:
        raise RuntimeError(st.reason)
    return getattr(torch.ops.fused_vae, f"{PREFIX}{op}_fwd")(*args)

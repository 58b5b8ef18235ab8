"""Loads the compiled C++/CUDA extension that implements ``torch.ops.fused_vae.reparam_kl_*``.

Order: the module built ahead of time by setup.py (``fused_vae._C``), else a JIT build
of csrc/ with ninja (cached by torch under ~/.cache/torch_extensions, or
``TORCH_EXTENSIONS_DIR``). Any failure is recorded, not raised: :func:`status` says why,
and backend selection falls back. Environment:

- ``FUSED_VAE_DISABLE_EXTENSION=1`` skips both (the reference and Triton backends remain);
- ``FUSED_VAE_VERBOSE_BUILD=1`` prints the full compiler output of a JIT build.

Right after the library loads, :func:`fused_vae.backends.registration.register_pair`
gives its ops their fake impls and the backward op its derivative (the forward op's
autograd kernel is C++: csrc/autograd.cpp).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_PACKAGE_DIR = Path(__file__).resolve().parent.parent
# No errno / FP-trap bookkeeping lets the compiler vectorise the math (results unchanged).
# -fopenmp: at::parallel_for is inlined into the extension and needs OpenMP to go parallel.
CXX_FLAGS = ["-O3", "-DNDEBUG", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
# No --use_fast_math: it would flush subnormals and approximate sqrt / division, moving
# the CUDA results off the shared math of the CPU backend (the kernels are memory-bound).
NVCC_FLAGS = ["-O3", "-DNDEBUG", "-lineinfo"]
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


def csrc_dir() -> Path:
    """The C++ sources: packaged copy in a wheel, else the source tree's csrc/."""
    for candidate in (_PACKAGE_DIR / "_csrc", _PACKAGE_DIR.parent / "csrc"):
        if (candidate / "ops.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"fused_vae C++ sources not found next to {_PACKAGE_DIR}")


def sources(with_cuda: bool, root: Path | None = None) -> list[Path]:
    """Source files of the extension (op schemas, autograd, CPU kernels; CUDA when ``with_cuda``)."""
    root = csrc_dir() if root is None else root
    files = [root / "ops.cpp", root / "autograd.cpp", *sorted((root / "cpu").glob("*.cpp"))]
    if with_cuda:
        files += sorted((root / "cuda").glob("*.cu"))
    return files


def _has_kernel(key: str) -> bool:
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key("fused_vae::reparam_kl_fwd", key))


def _ops_defined() -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw("fused_vae::reparam_kl_fwd", "")
        return True
    except RuntimeError:
        return False


def _newest_source_mtime(with_cuda: bool = True) -> float:
    """Newest modification time of the sources (and headers) a build with(out) CUDA compiles."""
    root = csrc_dir()
    files = [*sources(with_cuda, root), *(root / "include").rglob("*.h"), *(root / "cpu").glob("*.h")]
    if with_cuda:
        files += [*(root / "cuda").glob("*.h"), *(root / "cuda").glob("*.cuh")]
    return max(p.stat().st_mtime for p in files)


def _prebuilt_is_stale(library: Path) -> bool:
    """In a source checkout, a library older than any C++ source would run old code."""
    try:
        return _newest_source_mtime() > library.stat().st_mtime
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
        return library.is_file() and library.stat().st_mtime >= _newest_source_mtime(with_cuda)
    except Exception:  # noqa: BLE001 - a private torch helper; unknown means "say we build"
        return False


def _load_jit() -> None:
    from torch.utils.cpp_extension import load

    with_cuda = _cuda_toolkit_present()
    name = "fused_vae_ext_cuda" if with_cuda else "fused_vae_ext_cpu"
    if not _jit_cache_is_warm(name, with_cuda):
        log.warning("fused_vae: building the C++ extension %s (first use only, about 20 s on 2 cores; cached)", name)
    load(
        name=name,
        sources=[str(p) for p in sources(with_cuda)],
        extra_include_paths=[str(csrc_dir() / "include")],
        extra_cflags=CXX_FLAGS,
        extra_ldflags=["-fopenmp"],
        extra_cuda_cflags=NVCC_FLAGS if with_cuda else None,
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=os.environ.get("FUSED_VAE_VERBOSE_BUILD") == "1",
    )


_CAUSE = re.compile(r"(error|not found|No such file|cannot|fatal|undefined reference)", re.IGNORECASE)


def failure_cause(exc: BaseException) -> str:
    """The lines of a build or load failure that say why (compiler errors, a missing tool),
    without the long compiler command lines."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    causes = [ln for ln in lines if _CAUSE.search(ln) and len(ln) < 400 and not ln.startswith("[")]
    picked = causes[-3:] if causes else lines[-1:]
    text = " | ".join(picked) if picked else type(exc).__name__
    return f"{type(exc).__name__}: {text}"


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
    if os.environ.get("FUSED_VAE_DISABLE_EXTENSION") == "1":
        return ExtensionStatus(False, "", False, False, "disabled by FUSED_VAE_DISABLE_EXTENSION=1")
    try:
        if _ops_defined() or _load_prebuilt():
            how = "prebuilt"
        else:
            _load_jit()
            how = "jit"
    except Exception as exc:  # any build or load failure means "not available"
        reason = (
            f"the C++ extension could not be built or loaded ({failure_cause(exc)}); "
            "set FUSED_VAE_VERBOSE_BUILD=1 for the full build log"
        )
        log.debug("fused_vae extension failed", exc_info=True)
        return ExtensionStatus(False, "", False, False, reason)
    from .registration import register_pair

    register_pair("fused_vae::reparam_kl_fwd", "fused_vae::reparam_kl_bwd", python_autograd=False)
    cpu, cuda = _has_kernel("CPU"), _has_kernel("CUDA")
    reason = None
    if not cuda:
        reason = "the extension was built without CUDA kernels (no CUDA device or toolkit at build time)"
    return ExtensionStatus(True, how, cpu, cuda, reason)

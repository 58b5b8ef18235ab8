"""How the C++/CUDA extension is built: sources, compiler flags and the switches, in one place.

Both builds use these: setup.py's ahead-of-time build (which loads this file by path, so
it must import neither torch nor the package) and the JIT build of
:mod:`fused_vae.backends.extension`. Environment:

- ``FUSED_VAE_DISABLE_EXTENSION=1`` skips the extension: setup.py builds none and
  ``import fused_vae`` loads none (the reference and Triton backends remain). The old
  build-time name ``FUSED_VAE_NO_EXTENSION=1`` still works for setup.py, with a warning;
- ``FUSED_VAE_VERBOSE_BUILD=1`` prints the full compiler output of a JIT build.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

DISABLE_ENV = "FUSED_VAE_DISABLE_EXTENSION"
DEPRECATED_BUILD_DISABLE_ENV = "FUSED_VAE_NO_EXTENSION"  # setup.py's former name for it
VERBOSE_ENV = "FUSED_VAE_VERBOSE_BUILD"

# No errno / FP-trap bookkeeping lets the compiler vectorise the math (results unchanged).
# -fopenmp: at::parallel_for is inlined into the extension and needs OpenMP to go parallel.
CXX_FLAGS = ["-O3", "-DNDEBUG", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
LD_FLAGS = ["-fopenmp"]
# No --use_fast_math: it would flush subnormals and approximate sqrt / division, moving
# the CUDA results off the shared math of the CPU backend (the kernels are memory-bound).
NVCC_FLAGS = ["-O3", "-DNDEBUG", "-lineinfo"]

_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def disabled(*, building: bool = False) -> bool:
    """Whether ``FUSED_VAE_DISABLE_EXTENSION=1`` (or, when ``building``, the deprecated
    ``FUSED_VAE_NO_EXTENSION=1``, with a FutureWarning) asks to skip the extension."""
    if os.environ.get(DISABLE_ENV) == "1":
        return True
    if building and os.environ.get(DEPRECATED_BUILD_DISABLE_ENV) == "1":
        warnings.warn(
            f"{DEPRECATED_BUILD_DISABLE_ENV}=1 is deprecated; set {DISABLE_ENV}=1 instead "
            "(one name for building and for loading the extension)",
            FutureWarning,
            stacklevel=2,
        )
        return True
    return False


def verbose() -> bool:
    """Whether ``FUSED_VAE_VERBOSE_BUILD=1`` asks for the full output of JIT builds."""
    return os.environ.get(VERBOSE_ENV) == "1"


def csrc_dir() -> Path:
    """The C++ sources: packaged copy in a wheel, else the source tree's csrc/.

    Raises:
        FileNotFoundError: neither exists.
    """
    for candidate in (_PACKAGE_DIR / "_csrc", _PACKAGE_DIR.parent / "csrc"):
        if (candidate / "ops.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"fused_vae C++ sources not found next to {_PACKAGE_DIR}")


def include_dir(root: Path | None = None) -> Path:
    """The directory of the shared headers (``#include "fused_vae/..."``)."""
    return (csrc_dir() if root is None else root) / "include"


def sources(with_cuda: bool, root: Path | None = None) -> list[Path]:
    """Source files of the extension (op schemas and autograd, CPU kernels; CUDA when ``with_cuda``)."""
    root = csrc_dir() if root is None else root
    files = [root / "ops.cpp", *sorted((root / "cpu").glob("*.cpp"))]
    if with_cuda:
        files += sorted((root / "cuda").glob("*.cu"))
    return files


def newest_source_mtime(with_cuda: bool = True) -> float:
    """Newest modification time of the sources (and headers) a build with(out) CUDA compiles."""
    root = csrc_dir()
    files = [*sources(with_cuda, root), *include_dir(root).rglob("*.h"), *(root / "cpu").glob("*.h")]
    if with_cuda:
        files += [*(root / "cuda").glob("*.h"), *(root / "cuda").glob("*.cuh")]
    return max(p.stat().st_mtime for p in files)


_CAUSE = re.compile(r"(error|not found|No such file|cannot|fatal|undefined reference)", re.IGNORECASE)


def failure_cause(exc: BaseException) -> str:
    """The lines of a build or load failure that say why (compiler errors, a missing tool),
    without the long compiler command lines."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    causes = [ln for ln in lines if _CAUSE.search(ln) and len(ln) < 400 and not ln.startswith("[")]
    picked = causes[-3:] if causes else lines[-1:]
    text = " | ".join(picked) if picked else type(exc).__name__
    return f"{type(exc).__name__}: {text}"

"""The memory allocator settings of a training process (glibc's malloc, Linux).

A training step frees its tensors and allocates the same sizes again. glibc's malloc serves
blocks over its mmap threshold (128 KiB at first, raised as such blocks are freed) with fresh
mappings and returns free memory at the top of its heap to the system once it exceeds the trim
threshold, so a step can land on new pages every time, and each page costs a fault and its
zeroing (README's performance section measures it). :func:`keep_freed_memory` raises both
thresholds so that freed memory is reused instead; the process keeps what its largest step used.
``fused-vae train`` and ``eval`` call it; a program of one's own may.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks up to 32 MiB come from the heap
TRIM_THRESHOLD = 256 << 20  # free memory kept at the top of the heap


def glibc_malloc() -> bool:
    """Whether this process allocates with glibc's malloc (Linux with glibc)."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def user_chose_allocator(env=None) -> str | None:
    """Why the allocator is the user's to set (None when it is not): a malloc setting in
    ``GLIBC_TUNABLES`` or ``MALLOC_*_`` variables, or another allocator in ``LD_PRELOAD``."""
    env = os.environ if env is None else env
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets malloc"
    if any(k in env for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")):
        return "MALLOC_* variables set malloc"
    if any(name in env.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return "LD_PRELOAD loads another allocator"
    return None


def keep_freed_memory() -> bool:
    """Makes glibc's malloc keep freed memory for the next step: blocks up to
    :data:`MMAP_THRESHOLD` from the heap, and up to :data:`TRIM_THRESHOLD` of free memory kept.

    Leaves the allocator alone where it is not glibc's or where :func:`user_chose_allocator`
    says the user set it. Returns whether both settings took effect. Raises nothing.
    """
    if not glibc_malloc() or user_chose_allocator():
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) & bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))

"""Deterministic seeds derived from several integers (training step, micro-batch, ...)."""

from __future__ import annotations

import hashlib
import struct

import torch

from ..philox import philox4x32

_MASK32 = 0xFFFFFFFF
_MASK63 = (1 << 63) - 1


def derive_seed(*parts: int) -> int:
    """A seed in [0, 2**63) that is a fixed function of ``parts`` (ints, any sign/size
    up to 64 bits), the same on every platform and process (BLAKE2b of the packed ints).

    Raises:
        TypeError: a part is not an int.
    """
    h = hashlib.blake2b(digest_size=8, person=b"fused_vae")
    for p in parts:
        if isinstance(p, bool) or not isinstance(p, int):
            raise TypeError(f"derive_seed takes ints, got {type(p).__name__}")
        h.update(struct.pack("<Q", p & 0xFFFFFFFFFFFFFFFF))
    return int.from_bytes(h.digest(), "little") & _MASK63


def counter_seeds(key: int, steps: torch.Tensor, micro_ids: torch.Tensor) -> torch.Tensor:
    """Seeds in [0, 2**63) for (step, micro-batch) pairs, computed on the tensors' device.

    Philox4x32-10 keyed by ``key`` on the counter ``(micro_id, step mod 2**32)``; the seed is
    output words ``(r1 mod 2**31) * 2**32 + r0``. Pure int64 tensor arithmetic without overflow
    (see :mod:`fused_vae.philox`), so it needs no host synchronisation, runs under
    ``torch.compile`` and in a CUDA graph, and gives the same bits on every device.

    Args:
        key: an int in [0, 2**64) (e.g. from :func:`derive_seed`).
        steps, micro_ids: int64 tensors of values in [0, 2**32) that broadcast together.

    Returns:
        An int64 tensor of the broadcast shape.
    """
    r0, r1, _, _ = philox4x32(key, micro_ids & _MASK32, steps & _MASK32)
    return ((r1 & 0x7FFFFFFF) << 32) | r0

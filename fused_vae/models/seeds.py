"""Deterministic seeds derived from several integers (training step, micro-batch, ...)."""

from __future__ import annotations

import hashlib
import struct

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

"""The counter-based noise stream of docs/design.md, written as vectorised tensor code.

This is the reference implementation of the stream: integer steps on int64 tensors that
emulate uint32 arithmetic, so it runs on any device and needs no compiled code.
"""

from __future__ import annotations

import torch

PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
UNIFORM_SCALE = 4.6566127342e-10
TWO_PI = 6.283185307179586
MIN_UNIFORM = 1.0e-7

_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * b for a uint32 constant and uint32-valued int64 b.

    The 64-bit product does not fit a signed int64, so b is split into 16-bit halves.
    """
    p_lo = a * (b & _MASK16)  # < 2**48
    p_hi = a * (b >> 16)  # < 2**48
    mid = p_hi + (p_lo >> 16)
    hi = mid >> 16
    lo = ((mid & _MASK16) << 16) | (p_lo & _MASK16)
    return hi, lo


def philox4x32(seed: int | torch.Tensor, counter_lo: torch.Tensor, counter_hi: torch.Tensor) -> list[torch.Tensor]:
    """Philox4x32-10 on counters (counter_lo, counter_hi, 0, 0) with a 64-bit key.

    Args:
        seed: key as an integer in [0, 2**64) or a 0-d int64 tensor holding its bits.
        counter_lo, counter_hi: int64 tensors holding uint32 values, same shape.

    Returns:
        The four output words r0..r3 as int64 tensors holding uint32 values.
    """
    c0 = counter_lo
    c1 = counter_hi
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo32(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return [c0, c1, c2, c3]


def _uniform(r: torch.Tensor) -> torch.Tensor:
    x = torch.where(r >= 2**31, r - 2**32, r)  # reinterpret as int32
    x = torch.where(x < 0, -x - 1, x)  # ~x
    return x.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def _box_muller(ua: torch.Tensor, ub: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ua = torch.clamp_min(ua, MIN_UNIFORM)
    rad = torch.sqrt(-2.0 * torch.log(ua))
    th = torch.tensor(TWO_PI, dtype=torch.float32) * ub
    return rad * torch.cos(th), rad * torch.sin(th)


def normal_stream(seed: int | torch.Tensor, offset: int, numel: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Elements [0, numel) of the standard-normal stream of ``seed`` as float32.

    Element i comes from Philox group ``offset + i // 4``, lane ``i % 4``.

    Args:
        seed: integer in [0, 2**64), or a 0-d int64 tensor holding its 64 bits (on
            ``device``; never read back to the host).
        offset: first Philox group, integer in [0, 2**64).
        numel: number of elements (>= 0).
        device: where to compute and return the result.

    Returns:
        A 1-D float32 tensor of ``numel`` normals.
    """
    ngroups = (numel + 3) // 4
    g = torch.arange(ngroups, dtype=torch.int64, device=device)
    # group = offset + g as a uint64 split into two uint32 words, without int64 overflow
    off_lo = offset & _MASK32
    off_hi = (offset >> 32) & _MASK32
    lo_sum = g + off_lo
    counter_lo = lo_sum & _MASK32
    counter_hi = ((lo_sum >> 32) + off_hi) & _MASK32
    r0, r1, r2, r3 = philox4x32(seed, counter_lo, counter_hi)
    n0, n1 = _box_muller(_uniform(r0), _uniform(r1))
    n2, n3 = _box_muller(_uniform(r2), _uniform(r3))
    return torch.stack([n0, n1, n2, n3], dim=1).reshape(-1)[:numel]

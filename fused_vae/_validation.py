"""Argument checks of the public functions (docs/design.md, "Errors"). Every error names the argument."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from .backends.protocol import LOGQ_MODES, LOGQ_SKIP, REDUCTION_MODES, SUPPORTED_DTYPES, unsupported_dtype

SEED_MAX = 2**64


def check_tensors(*named: tuple[str, object]) -> None:
    """Checks that ``(name, tensor)`` pairs are tensors of one supported dtype, shape and
    device (the first is the reference the others must match).

    Raises:
        TypeError: a non-tensor, an unsupported dtype, or differing dtypes.
        ValueError: a 0-d tensor, differing shapes or differing devices.
    """
    ref_name, ref = named[0]
    if type(ref) is torch.Tensor and ref.dtype in SUPPORTED_DTYPES and ref.dim() >= 1 and all(
        type(t) is torch.Tensor and t.dtype == ref.dtype and t.shape == ref.shape and t.device == ref.device
        for _, t in named[1:]
    ):  # the common case in one expression; any mistake takes the path below for its message
        return
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise unsupported_dtype(name, t.dtype)
        if t.dim() < 1:
            raise ValueError(f"{name} must be at least 1-D with the batch first ([B, ...]), got a 0-d tensor")
    assert isinstance(ref, torch.Tensor)
    for name, t in named[1:]:
        assert isinstance(t, torch.Tensor)
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} dtype {t.dtype} must match {ref_name} dtype {ref.dtype}")
        if t.shape != ref.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must match {ref_name} shape {tuple(ref.shape)}")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must be on one device")


def check_pair(mu: object, logvar: object) -> None:
    """:func:`check_tensors` of a posterior's ``mu`` and ``logvar``."""
    check_tensors(("mu", mu), ("logvar", logvar))


def check_prior(prior: object, mu: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(prior_mu, prior_logvar)`` of a ``prior`` argument: ``(None, None)`` for None (N(0, I)).

    Raises:
        TypeError: not None or a pair of tensors; a dtype other than mu's.
        ValueError: a shape or device other than mu's.
    """
    if prior is None:
        return None, None
    if isinstance(prior, torch.Tensor) or not isinstance(prior, Sequence) or len(prior) != 2:
        raise TypeError(f"prior must be None or a pair (prior_mu, prior_logvar) of tensors, got {type(prior).__name__}")
    prior_mu, prior_logvar = prior
    check_tensors(("mu", mu), ("prior_mu", prior_mu), ("prior_logvar", prior_logvar))
    return prior_mu, prior_logvar


def reduction_mode(reduction: object) -> int:
    """The op's reduction mode for a public ``reduction`` name.

    Raises:
        ValueError: reduction is not one of 'none', 'per_sample', 'sum', 'batchmean'.
    """
    if not isinstance(reduction, str) or reduction not in REDUCTION_MODES:
        names = ", ".join(repr(k) for k in REDUCTION_MODES)
        raise ValueError(f"reduction must be one of {names}, got {reduction!r}")
    return REDUCTION_MODES[reduction]


def logq_mode(log_density: object, path_gradient: object) -> int:
    """The sampling op's log-density mode for :func:`fused_vae.sample_gaussian`'s arguments.

    Raises:
        ValueError: log_density is not None, 'q' or 'ratio'.
        TypeError: path_gradient is not a bool.
    """
    if not isinstance(path_gradient, bool):
        raise TypeError(f"path_gradient must be a bool, got {type(path_gradient).__name__}")
    if log_density is None:
        return LOGQ_SKIP
    mode = LOGQ_MODES.get((log_density, path_gradient)) if isinstance(log_density, str) else None
    if mode is None:
        raise ValueError(f"log_density must be None, 'q' or 'ratio', got {log_density!r}")
    return mode


def check_num_samples(num_samples: object) -> int:
    """Number of samples the op draws: 1 for None, else an int >= 1.

    Raises:
        TypeError: num_samples is not an int (or is a bool).
        ValueError: num_samples < 1.
    """
    if num_samples is None:
        return 1
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise TypeError(f"num_samples must be None or an int >= 1, got {type(num_samples).__name__}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be None or an int >= 1, got {num_samples}")
    return int(num_samples)


def check_clamp(logvar_clamp: object) -> tuple[float | None, float | None]:
    """(lo, hi) bounds of logvar_clamp; either may be None for a one-sided clamp.

    Raises:
        TypeError: not None and not a pair of numbers.
        ValueError: a NaN bound, or lo > hi.
    """
    if logvar_clamp is None:
        return None, None
    if isinstance(logvar_clamp, (str, bytes)) or not isinstance(logvar_clamp, Sequence) or len(logvar_clamp) != 2:
        raise TypeError(f"logvar_clamp must be None or a pair (lo, hi), got {logvar_clamp!r}")
    bounds = []
    for which, v in zip(("lo", "hi"), logvar_clamp):
        if v is None:
            bounds.append(None)
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"logvar_clamp {which} must be a real number or None, got {v!r}")
        if math.isnan(v):
            raise ValueError(f"logvar_clamp {which} must not be NaN")
        bounds.append(float(v))
    lo, hi = bounds
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"logvar_clamp must have lo <= hi, got ({lo}, {hi})")
    return lo, hi


def check_seed_int(seed: object, name: str = "seed") -> int:
    """A Python integer seed or offset in [0, 2**64).

    Raises:
        TypeError: not an int (bools are refused).
        ValueError: out of range.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int in [0, 2**64) or a one-element int64 tensor, got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < SEED_MAX:
        raise ValueError(f"{name} must be in [0, 2**64), got {seed}")
    return seed


def draw_seed(device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random seed as a 0-d int64 tensor on ``device``, drawn from ``generator`` (default:
    torch's default generator of ``device``) on that device: no host-device
    synchronisation, CUDA-graph safe."""
    return torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64, device=device, generator=generator)


def seed_tensor(seed: object, device: torch.device) -> torch.Tensor:
    """The seed as a 0-d int64 tensor on ``device``, the form the ops take.

    ``None`` draws one with :func:`draw_seed`. An int in [0, 2**64) is stored with
    the same 64 bits. A one-element int64 tensor is used as given.

    Raises:
        TypeError / ValueError: as :func:`check_seed_int`, or a tensor that is not one
        int64 element.
    """
    if seed is None:
        return draw_seed(device)
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError(f"seed tensor must hold one int64 element, got dtype {seed.dtype} with {seed.numel()} elements")
        if seed.dim() == 0 and seed.device == device:
            return seed
        return seed.reshape(()).to(device)
    value = check_seed_int(seed)
    signed = value - SEED_MAX if value >= 2**63 else value
    return torch.full((), signed, dtype=torch.int64, device=device)


def check_shape(shape: object) -> tuple[int, ...]:
    """A shape given as an int or a sequence of non-negative ints.

    Raises:
        TypeError: not an int or a sequence of ints.
        ValueError: a negative size.
    """
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (Sequence, torch.Size)) or isinstance(shape, (str, bytes)):
        raise TypeError(f"shape must be an int or a sequence of ints, got {type(shape).__name__}")
    out = []
    for s in shape:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise TypeError(f"shape must contain ints, got {s!r}")
        if s < 0:
            raise ValueError(f"shape must contain non-negative sizes, got {tuple(shape)}")
        out.append(int(s))
    return tuple(out)

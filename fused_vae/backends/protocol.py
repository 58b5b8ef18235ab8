"""The fused ops' internal protocol, written once for every backend (docs/design.md, "Op protocol").

Every backend implements two ops with the schemas below (the C++ ones are declared in
csrc/ops.cpp, whose text a test compares with these strings):

``*_fwd(mu, logvar, seed, num_samples, kl_mode, clamp_lo, clamp_hi) -> (z, kl)`` and
``*_bwd(grad_z, grad_kl, mu, logvar, seed, num_samples, kl_mode, clamp_lo, clamp_hi)
-> (grad_mu, grad_logvar)``.

This module holds what they share: the KL modes, the math dtype, the output shapes and
dtypes, the values of empty reductions, and the argument checks with their messages
(the C++ checks in csrc/include/fused_vae/op_common.h raise the same types and texts).
"""

from __future__ import annotations

import torch

FWD_SCHEMA = (
    "(Tensor mu, Tensor logvar, Tensor seed, int num_samples, int kl_mode, "
    "float? clamp_lo, float? clamp_hi) -> (Tensor, Tensor)"
)
BWD_SCHEMA = (
    "(Tensor? grad_z, Tensor? grad_kl, Tensor mu, Tensor logvar, Tensor seed, int num_samples, "
    "int kl_mode, float? clamp_lo, float? clamp_hi) -> (Tensor, Tensor)"
)

# KL modes (enum KlMode in csrc/include/fused_vae/elementwise.h has the same numbers).
KL_SKIP = 0  # no KL output (reparameterize)
KL_ELEMENTWISE = 1  # reduction "none": per element, mu's shape and dtype
KL_PER_SAMPLE = 2  # [B], accumulation dtype
KL_SUM = 3  # scalar, accumulation dtype
KL_BATCHMEAN = 4  # scalar sum / B, accumulation dtype
KL_MODES = {"none": KL_ELEMENTWISE, "per_sample": KL_PER_SAMPLE, "sum": KL_SUM, "batchmean": KL_BATCHMEAN}

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_DTYPE_NAMES = [str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES]


def unsupported_dtype(name: str, dtype: object) -> TypeError:
    """The error for a dtype outside SUPPORTED_DTYPES: "NAME must be float32, float64,
    float16 or bfloat16, got DTYPE" (check_common in op_common.h writes the same text)."""
    return TypeError(f"{name} must be {', '.join(_DTYPE_NAMES[:-1])} or {_DTYPE_NAMES[-1]}, got {dtype}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Math and reduced-KL dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_reduced(kl_mode: int) -> bool:
    """Whether the KL output is a sum over elements (per_sample, sum, batchmean)."""
    return kl_mode >= KL_PER_SAMPLE


def kl_divisor(kl_mode: int, batch: int) -> float:
    """What the summed KL is divided by: B for batchmean, else 1."""
    return float(batch) if kl_mode == KL_BATCHMEAN else 1.0


def empty_kl_value(kl_mode: int, batch: int) -> float:
    """The reduced KL of an input without elements: 0, or NaN (0/0) for batchmean of B = 0."""
    return float("nan") if kl_mode == KL_BATCHMEAN and batch == 0 else 0.0


def grad_kl_numel(kl_mode: int, mu: torch.Tensor) -> int:
    """Number of elements the KL output (and so grad_kl) has for ``kl_mode``."""
    if kl_mode == KL_ELEMENTWISE:
        return mu.numel()
    if kl_mode == KL_PER_SAMPLE:
        return mu.shape[0]
    return 1


def grad_kl_dtype(kl_mode: int, dtype: torch.dtype) -> torch.dtype:
    """dtype of the KL output (and so grad_kl): mu's for "none", else the accumulation dtype."""
    return dtype if kl_mode == KL_ELEMENTWISE else acc_dtype(dtype)


def alloc_outputs(mu: torch.Tensor, num_samples: int, kl_mode: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised (z, kl) of a forward op: z ``[num_samples, *mu.shape]`` contiguous (or
    ``[0]``), kl per ``kl_mode``: ``mu.shape``, ``[B]``, ``[]`` or ``[0]`` when skipped."""
    z = mu.new_empty((num_samples, *mu.shape)) if num_samples > 0 else mu.new_empty(0)
    if kl_mode == KL_ELEMENTWISE:
        kl = mu.new_empty(mu.shape)
    elif kl_mode == KL_PER_SAMPLE:
        kl = mu.new_empty(mu.shape[0], dtype=acc_dtype(mu.dtype))
    elif kl_mode in (KL_SUM, KL_BATCHMEAN):
        kl = mu.new_empty((), dtype=acc_dtype(mu.dtype))
    else:
        kl = mu.new_empty(0)
    return z, kl


def alloc_grads(mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised contiguous (grad_mu, grad_logvar) of a backward op."""
    return mu.new_empty(mu.shape), mu.new_empty(mu.shape)


def _sizes(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_fwd_args(mu: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor, num_samples: int, kl_mode: int) -> None:
    """The forward op's argument checks (same types and messages as the C++ ``check_common``).

    Raises:
        TypeError: unsupported or differing dtypes, a seed that is not one int64 element.
        ValueError: a 0-d mu, differing shapes, devices other than mu's, num_samples < 0,
            kl_mode outside [0, 4].
    """
    if mu.dim() < 1:
        raise ValueError(f"fused_vae: mu must be at least 1-D, got {mu.dim()}-D")
    if logvar.shape != mu.shape:
        raise ValueError(f"fused_vae: logvar shape {_sizes(logvar)} must equal mu shape {_sizes(mu)}")
    if mu.dtype not in SUPPORTED_DTYPES:
        raise unsupported_dtype("fused_vae: mu", mu.dtype)
    if logvar.dtype != mu.dtype:
        raise TypeError(f"fused_vae: logvar dtype {logvar.dtype} must equal mu dtype {mu.dtype}")
    if logvar.device != mu.device:
        raise ValueError(f"fused_vae: logvar is on {logvar.device} but mu is on {mu.device}")
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise TypeError("fused_vae: seed must be a one-element int64 tensor")
    if seed.device != mu.device:
        raise ValueError(f"fused_vae: seed is on {seed.device} but mu is on {mu.device}")
    if num_samples < 0:
        raise ValueError(f"fused_vae: num_samples must be >= 0, got {num_samples}")
    if not KL_SKIP <= kl_mode <= KL_BATCHMEAN:
        raise ValueError(f"fused_vae: kl_mode must be in [0, 4], got {kl_mode}")


def check_bwd_args(grad_z, grad_kl, mu, logvar, seed, num_samples: int, kl_mode: int) -> None:
    """The backward op's argument checks (same types and messages as the C++ ``check_grads``).

    Raises:
        TypeError / ValueError: as :func:`check_fwd_args`; a gradient with the wrong number
        of elements, dtype or device, or given for an output the forward did not make.
    """
    check_fwd_args(mu, logvar, seed, num_samples, kl_mode)
    if grad_z is not None:
        if num_samples == 0:
            raise ValueError("fused_vae: grad_z given but num_samples is 0")
        if grad_z.numel() != num_samples * mu.numel():
            raise ValueError(
                f"fused_vae: grad_z must have num_samples * mu.numel() = {num_samples * mu.numel()} "
                f"elements, got {grad_z.numel()}"
            )
        if grad_z.dtype != mu.dtype:
            raise TypeError(f"fused_vae: grad_z dtype {grad_z.dtype} must equal mu dtype {mu.dtype}")
        if grad_z.device != mu.device:
            raise ValueError(f"fused_vae: grad_z is on {grad_z.device} but mu is on {mu.device}")
    if grad_kl is not None:
        if kl_mode == KL_SKIP:
            raise ValueError("fused_vae: grad_kl given but kl_mode is 0")
        expected = grad_kl_numel(kl_mode, mu)
        if grad_kl.numel() != expected:
            raise ValueError(f"fused_vae: grad_kl must have {expected} elements, got {grad_kl.numel()}")
        want = grad_kl_dtype(kl_mode, mu.dtype)
        if grad_kl.dtype != want:
            raise TypeError(f"fused_vae: grad_kl dtype {grad_kl.dtype} must be {want}")
        if grad_kl.device != mu.device:
            raise ValueError(f"fused_vae: grad_kl is on {grad_kl.device} but mu is on {mu.device}")

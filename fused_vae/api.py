"""The public functions of fused_vae (see DESIGN.md for the full contract)."""

from __future__ import annotations

import torch

from . import _validation as V
from . import backends as _backends
from .philox import normal_stream


def _sample(mu, logvar, seed, num_samples, kl_mode, logvar_clamp, backend):
    V.check_pair(mu, logvar)
    samples = V.check_num_samples(num_samples)
    lo, hi = V.check_clamp(logvar_clamp)
    impl = _backends.resolve(backend, mu.device)
    return impl.reparam_kl(mu, logvar, V.seed_tensor(seed, mu.device), samples, kl_mode, lo, hi)


def _shape_z(z: torch.Tensor, mu: torch.Tensor, num_samples: int | None) -> torch.Tensor:
    return z.view(mu.shape) if num_samples is None else z


def reparameterize_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    reduction: str = "batchmean",
    seed: int | torch.Tensor | None = None,
    num_samples: int | None = None,
    logvar_clamp: tuple[float | None, float | None] | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples ``z = mu + exp(0.5*logvar) * eps`` and the KL to N(0, I) in one fused pass.

    Args:
        mu, logvar: ``[B, ...]`` tensors of one shape, dtype (float32, float64, float16,
            bfloat16) and device; any strides.
        reduction: ``"none"`` (KL per element, mu's shape and dtype), ``"per_sample"``
            (``[B]``), ``"sum"`` or ``"batchmean"`` (scalar, sum / B). Reduced KL is float32
            (float64 for float64 inputs).
        seed: None draws from torch's default generator of the tensors' device; an int in
            [0, 2**64) or a one-element int64 tensor selects the noise stream.
        num_samples: None for ``z`` of mu's shape; an int >= 1 for ``[num_samples, *mu.shape]``.
        logvar_clamp: ``(lo, hi)`` clamps logvar before use (zero gradient outside);
            either bound may be None.
        backend: "cpu", "cuda", "triton", "reference" or None (automatic).

    Returns:
        ``(z, kl)``; both are differentiable with respect to mu and logvar.

    Raises:
        TypeError: non-tensor inputs, unsupported or differing dtypes, bad seed type.
        ValueError: differing shapes or devices, 0-d inputs, bad reduction,
            num_samples < 1, bad logvar_clamp, unknown or unavailable backend.
    """
    mode = V.kl_mode(reduction)
    z, kl = _sample(mu, logvar, seed, num_samples, mode, logvar_clamp, backend)
    return _shape_z(z, mu, num_samples), kl


def reparameterize(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    seed: int | torch.Tensor | None = None,
    num_samples: int | None = None,
    logvar_clamp: tuple[float | None, float | None] | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Samples ``z = mu + exp(0.5*logvar) * eps`` without computing the KL.

    Arguments, return shape and errors are those of :func:`reparameterize_kl`.
    """
    z, _ = _sample(mu, logvar, seed, num_samples, V.KL_SKIP, logvar_clamp, backend)
    return _shape_z(z, mu, num_samples)


def gaussian_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    reduction: str = "batchmean",
    logvar_clamp: tuple[float | None, float | None] | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) with the reductions of :func:`reparameterize_kl`.

    Per element ``0.5 * (mu^2 + exp(logvar) - logvar - 1)``; differentiable.
    Errors are those of :func:`reparameterize_kl`.
    """
    mode = V.kl_mode(reduction)
    V.check_pair(mu, logvar)
    lo, hi = V.check_clamp(logvar_clamp)
    impl = _backends.resolve(backend, mu.device)
    seed_t = torch.zeros((), dtype=torch.int64, device=mu.device)
    _, kl = impl.reparam_kl(mu, logvar, seed_t, 0, mode, lo, hi)
    return kl


def standard_normal(
    shape: int | tuple[int, ...] | torch.Size,
    seed: int | torch.Tensor,
    *,
    offset: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The noise stream itself: the eps every backend uses for ``seed``.

    Element i (row-major) is lane ``i % 4`` of Philox group ``offset + i // 4``, made in
    float32 and converted to ``dtype``. ``reparameterize(mu, logvar, seed=s)`` equals
    ``mu + exp(0.5*logvar) * standard_normal(mu.shape, s)`` (to float rounding).

    Args:
        shape: output shape.
        seed: int in [0, 2**64) or a one-element int64 tensor.
        offset: first Philox group, int in [0, 2**64).
        device: output device (default: torch's default device).
        dtype: a floating dtype (float32, float64, float16, bfloat16).

    Raises:
        TypeError: bad shape, seed, offset or dtype types.
        ValueError: negative sizes, seed or offset out of range.
    """
    dims = V.check_shape(shape)
    if dtype not in V.SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be float32, float64, float16 or bfloat16, got {dtype}")
    offset = V.check_seed_int(offset, "offset")
    dev = torch.device(device) if device is not None else torch.empty(0).device
    seed_t = V.seed_tensor(seed, dev) if seed is not None else None
    if seed_t is None:
        raise TypeError("seed must be an int in [0, 2**64) or a one-element int64 tensor, got None")
    numel = 1
    for d in dims:
        numel *= d
    return normal_stream(seed_t, offset, numel, device=dev).to(dtype).reshape(dims)

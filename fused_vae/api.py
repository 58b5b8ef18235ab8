"""The public functions of fused_vae (docs/design.md is the full contract).

Reverse-mode autograd runs the fused forward and backward ops of the chosen backend.
Under forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp`` / ``jacfwd``)
and the other torch.func transforms (``grad``, ``vjp``, ``jacrev``, ``hessian``,
``vmap``) the functions compute the same math with differentiable PyTorch operations
(the reference backend's form, eps from the same seed's stream), so every mode gets the
same values, to float rounding, and exact derivatives.
"""

from __future__ import annotations

import torch
from torch.autograd import forward_ad as _forward_ad

from . import _validation as V
from . import backends as _backends
from .backends import protocol as P
from .backends.reference import forward_from_eps
from .backends.reference import noise as reference_noise
from .philox import normal_stream

_maybe_functorch_level = torch._C._functorch.maybe_current_level
_kl_seeds: dict[torch.device, torch.Tensor] = {}


def _transform_active() -> bool:
    """Whether forward-mode AD or a torch.func transform is running (eager only)."""
    if torch.compiler.is_compiling():
        return False
    return _forward_ad._current_level >= 0 or _maybe_functorch_level() is not None


def _run(mu, logvar, seed, num_samples, kl_mode, logvar_clamp, backend):
    """Checks the arguments and runs the op; z is ``[S, *mu.shape]`` (``[0]`` for S = 0)."""
    V.check_pair(mu, logvar)
    lo, hi = (None, None) if logvar_clamp is None else V.check_clamp(logvar_clamp)
    device = mu.device
    impl = _backends.resolve(backend, device)
    if num_samples == 0:  # gaussian_kl: the op takes a seed it does not read
        seed_t = _kl_seeds.get(device)
        if seed_t is None:
            seed_t = _kl_seeds[device] = torch.zeros((), dtype=torch.int64, device=device)
    else:
        seed_t = V.seed_tensor(seed, device)
    if _transform_active():
        eps = reference_noise(mu, seed_t, num_samples) if num_samples > 0 else None
        return forward_from_eps(mu, logvar, eps, kl_mode, lo, hi)
    return impl.reparam_kl(mu, logvar, seed_t, num_samples, kl_mode, lo, hi)


def _kl_mode(reduction: object) -> int:
    mode = P.KL_MODES.get(reduction) if isinstance(reduction, str) else None
    return V.kl_mode(reduction) if mode is None else mode


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
    samples = 1 if num_samples is None else V.check_num_samples(num_samples)
    z, kl = _run(mu, logvar, seed, samples, _kl_mode(reduction), logvar_clamp, backend)
    return (z.squeeze(0) if num_samples is None else z), kl


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
    samples = 1 if num_samples is None else V.check_num_samples(num_samples)
    z, _ = _run(mu, logvar, seed, samples, P.KL_SKIP, logvar_clamp, backend)
    return z.squeeze(0) if num_samples is None else z


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
    _, kl = _run(mu, logvar, None, 0, _kl_mode(reduction), logvar_clamp, backend)
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
        raise P.unsupported_dtype("dtype", dtype)
    offset = V.check_seed_int(offset, "offset")
    dev = torch.device(device) if device is not None else torch.empty(0).device
    seed_t = V.seed_tensor(seed, dev) if seed is not None else None
    if seed_t is None:
        raise TypeError("seed must be an int in [0, 2**64) or a one-element int64 tensor, got None")
    numel = 1
    for d in dims:
        numel *= d
    return normal_stream(seed_t, offset, numel, device=dev).to(dtype).reshape(dims)

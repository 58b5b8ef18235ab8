"""The public functions of fused_vae (docs/design.md is the full contract).

Reverse-mode autograd runs the fused forward and backward ops of the chosen backend.
Under forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp`` / ``jacfwd``)
and the other torch.func transforms (``grad``, ``vjp``, ``jacrev``, ``hessian``,
``vmap``) the functions compute the same math with differentiable PyTorch operations
(the reference backend's form, eps from the same seed's stream), so every mode gets the
same values, to float rounding, and exact derivatives.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd import forward_ad as _forward_ad

from . import _validation as V
from . import backends as _backends
from .backends import protocol as P
from .backends.reference import noise as reference_noise
from .philox import normal_stream

_maybe_functorch_level = torch._C._functorch.maybe_current_level
_unused_seeds: dict[torch.device, torch.Tensor] = {}

Prior = tuple[torch.Tensor, torch.Tensor]


class GaussianSample(NamedTuple):
    """What :func:`sample_gaussian` returns; a field is None where it was not asked for."""

    z: torch.Tensor
    kl: torch.Tensor | None
    log_density: torch.Tensor | None


def _transform_active() -> bool:
    """Whether forward-mode AD or a torch.func transform is running (eager only)."""
    if torch.compiler.is_compiling():
        return False
    return _forward_ad._current_level >= 0 or _maybe_functorch_level() is not None


def _unused_seed(device: torch.device) -> torch.Tensor:
    """The seed tensor of a call that draws no sample (the op takes a seed it does not read)."""
    seed_t = _unused_seeds.get(device)
    if seed_t is None:
        seed_t = _unused_seeds[device] = torch.zeros((), dtype=torch.int64, device=device)
    return seed_t


def _run(op: str, inputs: tuple, params: tuple, backend):
    """Runs the forward op ``op`` (protocol.py) on checked arguments: the chosen backend's
    fused op, or its composite form while a transform is active."""
    if _transform_active():
        spec = P.OPS[op]
        noise = spec.noise(reference_noise, inputs, params) if spec.noise is not None else None
        return spec.pack(spec.composite(inputs, noise, params))
    return _backends.resolve(backend, inputs[0].device).run(op, *inputs, *params)


def _sample(mu, logvar, prior, seed, num_samples, kl_mode, logq_mode, logvar_clamp, backend):
    """Checks the arguments and runs the sampling op: ``(z [S, *mu.shape] or [0], kl, logq)``."""
    V.check_pair(mu, logvar)
    prior_mu, prior_logvar = V.check_prior(prior, mu)
    lo, hi = V.check_clamp(logvar_clamp)
    device = mu.device
    seed_t = _unused_seed(device) if num_samples == 0 else V.seed_tensor(seed, device)
    return _run("reparam_kl", (mu, logvar, prior_mu, prior_logvar),
                (seed_t, num_samples, kl_mode, logq_mode, lo, hi), backend)  # fmt: skip


def _reduction_mode(reduction: object) -> int:
    mode = P.REDUCTION_MODES.get(reduction) if isinstance(reduction, str) else None
    return V.reduction_mode(reduction) if mode is None else mode


def reparameterize_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    prior: Prior | None = None,
    reduction: str = "batchmean",
    seed: int | torch.Tensor | None = None,
    num_samples: int | None = None,
    logvar_clamp: tuple[float | None, float | None] | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples ``z = mu + exp(0.5*logvar) * eps`` and the KL to the prior in one fused pass.

    Args:
        mu, logvar: ``[B, ...]`` tensors of one shape, dtype (float32, float64, float16,
            bfloat16) and device; any strides.
        prior: None for N(0, I), or ``(prior_mu, prior_logvar)``: a learned diagonal
            Gaussian prior, tensors of mu's shape, dtype and device (any strides).
        reduction: ``"none"`` (KL per element, mu's shape and dtype), ``"per_sample"``
            (``[B]``), ``"sum"`` or ``"batchmean"`` (scalar, sum / B). Reduced KL is float32
            (float64 for float64 inputs).
        seed: None draws from torch's default generator of the tensors' device; an int in
            [0, 2**64) or a one-element int64 tensor selects the noise stream.
        num_samples: None for ``z`` of mu's shape; an int >= 1 for ``[num_samples, *mu.shape]``.
        logvar_clamp: ``(lo, hi)`` clamps logvar (and prior_logvar) before use, zero
            gradient outside; either bound may be None.
        backend: "cpu", "cuda", "triton", "reference" or None (automatic).

    Returns:
        ``(z, kl)``; both are differentiable with respect to mu, logvar and the prior.

    Raises:
        TypeError: non-tensor inputs, unsupported or differing dtypes, a bad prior or seed type.
        ValueError: differing shapes or devices, 0-d inputs, bad reduction,
            num_samples < 1, bad logvar_clamp, unknown or unavailable backend.
    """
    samples = V.check_num_samples(num_samples)
    z, kl, _ = _sample(mu, logvar, prior, seed, samples, _reduction_mode(reduction), P.LOGQ_SKIP, logvar_clamp,
                       backend)  # fmt: skip
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
    samples = V.check_num_samples(num_samples)
    z, _, _ = _sample(mu, logvar, None, seed, samples, P.REDUCE_SKIP, P.LOGQ_SKIP, logvar_clamp, backend)
    return z.squeeze(0) if num_samples is None else z


def gaussian_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    prior: Prior | None = None,
    reduction: str = "batchmean",
    logvar_clamp: tuple[float | None, float | None] | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || prior) with the reductions of :func:`reparameterize_kl`.

    Per element ``0.5 * (mu^2 + exp(logvar) - logvar - 1)`` for the N(0, I) prior, and
    ``0.5 * (prior_logvar - logvar + (exp(logvar) + (mu - prior_mu)^2) * exp(-prior_logvar) - 1)``
    for ``prior=(prior_mu, prior_logvar)``; differentiable in every input.
    Errors are those of :func:`reparameterize_kl`.
    """
    _, kl, _ = _sample(mu, logvar, prior, None, 0, _reduction_mode(reduction), P.LOGQ_SKIP, logvar_clamp, backend)
    return kl


def sample_gaussian(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    prior: Prior | None = None,
    num_samples: int | None = None,
    kl: str | None = None,
    log_density: str | None = None,
    path_gradient: bool = False,
    seed: int | torch.Tensor | None = None,
    logvar_clamp: tuple[float | None, float | None] | None = None,
    backend: str | None = None,
) -> GaussianSample:
    """Samples ``z ~ q = N(mu, exp(logvar))`` with any of its Gaussian terms, in one fused pass.

    Args:
        mu, logvar, prior, num_samples, seed, logvar_clamp, backend: as
            :func:`reparameterize_kl`.
        kl: None for no KL, or a reduction of :func:`reparameterize_kl` for KL(q || prior).
        log_density: None; ``"q"`` for ``log q(z|x)`` of each sample; ``"ratio"`` for
            ``log q(z|x) - log p(z)`` (p the prior; N(0, I) without one), the terms of an
            importance weight. Summed over every non-batch dim: ``[B]``, or
            ``[num_samples, B]`` with num_samples; float32 (float64 for float64 inputs),
            computed from the kernel's own noise.
        path_gradient: False: the log density's gradient is its total derivative as a
            function of mu, logvar (and the prior) through the sample; True: q's
            parameters are held constant inside log q (the path derivative of "sticking
            the landing", Roeder et al. 2017), which changes the gradient, not the value.

    Returns:
        ``GaussianSample(z, kl, log_density)``; ``kl`` and ``log_density`` are None where not
        asked for. Every output is differentiable in mu, logvar and the prior.

    Raises:
        TypeError / ValueError: as :func:`reparameterize_kl`; a log_density other than None,
            "q" or "ratio"; path_gradient that is not a bool.
    """
    samples = V.check_num_samples(num_samples)
    kl_mode = P.REDUCE_SKIP if kl is None else _reduction_mode(kl)
    logq_mode = V.logq_mode(log_density, path_gradient)
    z, kl_out, logq = _sample(mu, logvar, prior, seed, samples, kl_mode, logq_mode, logvar_clamp, backend)
    if num_samples is None:
        z = z.squeeze(0)
        logq = logq.squeeze(0)
    return GaussianSample(z, kl_out if kl is not None else None, logq if log_density is not None else None)


def gaussian_log_prob(
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    reduction: str = "per_sample",
    logvar_clamp: tuple[float | None, float | None] | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``log N(x; mu, exp(logvar))`` of a given tensor, in one fused pass each way.

    Per element ``-0.5 * (x - mu)^2 * exp(-logvar) - 0.5 * logvar - 0.5 * log(2 pi)``.

    Args:
        x, mu, logvar: ``[B, ...]`` tensors of one shape, dtype (float32, float64,
            float16, bfloat16) and device; any strides.
        reduction: ``"per_sample"`` (default: ``[B]``, summed over every non-batch dim),
            ``"none"`` (per element, x's shape and dtype), ``"sum"`` or ``"batchmean"``
            (scalar, sum / B). Reduced values are float32 (float64 for float64 inputs).
        logvar_clamp: ``(lo, hi)`` clamps logvar before use (zero gradient outside).
        backend: as :func:`reparameterize_kl`.

    Returns:
        The log density, differentiable in x, mu and logvar.

    Raises:
        TypeError: non-tensors, unsupported or differing dtypes.
        ValueError: differing shapes or devices, 0-d inputs, bad reduction or
            logvar_clamp, unknown or unavailable backend.
    """
    V.check_tensors(("x", x), ("mu", mu), ("logvar", logvar))
    lo, hi = V.check_clamp(logvar_clamp)
    return _run("gaussian_log_prob", (x, mu, logvar), (_reduction_mode(reduction), lo, hi), backend)


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

"""The fused ops' internal protocol, written once for every backend (docs/design.md section 8).

Every op family is one row of :data:`OPS`, an :class:`OpSpec`: its differentiable tensor
inputs, its other parameters and its outputs. From the row come the forward and backward
schemas (the C++ ones in csrc/include/fused_vae/schemas.h are compared with them by a
test), the argument checks with their messages (csrc/include/fused_vae/op_common.h raises
the same types and texts), the output allocation (the fake impls use it), which outputs a
call leaves out, and the composite (plain PyTorch) math that the reference backend, the
torch.func path and the higher derivatives run (fused_vae/backends/reference.py). Every
backend implements, per row, ``<prefix><name>_fwd`` and ``<prefix><name>_bwd``:

``*_fwd(*inputs, *params) -> outputs`` and
``*_bwd(*[grad of each output, optional], *inputs, *params) -> [grad of each input]``.

A backward op returns a gradient for every differentiable input, ``[0]`` for an optional
input that was not given; an absent output gradient counts as zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# Reduction modes of a reduced output (enum ReduceMode in csrc/include/fused_vae/elementwise.h
# has the same numbers; a test compares them).
REDUCE_SKIP = 0  # no output
REDUCE_ELEMENTWISE = 1  # reduction "none": per element, the input's shape and dtype
REDUCE_PER_SAMPLE = 2  # [B], accumulation dtype
REDUCE_SUM = 3  # scalar, accumulation dtype
REDUCE_BATCHMEAN = 4  # scalar sum / B, accumulation dtype
REDUCTION_MODES = {"none": REDUCE_ELEMENTWISE, "per_sample": REDUCE_PER_SAMPLE, "sum": REDUCE_SUM,
                   "batchmean": REDUCE_BATCHMEAN}  # fmt: skip

# What the sampling op's log-density output holds, per sample and row ([S, B]); enum LogqMode.
LOGQ_SKIP = 0  # no log-density output
LOGQ_DENSITY = 1  # log q(z|x)
LOGQ_RATIO = 2  # log q(z|x) - log p(z)
LOGQ_DENSITY_PATH = 3  # log q(z|x), q's parameters held constant inside log q ("sticking the landing")
LOGQ_RATIO_PATH = 4  # log q(z|x) - log p(z), the same path gradient
LOGQ_MODES = {("q", False): LOGQ_DENSITY, ("ratio", False): LOGQ_RATIO, ("q", True): LOGQ_DENSITY_PATH,
              ("ratio", True): LOGQ_RATIO_PATH}  # fmt: skip

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_DTYPE_NAMES = [str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES]


def unsupported_dtype(name: str, dtype: object) -> TypeError:
    """The error for a dtype outside SUPPORTED_DTYPES: "NAME must be float32, float64,
    float16 or bfloat16, got DTYPE" (check_inputs in op_common.h writes the same text)."""
    return TypeError(f"{name} must be {', '.join(_DTYPE_NAMES[:-1])} or {_DTYPE_NAMES[-1]}, got {dtype}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Math and reduced-output dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_reduced(mode: int) -> bool:
    """Whether an output of reduction ``mode`` is a sum over elements (per_sample, sum, batchmean)."""
    return mode >= REDUCE_PER_SAMPLE


def divisor(mode: int, batch: int) -> float:
    """What a summed output is divided by: B for batchmean, else 1."""
    return float(batch) if mode == REDUCE_BATCHMEAN else 1.0


def empty_value(mode: int, batch: int) -> float:
    """A reduced output of an input without elements: 0, or NaN (0/0) for batchmean of B = 0."""
    return float("nan") if mode == REDUCE_BATCHMEAN and batch == 0 else 0.0


def alloc_reduced(ref: torch.Tensor, mode: int) -> torch.Tensor:
    """Uninitialised output of reduction ``mode`` for inputs like ``ref``: ``ref.shape`` in its
    dtype (none), ``[B]`` (per_sample) or ``[]`` (sum, batchmean) in the accumulation dtype,
    ``[0]`` (skip)."""
    if mode == REDUCE_ELEMENTWISE:
        return ref.new_empty(ref.shape)
    if mode == REDUCE_PER_SAMPLE:
        return ref.new_empty(ref.shape[0], dtype=acc_dtype(ref.dtype))
    if mode in (REDUCE_SUM, REDUCE_BATCHMEAN):
        return ref.new_empty((), dtype=acc_dtype(ref.dtype))
    return ref.new_empty(0)


def _sizes(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_mode(name: str, value: int, hi: int) -> None:
    if not 0 <= value <= hi:
        raise ValueError(f"fused_vae: {name} must be in [0, {hi}], got {value}")


@dataclass(frozen=True)
class OpSpec:
    """One op family of the protocol.

    Attributes:
        name: the family's name; its ops are ``<prefix><name>_fwd`` / ``_bwd``.
        inputs: the differentiable tensor inputs, in order; a trailing ``?`` marks an
            optional one. The first is the reference the others must match (shape, dtype,
            device).
        params: schema text of the other arguments, after the inputs.
        outputs: the forward's outputs, in order.
        together: optional inputs that must be given together or not at all.
        check: the parameters' own checks, ``check(inputs, params)``.
        alloc: uninitialised outputs, ``alloc(inputs, params) -> tuple``.
        absent: why each output is left out of a call (None where it is made),
            ``absent(params) -> tuple``.
        composite: the op's math in differentiable PyTorch, ``composite(inputs, noise,
            params) -> outputs``.
        noise: the noise a composite needs, ``noise(make_eps, inputs, params) -> Tensor | None``
            where ``make_eps(mu, seed, num_samples)`` makes the stream (the reference's
            Philox, or a backend's forward op); None for ops without noise.
    """

    name: str
    inputs: tuple[str, ...]
    params: str
    outputs: tuple[str, ...]
    check: Callable
    alloc: Callable
    absent: Callable
    composite: Callable = field(repr=False)
    noise: Callable | None = field(default=None, repr=False)
    together: tuple[str, ...] = ()

    @property
    def input_names(self) -> tuple[str, ...]:
        """The inputs' names without the optional mark."""
        return tuple(n.rstrip("?") for n in self.inputs)

    @property
    def num_params(self) -> int:
        """Number of non-differentiable arguments after the inputs."""
        return len(self.params.split(","))

    @property
    def fwd_schema(self) -> str:
        """The forward op's schema, from its argument list on."""
        ins = ", ".join(f"Tensor? {n[:-1]}" if n.endswith("?") else f"Tensor {n}" for n in self.inputs)
        outs = "Tensor" if len(self.outputs) == 1 else f"({', '.join(['Tensor'] * len(self.outputs))})"
        return f"({ins}, {self.params}) -> {outs}"

    @property
    def bwd_schema(self) -> str:
        """The backward op's schema: a gradient per output, then the forward's arguments."""
        grads = ", ".join(f"Tensor? grad_{o}" for o in self.outputs)
        args = self.fwd_schema[1 : self.fwd_schema.index(") ->")]
        return f"({grads}, {args}) -> ({', '.join(['Tensor'] * len(self.inputs))})"

    def pack(self, outputs: tuple):
        """Outputs as the forward op returns them: the tensor itself for a single output."""
        return outputs[0] if len(self.outputs) == 1 else outputs

    def unpack(self, returned) -> tuple:
        """The forward op's return value as a tuple of outputs (inverse of :meth:`pack`)."""
        return (returned,) if len(self.outputs) == 1 else tuple(returned)

    def split(self, args: tuple) -> tuple[tuple, tuple]:
        """``(inputs, params)`` of a forward op's argument tuple."""
        n = len(self.inputs)
        return tuple(args[:n]), tuple(args[n:])

    def check_fwd_args(self, inputs, params) -> None:
        """The forward op's argument checks (same types and messages as the C++ ``check_inputs``).

        Raises:
            TypeError: an unsupported dtype, an input whose dtype differs from the first's.
            ValueError: a 0-d first input, an input of another shape or device, optional
                inputs given apart, and what the family's own ``check`` refuses.
        """
        names = self.input_names
        ref, ref_name = inputs[0], names[0]
        if ref.dim() < 1:
            raise ValueError(f"fused_vae: {ref_name} must be at least 1-D, got {ref.dim()}-D")
        for name, t in zip(names[1:], inputs[1:]):
            if t is None:
                continue
            if t.shape != ref.shape:
                raise ValueError(f"fused_vae: {name} shape {_sizes(t)} must equal {ref_name} shape {_sizes(ref)}")
        if ref.dtype not in SUPPORTED_DTYPES:
            raise unsupported_dtype(f"fused_vae: {ref_name}", ref.dtype)
        for name, t in zip(names[1:], inputs[1:]):
            if t is None:
                continue
            if t.dtype != ref.dtype:
                raise TypeError(f"fused_vae: {name} dtype {t.dtype} must equal {ref_name} dtype {ref.dtype}")
            if t.device != ref.device:
                raise ValueError(f"fused_vae: {name} is on {t.device} but {ref_name} is on {ref.device}")
        if self.together:
            given = [inputs[names.index(n)] is not None for n in self.together]
            if any(given) and not all(given):
                raise ValueError(f"fused_vae: {' and '.join(self.together)} must be given together")
        self.check(inputs, params)

    def check_bwd_args(self, grads, inputs, params) -> None:
        """The backward op's argument checks (same types and messages as the C++ ``check_grads``).

        Raises:
            TypeError / ValueError: as :meth:`check_fwd_args`; a gradient with the wrong
            number of elements, dtype or device, or given for an output the call leaves out.
        """
        self.check_fwd_args(inputs, params)
        ref, ref_name = inputs[0], self.input_names[0]
        outs = self.alloc(inputs, params)
        for name, g, out, why in zip(self.outputs, grads, outs, self.absent(params)):
            if g is None:
                continue
            if why is not None:
                raise ValueError(f"fused_vae: grad_{name} given but {why}")
            if g.numel() != out.numel():
                raise ValueError(f"fused_vae: grad_{name} must have {out.numel()} elements, got {g.numel()}")
            if g.dtype != out.dtype:
                raise TypeError(f"fused_vae: grad_{name} dtype {g.dtype} must be {out.dtype}")
            if g.device != ref.device:
                raise ValueError(f"fused_vae: grad_{name} is on {g.device} but {ref_name} is on {ref.device}")

    def alloc_grads(self, inputs) -> tuple[torch.Tensor, ...]:
        """Uninitialised contiguous gradients of a backward op: one per input, ``[0]`` for an
        optional input that was not given."""
        ref = inputs[0]
        return tuple(ref.new_empty(ref.shape) if t is not None else ref.new_empty(0) for t in inputs)


# --------------------------------------------------------------------------- reparam_kl


def _check_reparam(inputs, params) -> None:
    ref = inputs[0]
    seed, num_samples, kl_mode, logq_mode = params[:4]
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise TypeError("fused_vae: seed must be a one-element int64 tensor")
    if seed.device != ref.device:
        raise ValueError(f"fused_vae: seed is on {seed.device} but mu is on {ref.device}")
    if num_samples < 0:
        raise ValueError(f"fused_vae: num_samples must be >= 0, got {num_samples}")
    _check_mode("kl_mode", kl_mode, REDUCE_BATCHMEAN)
    _check_mode("logq_mode", logq_mode, LOGQ_RATIO_PATH)
    if logq_mode != LOGQ_SKIP and num_samples == 0:
        raise ValueError("fused_vae: logq_mode needs num_samples >= 1")


def _alloc_reparam(inputs, params):
    mu = inputs[0]
    _, num_samples, kl_mode, logq_mode = params[:4]
    z = mu.new_empty((num_samples, *mu.shape)) if num_samples > 0 else mu.new_empty(0)
    logq = mu.new_empty((num_samples, mu.shape[0]), dtype=acc_dtype(mu.dtype)) if logq_mode else mu.new_empty(0)
    return z, alloc_reduced(mu, kl_mode), logq


def _absent_reparam(params):
    _, num_samples, kl_mode, logq_mode = params[:4]
    return (
        "num_samples is 0" if num_samples == 0 else None,
        "kl_mode is 0" if kl_mode == REDUCE_SKIP else None,
        "logq_mode is 0" if logq_mode == LOGQ_SKIP else None,
    )


def _reparam_composite(inputs, noise, params):
    from .reference import reparam_from_eps

    _, _, kl_mode, logq_mode, lo, hi = params
    return reparam_from_eps(*inputs, noise, kl_mode, logq_mode, lo, hi)


def _reparam_noise(make_eps, inputs, params):
    seed, num_samples = params[:2]
    return make_eps(inputs[0], seed, num_samples) if num_samples > 0 else None


REPARAM = OpSpec(
    name="reparam_kl",
    inputs=("mu", "logvar", "prior_mu?", "prior_logvar?"),
    params="Tensor seed, int num_samples, int kl_mode, int logq_mode, float? clamp_lo, float? clamp_hi",
    outputs=("z", "kl", "logq"),
    together=("prior_mu", "prior_logvar"),
    check=_check_reparam,
    alloc=_alloc_reparam,
    absent=_absent_reparam,
    composite=_reparam_composite,
    noise=_reparam_noise,
)

# --------------------------------------------------------------------------- gaussian_log_prob


def _check_log_prob(inputs, params) -> None:
    reduction = params[0]
    if not REDUCE_ELEMENTWISE <= reduction <= REDUCE_BATCHMEAN:
        raise ValueError(f"fused_vae: reduction must be in [1, 4], got {reduction}")


def _log_prob_composite(inputs, noise, params):
    from .reference import log_prob_composite

    return (log_prob_composite(*inputs, *params),)


LOG_PROB = OpSpec(
    name="gaussian_log_prob",
    inputs=("x", "mu", "logvar"),
    params="int reduction, float? clamp_lo, float? clamp_hi",
    outputs=("log_prob",),
    check=_check_log_prob,
    alloc=lambda inputs, params: (alloc_reduced(inputs[0], params[0]),),
    absent=lambda params: (None,),
    composite=_log_prob_composite,
)

OPS: dict[str, OpSpec] = {spec.name: spec for spec in (REPARAM, LOG_PROB)}

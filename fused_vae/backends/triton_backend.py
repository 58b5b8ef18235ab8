"""The ``triton`` backend: Triton kernels behind ``torch.ops.fused_vae.triton_<op>_fwd/_bwd``.

The ops (one pair per family of :data:`fused_vae.backends.protocol.OPS`, with its schemas)
are defined here with ``torch.library.custom_op`` when fused_vae is imported; their fake (meta) impls
and autograd come from :func:`fused_vae.backends.registration.register_pair`. Defining
them needs no triton: the kernels live in :mod:`fused_vae.backends.triton_kernels`,
imported on the first call of an op, so ``import fused_vae`` works without triton and
``TRITON_INTERPRET=1`` (CPU tensors through the Triton interpreter) only has to be set
before that first call.

Why ``custom_op`` and not ``torch.library.triton_op``: under ``TRITON_INTERPRET=1`` the
kernels are ``InterpretedFunction`` objects, which ``wrap_triton`` cannot trace (torch 2.11
refuses them; torch 2.13 passes them through untraced, so the fake impl that triton_op
derives from the launcher launches the interpreter on FakeTensors and fails). An opaque
``custom_op`` works the same way on CUDA and under the interpreter, and
``torch.compile(fullgraph=True)`` still traces it as one node without graph breaks.
"""

from __future__ import annotations

import importlib
import os
import threading

import torch

from . import protocol as P
from .registration import register_ops

PREFIX = "triton_"

_lock = threading.Lock()
_kernels = None
_import_error: str | None = None
_triton_checked = False


def interpreter_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` is set to a true value in the environment."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _triton_import_error() -> str | None:
    """None when triton imports, else why not (the result is cached)."""
    global _triton_checked, _import_error
    if not _triton_checked:
        with _lock:
            if not _triton_checked:
                try:
                    importlib.import_module("triton")
                    importlib.import_module("triton.language")
                except ImportError as e:
                    _import_error = (
                        "triton is not installed (pip install triton)"
                        if getattr(e, "name", None) == "triton"
                        else f"triton cannot be imported: {e}"
                    )
                except Exception as e:  # noqa: BLE001 - a broken install must not break fused_vae
                    _import_error = f"triton cannot be imported: {type(e).__name__}: {e}"
                _triton_checked = True
    return _import_error


def kernels():
    """The kernel module (imports triton and defines the kernels on first use).

    Raises:
        RuntimeError: triton cannot be imported.
    """
    global _kernels
    if _kernels is None:
        reason = _triton_import_error()
        if reason is not None:
            raise RuntimeError(f"fused_vae triton backend: {reason}")
        with _lock:
            if _kernels is None:
                _kernels = importlib.import_module(".triton_kernels", __package__)
    return _kernels


def _define_ops() -> None:
    """One custom op per direction and family, calling the kernel module's function of the
    same name (``reparam_kl_fwd``, ...)."""
    for spec in P.OPS.values():
        for direction, schema in (("fwd", spec.fwd_schema), ("bwd", spec.bwd_schema)):
            name = f"{spec.name}_{direction}"

            def impl(*args, _name=name):
                return getattr(kernels(), _name)(*args)

            impl.__doc__ = f"The {direction} op of the protocol's {spec.name} family, run by the Triton kernels."
            torch.library.custom_op(f"fused_vae::{PREFIX}{name}", impl, mutates_args=(), schema=schema)


_define_ops()
register_ops(PREFIX, python_autograd=True)


class TritonBackend:
    """Runs ``torch.ops.fused_vae.triton_reparam_kl_fwd``: CUDA tensors, or CPU tensors
    through the Triton interpreter (``TRITON_INTERPRET=1``)."""

    name = "triton"

    def __init__(self) -> None:
        self._ops: dict = {}

    def unavailable_reason(self, device_type: str) -> str | None:
        reason = _triton_import_error()
        if reason is not None:
            return reason
        if device_type == "cuda":
            if not torch.cuda.is_available():
                return "no CUDA device is available"
            return None
        if device_type == "cpu":
            if _kernels is not None:  # the kernels exist: interpreted or compiled for the GPU
                if _kernels.INTERPRETED:
                    return None
                return "CPU tensors need the Triton interpreter, but the kernels were compiled before TRITON_INTERPRET=1 was set"
            if not interpreter_requested():
                if torch.cuda.is_available():
                    return "CPU tensors need the Triton interpreter and TRITON_INTERPRET=1 is not set"
                return "no CUDA device is available and TRITON_INTERPRET=1 is not set"
            return None
        return f"Triton kernels run on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), not {device_type}"

    def run(self, op: str, *args):
        fn = self._ops.get(op)
        if fn is None:
            fn = self._ops[op] = getattr(torch.ops.fused_vae, f"{PREFIX}{op}_fwd").default
        return fn(*args)

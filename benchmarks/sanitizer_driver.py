"""A short run over every kernel path of the fused ops, for compute-sanitizer.

Calls the ops of docs/design.md section 8 directly (forward, backward, the backward with
expanded or absent output gradients) for every case of :func:`cases`: each dtype x each
shape of the (size, backend) table (CUDA_SHAPES reach every tiling path of the CUDA
kernels) x each KL mode, with the number of samples (0, 1, 3), the alignment (16-byte
aligned or one element past it), the logvar clamp, a learned prior (or N(0, I)) and the
log-density mode cycled over the cases; in the full CUDA table every pair of dtype, shape
and KL mode meets every sample count (samples 0 only with a KL) and both alignments. Each
case also runs gaussian_log_prob (forward, backward, expanded or absent gradient) with the
KL mode as its reduction (per_sample for 0). Every output must be finite (the emulated device fills outputs with NaN first, so an
element that no thread writes fails there). Prints each case before running it, so a
sanitizer report can be matched to its case.

    compute-sanitizer --tool racecheck python benchmarks/sanitizer_driver.py       # on a GPU
    python benchmarks/sanitizer_driver.py --device cpu --size tiny                 # dry run

``--device cpu`` runs the ``cuda`` backend on the emulated CUDA device
(``FUSED_VAE_CUDA_EMULATE=1``) and the ``triton`` backend in the interpreter
(``TRITON_INTERPRET=1``); set both before starting. ``--shard K/N`` runs every N-th case
from the K-th (K counts from 1), to spread one tool over several processes.

Exit status: 0 when every case ran with finite outputs; 1 when an output was not finite;
2 when a requested backend cannot run on the device (the reason is printed).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass

# Tile sizes of the CUDA kernels (csrc/cuda/launch_common.h): 1024 elements for
# float32 / float64, 2048 for 16-bit types; one block finishes alone when
# tiles x samples <= 8.
CUDA_SHAPES = [
    (5, 3),  # rows of 3 (< 32 lanes, not a multiple of the vector width); one fused block
    (7, 13),  # ragged tail; with several samples N % 4 != 0 forces the scalar path
    (5000,),  # D = 1
    (128, 32),  # several whole-row tiles: multi-block with samples, split samples
    (3, 1000),  # one row per tile (32-bit types), two per tile (16-bit)
    (40, 3000),  # rows cut into chunks over many blocks: the row-pass and total kernels
    (2, 40000),  # more than 32 chunks per row for 32-bit types (the row pass loops)
    (2, 70000),  # more than 32 chunks per row for 16-bit types
]
# (dtypes, shapes) per (size, backend). Triton compiles a kernel per dtype, tile shape and
# flag set (seconds each): its table keeps one 32-bit and one 16-bit type, one program,
# several programs, and rows cut into chunks (the row-sum and total kernels). The tiny
# size is the dry run on the emulated device and the interpreter (both slow; the
# interpreter slower still).
TABLES = {
    ("full", "cuda"): (("float32", "float64", "float16", "bfloat16"), CUDA_SHAPES),
    ("full", "triton"): (("float32", "bfloat16"), [(7, 13), (128, 32), (40, 3000), (2, 70000)]),
    ("tiny", "cuda"): (("float32", "bfloat16"), [(5, 3), (7, 13), (2, 2100)]),
    ("tiny", "triton"): (("float32",), [(7, 13)]),
}
SIZES = ("full", "tiny")
SAMPLES = (0, 1, 3)
KL_MODES = range(5)  # skip, none, per_sample, sum, batchmean (docs/design.md section 8.2)
CLAMP = (-1.0, 1.0)

# The op pair of each (backend, device type) (docs/design.md section 8.1).
OP_PREFIX = {("cuda", "cuda"): "reparam_kl", ("cuda", "cpu"): "cuda_emu_reparam_kl", ("triton", "cuda"): "triton_reparam_kl",
             ("triton", "cpu"): "triton_reparam_kl"}


@dataclass(frozen=True)
class Case:
    """One call pattern of the ops: dtype name, mu's shape, samples, KL mode, a data offset of
    0 or 1 element (1: not 16-byte aligned, the scalar path), whether logvar is clamped,
    whether a learned prior is given and the log-density mode (0 without samples)."""

    backend: str
    dtype: str
    shape: tuple[int, ...]
    num_samples: int
    kl_mode: int
    shift: int
    clamp: bool
    prior: bool = False
    logq_mode: int = 0

    def __str__(self) -> str:
        return (f"{self.backend} {self.dtype} {list(self.shape)} samples={self.num_samples} kl_mode={self.kl_mode} "
                f"shift={self.shift} clamp={self.clamp} prior={self.prior} logq_mode={self.logq_mode}")


def cases(size: str, backends: list[str]) -> list[Case]:
    """The cases for ``size`` ('full' or 'tiny'), backend by backend (see the module docstring)."""
    out = []
    for backend in backends:
        dtypes, shapes = TABLES[(size, backend)]
        for di, dtype in enumerate(dtypes):
            for si, shape in enumerate(shapes):
                for mode in KL_MODES:
                    samples = SAMPLES[(di + si + mode) % len(SAMPLES)]
                    if samples == 0 and mode == 0:
                        samples = 1  # no output at all: the op returns before any kernel
                    shift = (si + mode + di // 2) % 2
                    logq_mode = (di + si + 2 * mode) % 5 if samples else 0
                    out.append(Case(backend, dtype, shape, samples, mode, shift, clamp=(di + mode) % 2 == 1,
                                    prior=(si + mode) % 2 == 1, logq_mode=logq_mode))
    return out


def shard(items: list, spec: str) -> list:
    """Every N-th item from the K-th for ``spec`` 'K/N' (1 <= K <= N)."""
    try:
        k, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise SystemExit(f"--shard must be K/N with integers, got {spec!r}") from None
    if not 1 <= k <= n:
        raise SystemExit(f"--shard K/N needs 1 <= K <= N, got {spec!r}")
    return items[k - 1 :: n]


def _shifted(n: int, shape, case: Case, device: str, dtype):
    """A fresh normal tensor of ``shape`` in its own (16-byte aligned) allocation, viewed from
    element ``case.shift``."""
    import torch

    return torch.randn(n + 8, device=device).to(dtype)[case.shift : case.shift + n].view(shape)


def _backwards(bwd, grads, args, expandable: bool):
    """The backward with ``grads``; then with expanded (stride-0) gradients, which the kernels
    read in place, when ``expandable``, else with the first gradient alone."""
    import torch

    outs = list(bwd(*grads, *args))
    if expandable:
        expanded = [None if g is None else torch.ones((), dtype=g.dtype, device=g.device).expand_as(g) for g in grads]
        outs += bwd(*expanded, *args)
    elif sum(g is not None for g in grads) > 1:
        outs += bwd(grads[0], *([None] * (len(grads) - 1)), *args)
    return outs


def run_case(case: Case, device: str):
    """Runs the sampling op and gaussian_log_prob: forward, backward, and backward with
    expanded (stride-0) or absent output gradients; returns the outputs to check."""
    import torch

    prefix = OP_PREFIX[(case.backend, device)]
    ops = torch.ops.fused_vae
    dtype = getattr(torch, case.dtype)
    n = math.prod(case.shape)
    mu, lv = (_shifted(n, case.shape, case, device, dtype) for _ in range(2))
    pm, pl = (_shifted(n, case.shape, case, device, dtype) for _ in range(2)) if case.prior else (None, None)
    seed = torch.tensor(1234, device=device)
    lo, hi = CLAMP if case.clamp else (None, None)
    args = (mu, lv, pm, pl, seed, case.num_samples, case.kl_mode, case.logq_mode, lo, hi)
    fwd_outs = getattr(ops, f"{prefix}_fwd")(*args)
    grads = [torch.randn_like(t) if t.numel() else None for t in fwd_outs]
    expandable = grads[0] is not None and case.kl_mode in (1, 2)
    outs = [*fwd_outs, *_backwards(getattr(ops, f"{prefix}_bwd"), grads, args, expandable)]
    # gaussian_log_prob of a third tensor, the KL mode as its reduction (per_sample for 0).
    lp_prefix = prefix.removesuffix("reparam_kl") + "gaussian_log_prob"
    lp_args = (_shifted(n, case.shape, case, device, dtype), mu, lv, case.kl_mode or 2, lo, hi)
    log_prob = getattr(ops, f"{lp_prefix}_fwd")(*lp_args)
    lp_bwd = getattr(ops, f"{lp_prefix}_bwd")
    outs += [log_prob, *_backwards(lp_bwd, [torch.randn_like(log_prob)], lp_args, case.kl_mode in (1, 2))]
    outs += lp_bwd(None, *lp_args)
    return outs


def main(argv=None) -> int:
    """Command line entry (see the module docstring); returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cuda, or cpu for the emulated device / interpreter")
    p.add_argument("--size", default="full", choices=SIZES, help="full (GPU) or tiny (dry run)")
    p.add_argument("--backends", default="cuda", help="comma list of cuda, triton")
    p.add_argument("--shard", default="1/1", help="K/N: run every N-th case from the K-th")
    args = p.parse_args(argv)

    import torch

    import fused_vae as fv

    backends = [b for b in args.backends.split(",") if b]
    info = fv.available_backends()
    for b in backends:
        if b not in ("cuda", "triton"):
            raise SystemExit(f"--backends takes cuda and triton, got {b!r}")
        if not (info[b].available and args.device in info[b].devices):
            print(f"backend {b} cannot run on {args.device}: {info[b].reason or 'device not supported'}", file=sys.stderr)
            return 2
    todo = shard(cases(args.size, backends), args.shard)
    torch.manual_seed(0)
    t0 = time.time()
    flags = []
    for i, case in enumerate(todo, 1):
        print(f"case {i}/{len(todo)}: {case}", flush=True)
        flags.append(torch.stack([torch.isfinite(t).all() for t in run_case(case, args.device)]).all())
    finite = torch.stack(flags).cpu().tolist()  # one synchronisation: kernel faults surface here
    bad = [str(c) for c, ok in zip(todo, finite) if not ok]
    for line in bad:
        print(f"non-finite output: {line}", file=sys.stderr)
    print(f"driver {'FAILED' if bad else 'ok'}: {len(todo) - len(bad)}/{len(todo)} cases with finite outputs, "
          f"backends {','.join(backends)} on {args.device}, {time.time() - t0:.1f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

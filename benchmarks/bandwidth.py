"""Achieved memory bandwidth of the fused forward and forward+backward against a device copy.

For each dtype (float32, bfloat16; float32 alone at the tiny size) and reduction
(batchmean, per_sample, none) at one size (64M elements on a GPU), times ``fv.reparameterize_kl`` alone and followed by
``torch.autograd.grad``, and reports the bytes each pass must move per second; then, in
float32, the other op families (``TERM_CASES``: the KL to a learned prior with its sample,
a sample's ``log q - log p``, ``fv.gaussian_log_prob``), with issue 21's target (forward and
backward at >= 80% of copy bandwidth):

    forward:           read mu, logvar; write z (and the KL when reduction='none')
    forward+backward:  the forward, then read grad_z, mu, logvar (and grad_kl when
                       reduction='none'); write grad_mu, grad_logvar

as a fraction of the measured ``dst.copy_(src)`` bandwidth (bytes read + written).
Timing: benchmarks/common.py's ``time_calls``.

    PYTHONPATH=. python benchmarks/bandwidth.py --out bandwidth.json          # on a GPU
    PYTHONPATH=. python benchmarks/bandwidth.py --device cpu --size tiny      # dry run
    ncu ... python benchmarks/bandwidth.py --profile                          # each pass once

``--device cpu`` runs the backends on the emulated CUDA device (``FUSED_VAE_CUDA_EMULATE=1``)
or in the Triton interpreter (``TRITON_INTERPRET=1``), only to check that the script runs.
Exit status 2 when a requested backend cannot run on the device.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# [B, D] of the timed tensors, dtypes, bytes of each copy buffer, seconds of timing per call.
SIZES = {
    "full": {"shape": (1 << 14, 4096), "dtypes": ("float32", "bfloat16"), "copy_bytes": 1 << 28, "min_run_time": 0.5},
    "tiny": {"shape": (4, 64), "dtypes": ("float32",), "copy_bytes": 1 << 20, "min_run_time": 0.01},
}
REDUCTIONS = ("batchmean", "per_sample", "none")


def elements_moved(reduction: str) -> dict[str, int]:
    """Elements of mu's size each pass reads plus writes (the module docstring's model)."""
    kl = 1 if reduction == "none" else 0  # the elementwise KL out, and its gradient in
    return {"fwd": 3 + kl, "fwd_bwd": 8 + 2 * kl}


# The other op families in float32 (issue 21's GPU target: fwd+bwd >= 80% of copy bandwidth):
# (inputs of mu's size, elements moved by the forward, by forward+backward), per-row outputs
# and their gradients ([B] or [1, B]) being negligible.
TERM_CASES = {
    # read mu, logvar, prior_mu, prior_logvar, write z; then read grad_z and the four, write four gradients
    "prior_kl": (4, 5, 5 + 9),
    # read mu, logvar, write z; then read grad_z, mu, logvar, write two gradients
    "log_ratio": (2, 3, 3 + 5),
    # read x, mu, logvar; then read them again and write three gradients
    "log_prob": (3, 3, 3 + 6),
}


def term_fn(name: str, tensors, seed, backend: str):
    """The timed forward of a TERM_CASES case: the outputs to differentiate."""
    import fused_vae as fv

    if name == "prior_kl":
        mu, lv, pm, pl = tensors
        return lambda: fv.reparameterize_kl(mu, lv, prior=(pm, pl), reduction="per_sample", seed=seed, backend=backend)
    if name == "log_ratio":
        mu, lv = tensors
        return lambda: tuple(fv.sample_gaussian(mu, lv, log_density="ratio", seed=seed, backend=backend))[::2]
    x, mu, lv = tensors
    return lambda: (fv.gaussian_log_prob(x, mu, lv, backend=backend),)


def main(argv=None) -> int:
    """Command line entry (see the module docstring); returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--size", default="full", choices=sorted(SIZES))
    p.add_argument("--backends", default="cuda", help="comma list of fused backends (cuda, triton)")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds of timing per call and case")
    p.add_argument("--profile", action="store_true", help="run each pass once, untimed (for ncu)")
    p.add_argument("--out", help="result JSON path")
    args = p.parse_args(argv)

    import torch

    import fused_vae as fv
    from common import environment, time_calls, timing_method, write_result

    size = SIZES[args.size]
    min_run_time = args.min_run_time or size["min_run_time"]
    backends = [b for b in args.backends.split(",") if b]
    info = fv.available_backends()
    for b in backends:
        if not (info[b].available and args.device in info[b].devices):
            print(f"backend {b} cannot run on {args.device}: {info[b].reason or 'device not supported'}", file=sys.stderr)
            return 2
    dev = args.device
    results = {"environment": environment(), "method": timing_method(min_run_time), "size": args.size, "cases": []}
    if not args.profile:
        src = torch.empty(size["copy_bytes"], dtype=torch.uint8, device=dev).random_()
        dst = torch.empty_like(src)
        t = time_calls({"copy": lambda: dst.copy_(src)}, min_run_time=min_run_time)["copy"]["median_s"]
        results["copy_bytes_per_s"] = copy_bw = 2 * src.numel() / t
        del src, dst
        print(f"copy: {copy_bw / 1e9:.1f} GB/s")
    g = torch.Generator(device=dev).manual_seed(0)

    def measure(fwd, inputs, labels: dict, bytes_fwd: int, bytes_fwd_bwd: int, target: float | None = None) -> None:
        """Times ``fwd`` and forward+backward (gradients of every input against fixed random
        output gradients) and records the case with its fraction of the copy bandwidth."""
        outs = fwd()
        outs = outs if isinstance(outs, tuple) else (outs,)
        grads = [torch.randn(o.shape, device=dev, generator=g).to(o.dtype) for o in outs]

        def fwd_bwd():
            return torch.autograd.grad(fwd(), inputs, grads, allow_unused=True)

        if args.profile:
            with torch.no_grad():
                fwd()
            fwd_bwd()
            return
        with torch.no_grad():
            t_f = time_calls({"fwd": fwd}, min_run_time=min_run_time)["fwd"]
        t_fb = time_calls({"fwd_bwd": fwd_bwd}, min_run_time=min_run_time)["fwd_bwd"]
        case = {**labels, "shape": list(inputs[0].shape), "elements": inputs[0].numel(), "fwd": t_f, "fwd_bwd": t_fb}
        for kind, t, moved in (("fwd", t_f, bytes_fwd), ("fwd_bwd", t_fb, bytes_fwd_bwd)):
            case[f"{kind}_bytes_per_s"] = moved / t["median_s"]
            case[f"{kind}_fraction_of_copy"] = moved / t["median_s"] / copy_bw
        results["cases"].append(case)
        verdict = "" if target is None else f" [{'PASS' if case['fwd_bwd_fraction_of_copy'] >= target else 'MISS'} >= {target:.0%}]"
        print(f"{labels['backend']:>6} {labels['dtype']:>8} {labels.get('reduction') or labels['op']:>10}: fwd "
              f"{t_f['median_s'] * 1e6:9.1f} us {100 * case['fwd_fraction_of_copy']:5.1f}% of copy, fwd+bwd "
              f"{t_fb['median_s'] * 1e6:9.1f} us {100 * case['fwd_bwd_fraction_of_copy']:5.1f}% of copy{verdict}",
              flush=True)
        if args.out:  # partial results survive an interrupted run
            write_result(Path(args.out), results)

    for backend in backends:
        for dtype_name in size["dtypes"]:
            dtype = getattr(torch, dtype_name)
            mu = torch.randn(size["shape"], device=dev, generator=g).to(dtype).requires_grad_()
            lv = (0.5 * torch.randn(size["shape"], device=dev, generator=g)).to(dtype).requires_grad_()
            seed = torch.tensor(3, device=dev)
            n, esize = mu.numel(), mu.element_size()
            for reduction in REDUCTIONS:

                def fwd(reduction=reduction):
                    return fv.reparameterize_kl(mu, lv, reduction=reduction, seed=seed, backend=backend)

                moved = elements_moved(reduction)
                measure(fwd, [mu, lv], dict(backend=backend, dtype=dtype_name, reduction=reduction),
                        moved["fwd"] * n * esize, moved["fwd_bwd"] * n * esize)
            del mu, lv
        for name, (n_inputs, moved_f, moved_fb) in TERM_CASES.items():
            tensors = [(0.5 * torch.randn(size["shape"], device=dev, generator=g)).requires_grad_()
                       for _ in range(n_inputs)]  # fmt: skip
            n = tensors[0].numel()
            measure(term_fn(name, tensors, torch.tensor(3, device=dev), backend), tensors,
                    dict(backend=backend, dtype="float32", op=name), moved_f * n * 4, moved_fb * n * 4, target=0.8)
            del tensors
    if args.profile:
        if dev == "cuda":
            torch.cuda.synchronize()
        print("profile run done")
    elif args.out:
        write_result(Path(args.out), {**results, "complete": True})
        print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

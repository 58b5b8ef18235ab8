"""diffusers' DiagonalGaussianDistribution against fused_vae's drop-in, on CPU.

One step is what a VAE fine-tuning loop does with the posterior: build it from the
encoder's ``[B, 2C, H, W]`` output, ``sample()``, ``kl()``, and backpropagate both
(``torch.autograd.backward([z, kl], [grad_z, grad_kl])`` with fixed upstream gradients,
so no loss kernels are timed). Also timed: the forward alone, and ``sample()`` under
``no_grad`` (encoding latents for diffusion training).

Time: ``common.time_calls`` (the suite's one timing helper: torch.utils.benchmark.Timer
blocks, the implementations taking turns), so load bursts on a shared machine hit both
alike; medians and 10th percentiles.

Memory, two ways:
* ``held_bytes``: bytes of the tensors alive between forward and backward beyond the
  parameters and the outputs: tensors autograd saved for backward (found with
  ``torch.autograd.graph.saved_tensors_hooks``) plus the posterior's tensor attributes,
  counted once per storage. Exact and deterministic.
* ``peak_rss_delta_bytes``: the process's peak resident set (VmHWM, reset through
  /proc/self/clear_refs) during one forward+backward, minus the resident set before it.
  glibc is told (mallopt) to mmap every allocation over 64 KiB, so a freed tensor leaves
  the resident set at once and the peak follows live tensors. Median over rounds.

    python benchmarks/bench_diffusers.py            # [8, 16, 128, 128], float32 and bfloat16
    python benchmarks/bench_diffusers.py --quick    # small shape, few rounds (smoke test)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS_DIR,
    environment,
    mmap_large_allocations,
    peak_rss_delta_bytes,
    saved_bytes,
    time_calls,
    write_result,
)

import fused_vae.integrations.diffusers as fvd  # noqa: E402

def held_bytes(cls, params, generator) -> int:
    """Bytes kept alive between forward and backward beyond parameters and outputs: the tensors
    saved for backward and the posterior's tensor attributes."""
    kept = {}

    def forward():
        posterior = cls(params)
        kept["attributes"] = [v for v in vars(posterior).values() if isinstance(v, torch.Tensor)]
        return posterior.sample(generator=generator), posterior.kl()

    return saved_bytes(forward, [params], extra=lambda: kept["attributes"])


def steps(cls, params, grad_z, grad_kl, seed):
    generator = torch.Generator().manual_seed(seed)

    def forward():
        posterior = cls(params)
        return posterior.sample(generator=generator), posterior.kl()

    def forward_backward():
        z, kl = forward()
        torch.autograd.backward([z, kl], [grad_z, grad_kl])
        params.grad = None

    def sample_no_grad():
        with torch.no_grad():
            return cls(params).sample(generator=generator)

    return {"forward": forward, "forward_backward": forward_backward, "sample_no_grad": sample_no_grad}


def run_dtype(dtype, latent_shape, rounds, min_run_time, implementations):
    batch, channels, *spatial = latent_shape
    g = torch.Generator().manual_seed(0)
    params = torch.randn(batch, 2 * channels, *spatial, generator=g).to(dtype).requires_grad_(True)
    grad_z = torch.randn(latent_shape, generator=g).to(dtype)
    grad_kl = torch.randn(batch, generator=g).to(dtype)

    fns = {name: steps(cls, params, grad_z, grad_kl, seed=1) for name, cls in implementations.items()}
    timings = time_calls(
        {f"{name}/{case}": fn for name, case_fns in fns.items() for case, fn in case_fns.items()},
        min_run_time=min_run_time,
    )
    rss = {name: [] for name in fns}
    for _ in range(rounds):  # peak memory of one forward+backward, implementations in turn
        for name, case_fns in fns.items():
            rss[name].append(peak_rss_delta_bytes(case_fns["forward_backward"]))

    result = {}
    for name, cls in implementations.items():
        result[name] = {case: timings[f"{name}/{case}"] for case in fns[name]}
        result[name]["held_bytes"] = held_bytes(cls, params, torch.Generator().manual_seed(2))
        result[name]["peak_rss_delta_bytes"] = int(statistics.median(rss[name]))
        result[name]["peak_rss_delta_bytes_all"] = rss[name]
    base, new = result["diffusers"], result["fused"]
    result["ratios_diffusers_over_fused"] = {
        case: base[case]["median_s"] / new[case]["median_s"] for case in fns["fused"]
    } | {"peak_rss_delta_bytes": base["peak_rss_delta_bytes"] / max(new["peak_rss_delta_bytes"], 1)}
    result["held_bytes_saved"] = base["held_bytes"] - new["held_bytes"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[8, 16, 128, 128], help="latent shape [B, C, ...]")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=15, help="peak-memory measurements per implementation")
    parser.add_argument("--min-run-time", type=float, default=3.0, help="seconds timed per implementation and case")
    parser.add_argument("--quick", action="store_true", help="[2, 4, 16, 16], 3 rounds, no result file")
    parser.add_argument("--out", type=Path, default=None, help="result file (default: results/diffusers-cpu-<date>.json)")
    args = parser.parse_args()
    if args.quick:
        args.shape, args.rounds, args.min_run_time = [2, 4, 16, 16], 3, 0.2

    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as DiffusersPosterior

    implementations = {"diffusers": DiffusersPosterior, "fused": fvd.DiagonalGaussianDistribution}
    mmapped = mmap_large_allocations()
    import diffusers

    results = {}
    for dtype_name in args.dtypes:
        results[dtype_name] = run_dtype(
            getattr(torch, dtype_name), args.shape, args.rounds, args.min_run_time, implementations
        )
        r = results[dtype_name]
        print(f"{dtype_name} latent {args.shape}:")
        for case in ("forward", "forward_backward", "sample_no_grad"):
            d, f = r["diffusers"][case]["median_s"], r["fused"][case]["median_s"]
            print(f"  {case:17s} diffusers {d * 1e3:8.2f} ms   fused {f * 1e3:8.2f} ms   x{d / f:.2f}")
        for key in ("held_bytes", "peak_rss_delta_bytes"):
            d, f = r["diffusers"][key], r["fused"][key]
            print(f"  {key:21s} diffusers {d / 2**20:8.1f} MiB  fused {f / 2**20:8.1f} MiB")

    payload = {
        "benchmark": "benchmarks/bench_diffusers.py",
        "what": "posterior built from [B, 2C, H, W] parameters, sample(generator) + kl(), "
        "backward of both with fixed upstream gradients; diffusers' DiagonalGaussianDistribution "
        "vs fused_vae.integrations.diffusers.DiagonalGaussianDistribution (default CPU backend)",
        "latent_shape": args.shape,
        "rounds": args.rounds,
        "timing": "benchmarks/common.py time_calls: torch.utils.benchmark.Timer blocks, implementations "
        f"and cases in turn, {args.min_run_time} s each; median and 10th percentile per call",
        "memory": "held_bytes: unique storages of tensors saved for backward (saved_tensors_hooks) and of the "
        "posterior's tensor attributes, excluding parameters and outputs; peak_rss_delta_bytes: VmHWM after "
        "clear_refs reset minus VmRSS before, one forward+backward, median over rounds, glibc mmap threshold "
        f"64 KiB (set: {mmapped})",
        "environment": environment() | {"diffusers": diffusers.__version__},
        "results": results,
    }
    if not args.quick:
        date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
        path = write_result(args.out or RESULTS_DIR / f"diffusers-cpu-{date}.json", payload)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""The Gaussian terms beyond the N(0, I) KL: fused ops against the plain PyTorch a user writes.

Three cases, each implementation timed side by side in one run (benchmarks/common.py's
``time_calls``), forward+backward with fixed upstream gradients:

- ``prior_kl``: a hierarchical VAE layer's sample and KL to its learned prior, summed per
  example (VDVAE's ``draw_gaussian_diag_samples`` + ``gaussian_analytical_kl``), at a
  VDVAE-like latent [32, 16, 32, 32] and an MLP latent [128, 32]. ``fused``:
  ``fv.reparameterize_kl(mu, logvar, prior=(prior_mu, prior_logvar), reduction="per_sample")``;
  ``eager`` and ``compile``: the expression below, eagerly and under ``torch.compile``.
  Also the bytes autograd keeps for backward beyond the four inputs and the outputs, and
  the peak memory of one forward+backward (resident set on the CPU, allocator peak on a GPU).
- ``iwae_log_weight``: the IWAE terms of K samples, ``z [K, B, L]`` and
  ``log q(z|x) - log p(z)`` per sample ``[K, B]``, at [5, 20, 50] and [50, 20, 50]:
  ``fused``: ``fv.sample_gaussian(mu, logvar, num_samples=K, log_density="ratio")``;
  ``eager``: eps, z and the two log densities written out.
- ``log_prob``: ``log N(x; mu, exp(logvar))`` summed per example at [100, 784] (a Gaussian
  decoder with a learned variance): ``fused`` ``fv.gaussian_log_prob``, ``eager`` the
  formula, ``distributions`` ``torch.distributions.Normal(mu, std).log_prob(x).sum(-1)``.

On the CPU each case runs at every ``--threads`` value (default: 1 and all cores). For the
two cases with a speed target the run also times, at the first thread count, the parts that
bound the fused time from below (``floor``): the noise alone (the sampling op without a prior,
KL or log density on zeros: Philox, Box-Muller and the store of eps, less the same call's time
for one element), which the forward draws and the backward draws again; the fixed cost of a
forward+backward call (the same call at one element per row and one sample: argument checks,
seed, dispatch, autograd); the raw forward and backward ops (no Python, no autograd); and the
eager expression's ``torch.randn``. ``fixed + 2 * noise`` is a lower bound of the fused time
under the noise contract, so ``eager / (fixed + 2 * noise)`` bounds the speedup any kernel
could reach.
Writes a JSON result file (environment, raw numbers, ratios, targets) and prints its path.

    python benchmarks/bench_terms.py                  # CPU, about 5 minutes on 2 cores
    python benchmarks/bench_terms.py --quick          # short runs, small sizes, no result file
    PYTHONPATH=. python benchmarks/bench_terms.py --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fused_vae as fv  # noqa: E402
from common import (  # noqa: E402
    environment,
    load_average,
    mmap_large_allocations,
    peak_rss_delta_bytes,
    save_result,
    saved_bytes,
    speedup,
    time_calls,
    timing_method,
    us,
)

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
SHAPES = {
    "prior_kl": [(32, 16, 32, 32), (128, 32)],
    "iwae_log_weight": [(5, 20, 50), (50, 20, 50)],
    "log_prob": [(100, 784)],
}
QUICK_SHAPES = {"prior_kl": [(4, 4, 8, 8), (128, 32)], "iwae_log_weight": [(5, 20, 50)], "log_prob": [(100, 784)]}
TARGETS = {
    "prior_kl [32, 16, 32, 32] fwd+bwd vs eager": 5.0,
    "prior_kl [32, 16, 32, 32] fwd+bwd vs compile": 3.0,
    "prior_kl [32, 16, 32, 32] bytes kept for backward beyond the inputs": 8,  # the seed
    "iwae_log_weight [50, 20, 50] fwd+bwd vs eager": 3.0,
}


# ---------------------------------------------------------------- the plain PyTorch a user writes


def prior_kl_eager(mu, logvar, prior_mu, prior_logvar):
    """VDVAE's sample and analytic KL (written with log-variances), summed per example."""
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn_like(std)
    kl = -0.5 + 0.5 * (prior_logvar - logvar) + 0.5 * (torch.exp(logvar) + (mu - prior_mu) ** 2) / torch.exp(prior_logvar)
    return z, kl.flatten(1).sum(1)


def iwae_terms_eager(mu, logvar, k):
    """K reparameterized samples and each one's log q(z|x) - log p(z) under p = N(0, I)."""
    std = torch.exp(0.5 * logvar)
    eps = torch.randn(k, *mu.shape, dtype=mu.dtype, device=mu.device)
    z = mu + std * eps
    log_q = (-0.5 * eps * eps - 0.5 * logvar - HALF_LOG_2PI).sum(-1)
    log_p = (-0.5 * z * z - HALF_LOG_2PI).sum(-1)
    return z, log_q - log_p


def log_prob_eager(x, mu, logvar):
    return (-0.5 * (x - mu) ** 2 * torch.exp(-logvar) - 0.5 * logvar - HALF_LOG_2PI).sum(-1)


def log_prob_distributions(x, mu, logvar):
    return torch.distributions.Normal(mu, torch.exp(0.5 * logvar), validate_args=False).log_prob(x).sum(-1)


# ---------------------------------------------------------------- cases


def _inputs(shape, n, device, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(device).requires_grad_() for _ in range(n)]


def _fwd_bwd(fn, inputs, grads):
    def step():
        outs = fn(*inputs)
        torch.autograd.grad(outs, inputs, grads)

    return step


def case_prior_kl(shape, device):
    inputs = _inputs(shape, 4, device, 0)
    g = torch.Generator().manual_seed(1)
    grads = (torch.randn(shape, generator=g).to(device), torch.randn(shape[0], generator=g).to(device))
    fns = {
        "fused": lambda m, v, pm, pv: fv.reparameterize_kl(m, v, prior=(pm, pv), reduction="per_sample"),
        "eager": prior_kl_eager,
        "compile": torch.compile(prior_kl_eager),
    }
    return inputs, grads, fns


def case_iwae_log_weight(shape, device):
    k, batch, latent = shape
    inputs = _inputs((batch, latent), 2, device, 2)
    g = torch.Generator().manual_seed(3)
    grads = (torch.randn(shape, generator=g).to(device), torch.randn(k, batch, generator=g).to(device))
    fns = {
        "fused": lambda m, v: tuple(fv.sample_gaussian(m, v, num_samples=k, log_density="ratio"))[::2],
        "eager": lambda m, v: iwae_terms_eager(m, v, k),
    }
    return inputs, grads, fns


def case_log_prob(shape, device):
    inputs = _inputs(shape, 3, device, 4)
    grads = (torch.randn(shape[0], generator=torch.Generator().manual_seed(5)).to(device),)
    fns = {
        "fused": lambda x, m, v: fv.gaussian_log_prob(x, m, v),
        "eager": log_prob_eager,
        "distributions": log_prob_distributions,
    }
    return inputs, grads, fns


CASES = {"prior_kl": case_prior_kl, "iwae_log_weight": case_iwae_log_weight, "log_prob": case_log_prob}
FLOOR_SHAPES = {"prior_kl": (32, 16, 32, 32), "iwae_log_weight": (50, 20, 50)}  # the cases with a speed target
QUICK_FLOOR_SHAPES = {"prior_kl": (4, 4, 8, 8), "iwae_log_weight": (5, 20, 50)}


def floor_parts(name, shape, device, min_run_time) -> dict:
    """Timings of the parts that bound the fused forward+backward of a case from below (module
    docstring), the eager expression's ``torch.randn``, and the bound on the speedup."""
    from fused_vae.backends import protocol as P

    inputs, grads, fns = CASES[name](shape, device)
    fwd, bwd = torch.ops.fused_vae.reparam_kl_fwd.default, torch.ops.fused_vae.reparam_kl_bwd.default
    seed = torch.tensor(7, device=device)
    x = [t.detach() for t in inputs]
    if name == "prior_kl":
        k, mu_shape, modes = 1, shape, (P.REDUCE_PER_SAMPLE, P.LOGQ_SKIP)
        args = (x[0], x[1], x[2], x[3], seed, 1, *modes, None, None)
        grad_args = (grads[0].unsqueeze(0), grads[1], None)
        tiny = case_prior_kl((1, 1), device)
    else:
        k, mu_shape, modes = shape[0], shape[1:], (P.REDUCE_SKIP, P.LOGQ_RATIO)
        args = (x[0], x[1], None, None, seed, k, *modes, None, None)
        grad_args = (grads[0], None, grads[1])
        tiny = case_iwae_log_weight((1, 1, 1), device)
    zeros, one = torch.zeros(mu_shape, device=device), torch.zeros((1, 1), device=device)
    steps = {
        "fused forward+backward": _fwd_bwd(fns["fused"], inputs, grads),
        "fixed cost (one element per row, one sample)": _fwd_bwd(tiny[2]["fused"], tiny[0], tiny[1]),
        "forward op": lambda: fwd(*args),
        "backward op": lambda: bwd(*grad_args, *args),
        "noise alone": lambda: fwd(zeros, zeros, None, None, seed, k, P.REDUCE_SKIP, P.LOGQ_SKIP, None, None),
        "noise alone, one element": lambda: fwd(one, one, None, None, seed, 1, P.REDUCE_SKIP, P.LOGQ_SKIP, None, None),
        "eager forward+backward": _fwd_bwd(fns["eager"], inputs, grads),
        "eager torch.randn": lambda: torch.randn(k, *mu_shape, device=device),
    }
    t = time_calls(steps, min_run_time=min_run_time)
    median = {part: v["median_s"] for part, v in t.items()}
    noise = median["noise alone"] - median["noise alone, one element"]  # less the op call's own cost
    bound = median["fixed cost (one element per row, one sample)"] + 2 * noise
    return {"timings": t, "noise_s": noise, "lower_bound_s": bound,
            "speedup_bound_vs_eager": median["eager forward+backward"] / bound,
            "speedup_vs_eager": median["eager forward+backward"] / median["fused forward+backward"]}


def peak_bytes(step, device) -> int:
    """Peak memory of one call of ``step`` above what was in use before."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return peak_rss_delta_bytes(step)


def run_case(name, shape, device, min_run_time):
    """The timings and the bytes kept for backward of every implementation of one case."""
    inputs, grads, fns = CASES[name](shape, device)
    steps = {impl: _fwd_bwd(fn, inputs, grads) for impl, fn in fns.items()}
    timings = time_calls(steps, min_run_time=min_run_time)
    out = {impl: {"forward+backward": timings[impl], "bytes_kept_for_backward": saved_bytes(lambda: fn(*inputs), inputs)}
           for impl, fn in fns.items()}  # fmt: skip
    out["speedup_of_fused"] = {impl: speedup(timings, impl, "fused") for impl in fns if impl != "fused"}
    return out


def peak_memory(name, shape, device, rounds) -> dict:
    """``{impl: (median, all)}`` peak memory of one forward+backward of each implementation,
    ``rounds`` times in turn."""
    inputs, grads, fns = CASES[name](shape, device)
    steps = {impl: _fwd_bwd(fn, inputs, grads) for impl, fn in fns.items()}
    for step in steps.values():  # compiled code and the allocator warmed up
        step()
    peaks = {impl: [] for impl in steps}
    for _ in range(rounds):
        for impl, step in steps.items():
            peaks[impl].append(peak_bytes(step, device))
    return {impl: (int(statistics.median(v)), v) for impl, v in peaks.items()}


def check_targets(results) -> dict:
    """The issue's targets against the measured numbers, per thread count."""
    checks = {}
    for threads, by_case in results.items():
        pk = by_case.get("prior_kl", {}).get("[32, 16, 32, 32]")
        iw = by_case.get("iwae_log_weight", {}).get("[50, 20, 50]")
        got = {}
        if pk:
            got["prior_kl [32, 16, 32, 32] fwd+bwd vs eager"] = pk["speedup_of_fused"]["eager"]["median"]
            got["prior_kl [32, 16, 32, 32] fwd+bwd vs compile"] = pk["speedup_of_fused"]["compile"]["median"]
            got["prior_kl [32, 16, 32, 32] bytes kept for backward beyond the inputs"] = pk["fused"][
                "bytes_kept_for_backward"]
        if iw:
            got["iwae_log_weight [50, 20, 50] fwd+bwd vs eager"] = iw["speedup_of_fused"]["eager"]["median"]
        checks[threads] = {
            key: {"target": TARGETS[key], "measured": value,
                  "met": value <= TARGETS[key] if "bytes" in key else value >= TARGETS[key]}
            for key, value in got.items()
        }  # fmt: skip
    return checks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="torch threads on the CPU (default: 1 and every core)")
    p.add_argument("--min-run-time", type=float, default=2.0, help="seconds timed per implementation")
    p.add_argument("--rounds", type=int, default=5, help="peak-memory measurements per implementation")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--quick", action="store_true", help="small sizes, short runs, no result file unless --out")
    p.add_argument("--out", type=Path, default=None, help="result file (default: results/<device>-terms-<date>.json)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_terms: no CUDA device", file=sys.stderr)
        return 2
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.quick:
        args.min_run_time, args.rounds = 0.1, 1
    threads = args.threads or (sorted({1, os.cpu_count() or 1}) if device.type == "cpu" else [torch.get_num_threads()])
    env = environment()
    results = {}
    for n in threads:  # timings with the allocator as a user has it
        torch.set_num_threads(n)
        results[f"{n} threads"] = {}
        for name in args.cases:
            results[f"{n} threads"][name] = {}
            for shape in shapes[name]:
                r = run_case(name, shape, device, args.min_run_time)
                results[f"{n} threads"][name][str(list(shape))] = r
                ratios = "  ".join(f"x{s['median']:.2f} vs {impl}" for impl, s in r["speedup_of_fused"].items())
                fused = r["fused"]["forward+backward"]["median_s"]
                kept = ", ".join(f"{i} {v['bytes_kept_for_backward']} B" for i, v in r.items() if i != "speedup_of_fused")
                print(f"{n} threads {name} {list(shape)}: fused {fused * 1e6:9.1f} us  {ratios}  kept for backward: "
                      f"{kept}", flush=True)
    floors = {}
    if device.type == "cpu":
        torch.set_num_threads(threads[0])
        floor_shapes = QUICK_FLOOR_SHAPES if args.quick else FLOOR_SHAPES
        for name in (c for c in args.cases if c in floor_shapes):
            shape = floor_shapes[name]
            f = floors[f"{name} {list(shape)}"] = floor_parts(name, shape, device, args.min_run_time)
            parts = ", ".join(f"{p} {us(v['median_s'])}" for p, v in f["timings"].items())
            print(f"{threads[0]} threads {name} floor: {parts}; fused {f['speedup_vs_eager']:.2f}x eager, "
                  f"at most {f['speedup_bound_vs_eager']:.2f}x (fixed cost + noise twice)", flush=True)
    # Peak memory last: on the CPU it needs every large allocation mmapped (so that the resident
    # set follows what is allocated), which would have slowed the timings above.
    mmapped = mmap_large_allocations() if device.type == "cpu" else None
    torch.set_num_threads(threads[0])
    for name in args.cases:
        for shape in shapes[name]:
            for impl, (median, values) in peak_memory(name, shape, device, args.rounds).items():
                for by_threads in results.values():
                    by_threads[name][str(list(shape))][impl].update(peak_bytes_median=median, peak_bytes_all=values)
    checks = check_targets(results)
    for t, c in checks.items():
        for key, v in c.items():
            print(f"{'PASS' if v['met'] else 'MISS'} {t}: {key}: {v['measured']:.3g} (target {v['target']})")
    if args.quick and args.out is None:
        return 0
    payload = {
        "benchmark": "benchmarks/bench_terms.py",
        "what": __doc__.split("\n\n")[1].strip(),
        "device": args.device,
        "method": timing_method(args.min_run_time) + "; forward+backward = the forward and torch.autograd.grad of "
        "its outputs against fixed random gradients; bytes_kept_for_backward: distinct storages autograd saves "
        "(saved_tensors_hooks) beyond the inputs and outputs (the fused ops keep the 8-byte seed); peak_bytes "
        "(measured after all timings, at the first thread count): resident-set peak above the start (CPU, glibc "
        f"mmap threshold 64 KiB set: {mmapped}) or allocator peak (GPU) of one forward+backward",
        "environment": env | {"load_average_at_end": load_average()},
        "targets": TARGETS,
        "results": results,
        "floor": floors,
        "target_checks": checks,
    }
    return save_result(args, f"{args.device}-terms", payload)


if __name__ == "__main__":
    sys.exit(main())

"""CPU benchmark: the fused op against eager PyTorch and torch.compile of the plain code.

Measures forward, backward and forward+backward for float32 and bfloat16 at sizes from
128x64 to 4096x1024, all in one run on the same threads, and writes a JSON result file
with the machine, versions, date and raw numbers. Ratios are the meaningful output on a
noisy machine: every implementation is timed in the same run.

    python benchmarks/bench_cpu.py --threads 2 --out benchmarks/results/cpu-<date>.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fused_vae as fv  # noqa: E402
from common import RESULTS_DIR, environment, write_result  # noqa: E402
from plain import reparameterize_kl_eager  # noqa: E402

SIZES = [(128, 64), (512, 256), (1024, 512), (4096, 1024)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODES = ("forward", "backward", "forward+backward")
# Minimum bytes moved, in units of elements: forward reads mu, logvar and writes z;
# backward reads grad_z, mu, logvar and writes grad_mu, grad_logvar.
MIN_ELEMENTS_MOVED = {"forward": 3, "backward": 5, "forward+backward": 8}
MAX_RAW_TIMES = 100  # raw per-run times kept in the result file (evenly spaced)


def fused(mu, logvar):
    return fv.reparameterize_kl(mu, logvar, backend="cpu")


def make_case(impl, mu, lv, gz, gkl, mode):
    """(setup, timed) callables for one step of ``mode``; setup's result feeds timed.

    The backward is timed on a fresh forward graph each iteration (the forward itself is
    untimed) because compiled backward graphs cannot be retained and replayed.
    """
    if mode == "forward":
        return (lambda: None), (lambda _: impl(mu, lv))
    if mode == "backward":
        return (lambda: impl(mu, lv)), (lambda out: torch.autograd.grad(out, (mu, lv), (gz, gkl)))

    def step(_):
        z, kl = impl(mu, lv)
        return torch.autograd.grad((z, kl), (mu, lv), (gz, gkl))

    return (lambda: None), step


def measure(setup, timed, min_run_time: float, min_runs: int = 20) -> dict:
    """Median wall time of ``timed(setup())`` over at least min_runs runs and min_run_time s."""
    for _ in range(3):
        timed(setup())  # warm up (and trigger compilation)
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_run_time:
        state = setup()
        t0 = time.perf_counter()
        timed(state)
        times.append(time.perf_counter() - t0)
    q1, _, q3 = statistics.quantiles(times, n=4)
    stride = max(1, len(times) // MAX_RAW_TIMES)
    return {
        "median_s": statistics.median(times),
        "iqr_s": q3 - q1,
        "min_s": min(times),
        "runs": len(times),
        "times_s_every_nth": stride,
        "times_s": times[::stride][:MAX_RAW_TIMES],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per case")
    parser.add_argument("--sizes", default=None, help="comma list like 128x64,4096x1024 (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="result JSON path")
    args = parser.parse_args(argv)

    if not fv.available_backends()["cpu"].available:
        print("cpu backend unavailable:", fv.available_backends()["cpu"].reason, file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    sizes = SIZES if args.sizes is None else [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    impls = {
        "fused": fused,
        "eager": reparameterize_kl_eager,
        "compile": torch.compile(reparameterize_kl_eager, dynamic=False),
    }
    rows = []
    for dname, dtype in DTYPES.items():
        for shape in sizes:
            g = torch.Generator().manual_seed(0)
            mu = torch.randn(shape, generator=g).to(dtype).requires_grad_()
            lv = torch.randn(shape, generator=g).to(dtype).requires_grad_()
            gz = torch.randn(shape, generator=g).to(dtype)
            gkl = torch.tensor(1.0)
            numel = mu.numel()
            for mode in MODES:
                result = {"dtype": dname, "shape": list(shape), "mode": mode}
                for name, impl in impls.items():
                    r = measure(*make_case(impl, mu, lv, gz, gkl, mode), args.min_run_time)
                    r["GB_per_s"] = MIN_ELEMENTS_MOVED[mode] * numel * mu.element_size() / r["median_s"] / 1e9
                    result[name] = r
                result["speedup_vs_eager"] = result["eager"]["median_s"] / result["fused"]["median_s"]
                result["speedup_vs_compile"] = result["compile"]["median_s"] / result["fused"]["median_s"]
                rows.append(result)
                print(
                    f"{dname:8s} {shape[0]:5d}x{shape[1]:<5d} {mode:17s} "
                    f"fused {result['fused']['median_s'] * 1e3:8.3f} ms ({result['fused']['GB_per_s']:5.1f} GB/s)  "
                    f"eager {result['eager']['median_s'] * 1e3:8.3f} ms  compile {result['compile']['median_s'] * 1e3:8.3f} ms  "
                    f"x{result['speedup_vs_eager']:.2f} vs eager  x{result['speedup_vs_compile']:.2f} vs compile",
                    flush=True,
                )
    out = args.out or RESULTS_DIR / f"cpu-{_dt.date.today().isoformat()}.json"
    payload = {
        "benchmark": "bench_cpu",
        "environment": environment(),
        "min_elements_moved": MIN_ELEMENTS_MOVED,
        "baseline": "benchmarks/plain.py: reparameterize_kl_eager (randn_like/exp/KL batch mean)",
        "results": rows,
    }
    print("wrote", write_result(out, payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

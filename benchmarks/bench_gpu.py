"""GPU benchmark of the fused backends against the plain PyTorch expression.

Measures, on one CUDA device, forward, backward and forward+backward of

    z, kl = fv.reparameterize_kl(mu, logvar, backend=...)        # "triton", "cuda"

against benchmarks/plain.py's expression (what users write), run eagerly and through
``torch.compile(mode="max-autotune-no-cudagraphs")``::

    z  = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    kl = 0.5 * (mu**2 + logvar.exp() - logvar - 1).sum() / B

for float32 and bfloat16 and sizes from [128, 32] to [64, 16, 128, 128] (and a
64M-element case). The device copy bandwidth (``dst.copy_(src)``) is measured in the same
run; achieved bandwidth is reported over the minimum bytes each pass must move:

    forward:          read mu, logvar; write z                    3 * N * elsize
    backward:         read grad_z, mu, logvar; write grad_mu, grad_logvar   5 * N * elsize
    forward+backward: the sum                                     8 * N * elsize

(the KL and its gradient are scalars). Timing: benchmarks/common.py's ``time_calls``
(``torch.utils.benchmark.Timer``, which synchronises the device around each block of
back-to-back calls, so host overheads such as launches count, as they do in training),
the implementations' blocks interleaved, median and IQR per call.

Usage (on the GPU machine, from the repository root)::

    PYTHONPATH=. python benchmarks/bench_gpu.py                  # writes results/gpu-ops-<time>.json
    PYTHONPATH=. python benchmarks/bench_gpu.py --quick          # fewer sizes, no max-autotune
    PYTHONPATH=. python benchmarks/bench_gpu.py --device cpu --tiny   # dry run (see below)

This is a benchmark, not a test: it prints a table and writes raw results (device,
versions, date) as JSON, and prints the file's path last; it refuses to run without CUDA.
``--device cpu`` only checks that the script runs (benchmarks/gpu_checks.sh --dry-run):
the backends then run on the emulated CUDA device (``FUSED_VAE_CUDA_EMULATE=1``) and in
the Triton interpreter (``TRITON_INTERPRET=1``), and ``--tiny`` keeps that short.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, result_path, time_calls, timing_method, write_result  # noqa: E402
from plain import reparameterize_kl_eager as plain  # noqa: E402

SIZES = [
    (128, 32),
    (4096, 16),
    (256, 512),
    (64, 4, 64, 64),
    (8, 16, 128, 128),
    (64, 16, 128, 128),
    (256, 16, 128, 128),  # 64M elements
]
QUICK_SIZES = [(128, 32), (4096, 16), (8, 16, 128, 128), (64, 16, 128, 128), (256, 16, 128, 128)]
PASSES = ("fwd", "bwd", "fwdbwd")
BYTES_PER_ELEMENT = {"fwd": 3, "bwd": 5, "fwdbwd": 8}  # x element size; see module docstring


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="result JSON path (default: benchmarks/results/gpu-ops-<time>.json)")
    p.add_argument("--backends", default="triton,cuda", help="fused backends to time (comma list; unavailable ones are recorded and skipped)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma list of float32, bfloat16, float16")
    p.add_argument("--sizes", default=None, help="semicolon list of shapes, e.g. '128x32;64x16x128x128' (default: the standard set)")
    p.add_argument("--passes", default=",".join(PASSES), help="comma list of fwd, bwd, fwdbwd")
    p.add_argument("--compile-mode", default="max-autotune-no-cudagraphs", help="torch.compile mode of the baseline ('none' to skip it)")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds of timing per implementation and case (default 1.0; 0.3 with --quick)")
    p.add_argument("--copy-mib", type=int, default=1024, help="size of each buffer of the copy-bandwidth measurement")
    p.add_argument("--quick", action="store_true", help="fewer sizes, compile mode 'default', short runs")
    p.add_argument("--device", default="cuda", help="device to time on (default cuda; 'cpu' only checks that the script runs)")
    p.add_argument("--tiny", action="store_true", help="dry run: one [4, 64] float32 case, no torch.compile, 0.01 s timings, 1 MiB copy")
    return p.parse_args(argv)


def copy_bandwidth(mib: int, min_run_time: float, device: str) -> dict:
    """Device-to-device copy bandwidth (read + write bytes per second) of dst.copy_(src)."""
    import torch

    n = mib * (1 << 20) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_calls({"copy": lambda: dst.copy_(src)}, min_run_time=min_run_time)["copy"]
    gbps = 2 * n * 4 / t["median_s"] / 1e9
    del src, dst
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return {"bytes_per_copy": 2 * n * 4, "GBps": gbps, **t}


# --------------------------------------------------------------------------- workloads


def make_impls(backends, compile_mode, availability):
    """``{name: fn(mu, logvar) -> (z, kl)}``: eager, torch.compile (unless 'none') and each available backend."""
    import torch

    import fused_vae as fv

    impls = {"eager": plain}
    if compile_mode != "none":
        impls["compile"] = torch.compile(plain, mode=compile_mode, fullgraph=True, dynamic=False)
    for name in backends:
        if availability[name]["available"]:
            impls[name] = lambda mu, lv, _b=name: fv.reparameterize_kl(mu, lv, backend=_b)
    return impls


def pass_fn(impl, kind, mu, lv, grad_z):
    """A zero-argument callable running one pass of ``impl``."""
    import torch

    if kind == "fwd":
        mu_d, lv_d = mu.detach(), lv.detach()

        def run():
            with torch.no_grad():
                return impl(mu_d, lv_d)

        return run
    ones = torch.ones((), device=mu.device, dtype=torch.float32)
    if kind == "fwdbwd":

        def run():
            z, kl = impl(mu, lv)
            return torch.autograd.grad((z, kl), (mu, lv), (grad_z, ones.to(kl.dtype)))

        return run
    z, kl = impl(mu, lv)  # backward only: one forward, backward replayed on a retained graph
    gkl = ones.to(kl.dtype)

    def run():
        return torch.autograd.grad((z, kl), (mu, lv), (grad_z, gkl), retain_graph=True)

    return run


def sanity(impl, mu, lv):
    """Relative difference of the fused KL to the eager KL (a guard against timing broken code)."""
    import torch

    with torch.no_grad():
        _, kl = impl(mu.detach(), lv.detach())
        _, ref = plain(mu.detach().double(), lv.detach().double())
    return abs(float(kl) - float(ref)) / max(abs(float(ref)), 1e-30)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA device; nothing was measured.", file=sys.stderr)
        return 2
    import fused_vae as fv

    if args.tiny:
        args.sizes, args.dtypes, args.compile_mode, args.min_run_time, args.copy_mib = "4x64", "float32", "none", 0.01, 1
    if args.quick and args.compile_mode == "max-autotune-no-cudagraphs":
        args.compile_mode = "default"
    min_run_time = args.min_run_time or (0.3 if args.quick else 1.0)
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(";")] if args.sizes else (QUICK_SIZES if args.quick else SIZES)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    passes = [p for p in args.passes.split(",") if p]
    backends = [b for b in args.backends.split(",") if b]
    info = fv.available_backends()
    availability = {b: {"available": info[b].available and dev.type in info[b].devices, "reason": info[b].reason} for b in backends}
    meta = {
        "environment": environment(),
        "backends": availability,
        "compile_mode": args.compile_mode,
        "method": timing_method(min_run_time) + " (the device synchronised around each block, host overhead "
                  "included); fused backends with seed=None and reduction='batchmean'; bwd = autograd.grad on a retained graph",
        "bytes_model": "fwd 3*N*elsize, bwd 5*N*elsize, fwdbwd 8*N*elsize",
    }
    print(meta)
    copy = copy_bandwidth(args.copy_mib, min_run_time, args.device)
    print(f"copy bandwidth: {copy['GBps']:.0f} GB/s")
    impls = make_impls(backends, args.compile_mode, availability)
    out = Path(args.out) if args.out else result_path("gpu-ops", quick=args.quick)

    rows = []
    for dtype in dtypes:
        for shape in sizes:
            torch._dynamo.reset()
            n = math.prod(shape)
            esize = torch.empty((), dtype=dtype).element_size()
            g = torch.Generator(device=dev).manual_seed(0)
            mu = torch.randn(shape, device=dev, dtype=dtype, generator=g).requires_grad_(True)
            lv = (0.5 * torch.randn(shape, device=dev, dtype=dtype, generator=g)).requires_grad_(True)
            grad_z = torch.randn(shape, device=dev, dtype=dtype, generator=g)
            checks = {name: sanity(impls[name], mu, lv) for name in backends if name in impls}
            for kind in passes:
                base = {"shape": list(shape), "numel": n, "dtype": str(dtype).replace("torch.", ""), "pass": kind}
                fns, new_rows = {}, []
                for name, impl in impls.items():
                    try:
                        fns[name] = pass_fn(impl, kind, mu, lv, grad_z)
                    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                        new_rows.append({**base, "impl": name, "error": f"{type(e).__name__}: {e}"[:500]})
                for name, fn in list(fns.items()):  # a first call, so a failing implementation is recorded alone
                    try:
                        fn()
                    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                        new_rows.append({**base, "impl": name, "error": f"{type(e).__name__}: {e}"[:500]})
                        del fns[name]
                timings = time_calls(fns, min_run_time=min_run_time)
                min_bytes = BYTES_PER_ELEMENT[kind] * n * esize
                for name, t in timings.items():
                    gbps = min_bytes / t["median_s"] / 1e9
                    entry = {**base, "impl": name, **t, "min_bytes": min_bytes, "GBps": gbps, "frac_copy_bw": gbps / copy["GBps"]}
                    if name in checks:
                        entry["kl_rel_diff_vs_float64"] = checks[name]
                    for ref in ("eager", "compile"):
                        if ref in timings and name != ref:
                            entry[f"speedup_vs_{ref}"] = timings[ref]["median_s"] / t["median_s"]
                    new_rows.append(entry)
                for entry in new_rows:
                    if "error" in entry:
                        print(f"{entry['dtype']:>8} {str(shape):>20} {kind:>6} {entry['impl']:>8}  ERROR {entry['error'][:120]}")
                        continue
                    print(
                        f"{entry['dtype']:>8} {str(shape):>20} {kind:>6} {entry['impl']:>8} "
                        f"{entry['median_s'] * 1e6:9.1f} us {entry['GBps']:7.0f} GB/s {100 * entry['frac_copy_bw']:5.1f}% copy"
                        + "".join(f"  x{entry[k]:.2f} vs {k[11:]}" for k in ("speedup_vs_eager", "speedup_vs_compile") if k in entry)
                    )
                rows += new_rows
            del mu, lv, grad_z
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            # partial results survive an interrupted run
            write_result(out, {"meta": meta, "copy_bandwidth": copy, "results": rows, "complete": False})

    targets = evaluate_targets(rows, backends)
    for line in targets:
        print(line)
    write_result(out, {"meta": meta, "copy_bandwidth": copy, "results": rows, "targets": targets, "complete": True})
    print(out)
    return 0


def evaluate_targets(rows, backends):
    """The GPU targets, stated against the measured rows (no judgement where data is missing):
    at 64M elements forward+backward at >= 85% of copy bandwidth and >= 1.3x torch.compile;
    at [128, 32] forward+backward >= 5x eager."""
    lines = []
    for b in backends:
        for dtype in ("float32", "bfloat16"):
            mine = [r for r in rows if r["impl"] == b and r["pass"] == "fwdbwd" and r["dtype"] == dtype and "median_s" in r]
            for r in (r for r in mine if r["numel"] >= 64 * 2**20):
                ok = r["frac_copy_bw"] >= 0.85 and r.get("speedup_vs_compile", 0) >= 1.3
                lines.append(
                    f"[{'PASS' if ok else 'MISS'}] {b} {dtype} fwd+bwd {r['shape']}: {100 * r['frac_copy_bw']:.1f}% of copy bandwidth (target 85%), "
                    f"x{r.get('speedup_vs_compile', float('nan')):.2f} vs torch.compile (target 1.3)"
                )
            for r in (r for r in mine if r["shape"] == [128, 32]):
                ok = r.get("speedup_vs_eager", 0) >= 5
                lines.append(f"[{'PASS' if ok else 'MISS'}] {b} {dtype} fwd+bwd [128, 32]: x{r.get('speedup_vs_eager', float('nan')):.2f} vs eager (target 5)")
    return lines


if __name__ == "__main__":
    t0 = time.time()
    rc = main()
    print(f"total {time.time() - t0:.0f} s", file=sys.stderr)
    sys.exit(rc)

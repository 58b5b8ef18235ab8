"""The sampling op against an earlier revision: the same bits, and the speed of each.

Issue 21 asks that ``prior=None`` stay today's op: same results, bits and speed
(``--family plain``, the default). ``--family terms`` compares the op's other uses the same
way (a learned prior, the log density, their gradients), to show that a kernel change keeps
their bits and to measure what it gains. This script
checks out ``--base`` (a git revision) into a temporary worktree, builds its extension in a
cache of its own, and runs the same worker in a fresh process per revision and round,
alternating which goes first:

- bits: ``fv.reparameterize_kl`` / ``reparameterize`` / ``gaussian_kl`` outputs and their
  gradients (``torch.autograd.grad`` with fixed upstream gradients) for every reduction,
  ``num_samples`` None / 1 / 4, with and without ``logvar_clamp``, float32 / bfloat16 /
  float64, shapes [128, 32], [7, 13], [3, 5000], on the default CPU backend; compared with
  ``torch.equal`` between the revisions;
- speed: forward+backward of ``fv.reparameterize_kl(mu, logvar)`` (batchmean) at [128, 32] and
  4096x1024 float32, at 1 thread and at every core, timed with benchmarks/common.py's
  ``time_calls`` in each worker.

- ``--family terms``: bits of ``fv.sample_gaussian`` (prior or none, log density q / ratio,
  path gradient or not, 1 / 5 samples, clamp or not) and ``fv.reparameterize_kl`` /
  ``fv.gaussian_kl`` with a prior, float32 / bfloat16 / float64, shapes [128, 32], [7, 13],
  [3, 5000], [20, 50]; speed: bench_terms.py's fused forward+backward of the prior KL at
  [32, 16, 32, 32] and [128, 32] and of the IWAE log-weight terms at [5, 20, 50] and [50, 20, 50].

    python benchmarks/bench_regression.py --base c065eed            # about 6 minutes on 2 cores
    python benchmarks/bench_regression.py --base c065eed --quick    # 1 round, short timings
    python benchmarks/bench_regression.py --base 6cbd2fd --family terms
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SIZES = [(128, 32), (4096, 1024)]
BIT_SHAPES = [(128, 32), (7, 13), (3, 5000)]


TERMS_BIT_SHAPES = [(128, 32), (7, 13), (3, 5000), (20, 50)]


def bit_cases():
    """(name, function, kwargs, dtype, shape) of every call of the plain op whose bits are compared."""
    import fused_vae as fv

    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for shape in BIT_SHAPES:
            for reduction in ("none", "per_sample", "sum", "batchmean"):
                for samples in (None, 1, 4):
                    for clamp in (None, (-1.0, 1.5)):
                        kw = dict(reduction=reduction, seed=1234, num_samples=samples, logvar_clamp=clamp)
                        out.append((f"reparameterize_kl {dtype} {shape} {kw}", fv.reparameterize_kl, kw, dtype, shape))
            out.append((f"reparameterize {dtype} {shape}", fv.reparameterize, dict(seed=99, num_samples=3), dtype, shape))
            out.append((f"gaussian_kl {dtype} {shape}", fv.gaussian_kl, dict(reduction="per_sample"), dtype, shape))
    return out


def terms_bit_outputs() -> dict:
    """``{name: [outputs and gradients]}`` of the op with a prior or a log density."""
    import fused_vae as fv

    results = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for shape in TERMS_BIT_SHAPES:
            g = torch.Generator().manual_seed(len(str(shape)) + len(str(dtype)))
            mu, lv, pm, pl = (torch.randn(shape, generator=g).to(dtype).requires_grad_() for _ in range(4))
            calls = []
            for prior in (None, (pm, pl)):
                for density in ("q", "ratio"):
                    for path in (False, True):
                        for k in (1, 5):
                            for clamp in (None, (-1.0, 1.0)):
                                kw = dict(prior=prior, num_samples=k, kl="per_sample", log_density=density,
                                          path_gradient=path, seed=123, logvar_clamp=clamp)
                                name = f"sample_gaussian {dtype} {shape} prior={prior is not None} " + str(
                                    {key: v for key, v in kw.items() if key != "prior"})
                                calls.append((name, fv.sample_gaussian, kw))
            for reduction in ("none", "per_sample", "sum"):
                kw = dict(prior=(pm, pl), reduction=reduction)
                calls.append((f"reparameterize_kl {dtype} {shape} prior {reduction}", fv.reparameterize_kl,
                              kw | dict(seed=5)))
                calls.append((f"gaussian_kl {dtype} {shape} prior {reduction}", fv.gaussian_kl, kw))
            for name, fn, kw in calls:
                outs = fn(mu, lv, **kw)
                outs = tuple(o for o in (outs if isinstance(outs, tuple) else (outs,)) if o is not None)
                grads = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
                inputs = (mu, lv, pm, pl) if kw.get("prior") is not None else (mu, lv)
                results[name] = [t.detach() for t in (*outs, *torch.autograd.grad(outs, inputs, grads))]
    return results


def terms_steps() -> dict:
    """bench_terms.py's fused forward+backward steps of the prior KL and the IWAE terms."""
    from bench_terms import case_iwae_log_weight, case_prior_kl

    steps = {}
    for name, case, shapes in (("prior_kl", case_prior_kl, [(32, 16, 32, 32), (128, 32)]),
                               ("iwae_log_weight", case_iwae_log_weight, [(5, 20, 50), (50, 20, 50)])):
        for shape in shapes:
            inputs, grads, fns = case(shape, torch.device("cpu"))

            def step(fn=fns["fused"], inputs=inputs, grads=grads):
                torch.autograd.grad(fn(*inputs), inputs, grads)

            steps[f"{name} {list(shape)}"] = step
    return steps


def worker(out_path: str, min_run_time: float, family: str = "plain") -> None:
    """Runs in a fresh process on one revision: writes its outputs and timings to ``out_path``."""
    sys.path.insert(0, str(HERE))
    import fused_vae as fv
    from common import time_calls

    fv.available_backends()
    results = {"fused_vae": fv.__file__, "bits": {}, "timings": {}}
    if family == "terms":
        results["bits"] = terms_bit_outputs()
        for threads in sorted({1, os.cpu_count() or 1}):
            torch.set_num_threads(threads)
            for key, t in time_calls(terms_steps(), min_run_time=min_run_time).items():
                results["timings"][f"{threads} threads {key}"] = {"median_s": t["median_s"], "p10_s": t["p10_s"]}
        torch.save(results, out_path)
        return
    for name, fn, kw, dtype, shape in bit_cases():
        g = torch.Generator().manual_seed(len(name))
        mu = torch.randn(shape, generator=g).to(dtype).requires_grad_()
        lv = torch.randn(shape, generator=g).to(dtype).requires_grad_()
        outs = fn(mu, lv, **kw)
        outs = outs if isinstance(outs, tuple) else (outs,)
        grads = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
        gm, gl = torch.autograd.grad(outs, (mu, lv), grads, allow_unused=True)
        results["bits"][name] = [t.detach() for t in (*outs, gm, gl)]
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        for shape in SIZES:
            g = torch.Generator().manual_seed(0)
            mu, lv = (torch.randn(shape, generator=g).requires_grad_() for _ in range(2))
            gz = torch.randn(shape, generator=g)

            def step():
                z, kl = fv.reparameterize_kl(mu, lv)
                torch.autograd.grad((z, kl), (mu, lv), (gz, torch.ones(())))

            t = time_calls({"fwd_bwd": step}, min_run_time=min_run_time)["fwd_bwd"]
            results["timings"][f"{threads} threads {list(shape)}"] = {"median_s": t["median_s"], "p10_s": t["p10_s"]}
    torch.save(results, out_path)


def _run_worker(tree: Path, ext_dir: str, out: Path, min_run_time: float, family: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "TORCH_EXTENSIONS_DIR": ext_dir}
    env.pop("FUSED_VAE_BACKEND", None)
    cmd = [sys.executable, str(HERE / "bench_regression.py"), "--worker", str(out), "--min-run-time", str(min_run_time),
           "--family", family]
    done = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"worker on {tree} failed:\n{done.stderr[-3000:]}")
    return torch.load(out, weights_only=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=False, help="the git revision to compare with (e.g. c065eed)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-run-time", type=float, default=2.0)
    p.add_argument("--quick", action="store_true", help="1 round, 0.3 s timings, no result file")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--family", default="plain", choices=("plain", "terms"),
                   help="plain: the op without a prior or log density; terms: with them")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.min_run_time, args.family)
        return 0
    if not args.base:
        p.error("--base is required")
    sys.path.insert(0, str(HERE))
    from common import environment, load_average, save_result

    if args.quick:
        args.rounds, args.min_run_time = 1, 0.3
    env = environment()
    base_sha = subprocess.run(["git", "rev-parse", args.base], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="bench-regression-") as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), base_sha], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            trees = {"base": (base_tree, str(Path(tmp) / "ext-base")), "current": (ROOT, str(Path(tmp) / "ext-current"))}
            rounds = []
            for r in range(args.rounds):
                order = ("base", "current") if r % 2 == 0 else ("current", "base")
                rounds.append({name: _run_worker(*trees[name], Path(tmp) / f"{name}-{r}.pt", args.min_run_time,
                                           args.family)
                               for name in order})
                print(f"round {r + 1}/{args.rounds}: " + "; ".join(
                    f"{k} {rounds[-1]['current']['timings'][k]['median_s'] / rounds[-1]['base']['timings'][k]['median_s']:.3f}x"
                    for k in rounds[-1]["base"]["timings"]), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, capture_output=True)
    first = rounds[0]
    differ = [name for name, outs in first["base"]["bits"].items()
              if not all(torch.equal(a, b) for a, b in zip(outs, first["current"]["bits"][name]))]
    same_across_rounds = all(torch.equal(a, b) for rd in rounds[1:] for name, outs in rd["current"]["bits"].items()
                             for a, b in zip(outs, first["current"]["bits"][name]))
    speed = {}
    for key in first["base"]["timings"]:
        base = [rd["base"]["timings"][key]["median_s"] for rd in rounds]
        cur = [rd["current"]["timings"][key]["median_s"] for rd in rounds]
        speed[key] = {"base_median_s": base, "current_median_s": cur,
                      "ratio_current_over_base_of_medians": statistics.median(cur) / statistics.median(base),
                      "ratio_per_round": [c / b for c, b in zip(cur, base)]}
        print(f"{key}: current / base {speed[key]['ratio_current_over_base_of_medians']:.3f} "
              f"(base {statistics.median(base) * 1e6:.1f} us, current {statistics.median(cur) * 1e6:.1f} us)")
    print(f"bits: {len(first['base']['bits']) - len(differ)} of {len(first['base']['bits'])} calls identical")
    for name in differ[:10]:
        print(f"  differs: {name}")
    if args.quick:
        return 0 if not differ else 1
    payload = {
        "benchmark": "benchmarks/bench_regression.py",
        "what": __doc__.split("\n\n")[1].strip(),
        "base": base_sha,
        "family": args.family,
        "environment": env | {"load_average_at_end": load_average()},
        "rounds": args.rounds,
        "bits": {"calls": len(first["base"]["bits"]), "identical": len(first["base"]["bits"]) - len(differ),
                 "differ": differ, "current_reproducible_across_rounds": same_across_rounds},
        "speed": speed,
    }
    save_result(args, "cpu-regression" if args.family == "plain" else "cpu-regression-terms", payload)
    return 0 if not differ else 1


if __name__ == "__main__":
    sys.exit(main())

"""Training-step benchmark: the default ``fused-vae train`` model against the same model
written as a plain PyTorch loop, side by side in one run.

The default run (fused_vae/training/config.py) trains ``MLPVAE`` on the 8x8 digits
([1, 8, 8] in [0, 1]): 200-200 tanh encoder and decoder, 50 latents, Bernoulli
likelihood, batch 100, AdamW (lr 1e-3, fused when torch has it), gradient-norm clipping
at 100, one thread for models this small. One step here is what the trainer does per
batch: zero the gradients, forward and loss, backward, clip, optimizer step.

- ``fused_vae``: ``fused_vae.models.MLPVAE`` with a new int noise seed every step, as
  the trainer passes (``derive_seed(seed, step)``);
- ``fused_vae_seed_none``: the same with ``seed=None`` (noise from torch's generator);
- ``plain``: benchmarks/plain.py's ``PlainMLPVAE`` (``nn.Linear`` + tanh, ``randn_like``,
  closed-form KL, BCE with logits) with the same initial weights and optimizer.

Also times forward+backward alone (no clipping, no optimizer). Data are random pixels
in [0, 1] of the digits' shape: values do not change the work. Before timing, the script
checks that both models compute the same loss for the same noise.

    python benchmarks/bench_train_step.py            # about 1 minute
    python benchmarks/bench_train_step.py --quick
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fused_vae as fv  # noqa: E402
from common import environment, load_average, save_result, speedup, time_calls, timing_method, us  # noqa: E402
from fused_vae.models import MLPVAE, derive_seed  # noqa: E402
from plain import PlainMLPVAE  # noqa: E402

INPUT_SHAPE = (1, 8, 8)  # scikit-learn's 8x8 digits, the default --data
LATENT_DIM, HIDDEN, BATCH = 50, (200, 200), 100
LR, WEIGHT_DECAY, GRAD_CLIP = 1e-3, 0.0, 100.0


def adamw(params) -> tuple[torch.optim.AdamW, bool]:
    """AdamW as the default run builds it: fused when torch supports it on the device."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True), True
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY), False


def build_models():
    """(library model, plain model with the same weights)."""
    torch.manual_seed(0)
    model = MLPVAE(INPUT_SHAPE, latent_dim=LATENT_DIM, hidden=HIDDEN, activation="tanh", likelihood="bernoulli")
    plain = PlainMLPVAE(math.prod(INPUT_SHAPE), LATENT_DIM, HIDDEN).copy_from(model)
    return model, plain


def check_same_model(model, plain, x) -> float:
    """Relative difference of the two models' losses for the same noise (must be ~1e-6).

    Raises:
        AssertionError: the losses differ, so the benchmark would compare different models.
    """
    seed = 12345
    eps = fv.standard_normal((x.shape[0], LATENT_DIM), seed)
    with torch.no_grad():
        fused = float(model(x, seed=seed)["loss"])
        ref = float(plain(x, eps=eps))
    rel = abs(fused - ref) / abs(ref)
    assert rel < 1e-4, f"the two models differ: fused loss {fused}, plain loss {ref}"
    return rel


def step_callables(model, plain, x) -> dict:
    """``{name: one training step}`` for the library model (two seed modes) and the plain loop."""
    opt_fused, _ = adamw(model.parameters())
    opt_plain, _ = adamw(plain.parameters())
    steps = itertools.count()

    def fused_step(seed_per_step: bool):
        def run():
            opt_fused.zero_grad(set_to_none=True)
            seed = derive_seed(0, next(steps)) if seed_per_step else None
            model(x, seed=seed)["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            opt_fused.step()
        return run

    def plain_step():
        opt_plain.zero_grad(set_to_none=True)
        plain(x).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), GRAD_CLIP)
        opt_plain.step()

    return {"fused_vae": fused_step(True), "fused_vae_seed_none": fused_step(False), "plain": plain_step}


def fwd_bwd_callables(model, plain, x) -> dict:
    """``{name: forward, loss and backward}`` (gradients accumulate; no optimizer)."""
    steps = itertools.count()

    def fused(seed_per_step: bool):
        def run():
            seed = derive_seed(0, next(steps)) if seed_per_step else None
            model(x, seed=seed)["loss"].backward()
        return run

    return {"fused_vae": fused(True), "fused_vae_seed_none": fused(False), "plain": lambda: plain(x).backward()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the trainer picks)")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help="seconds of timing per implementation and case (default 3.0; 0.6 with --quick)")
    parser.add_argument("--quick", action="store_true", help="short runs")
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON path (default: results/cpu-train-step-<time>.json)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    env = environment()
    min_run_time = args.min_run_time or (0.6 if args.quick else 3.0)
    model, plain = build_models()
    x = torch.rand(BATCH, *INPUT_SHAPE, generator=torch.Generator().manual_seed(1))
    rel = check_same_model(model, plain, x)
    fused_adamw = adamw([torch.nn.Parameter(torch.zeros(1))])[1]
    rows = []
    for case, make in (("train step", step_callables), ("forward+backward", fwd_bwd_callables)):
        timings = time_calls(make(model, plain, x), min_run_time=min_run_time)
        row = {"case": case, "threads": args.threads, "impls": timings,
               "speedup_vs_plain": {k: speedup(timings, "plain", k) for k in timings if k != "plain"}}
        rows.append(row)
        cells = "  ".join(f"{k} {us(t['median_s'])} ({us(t['p10_s']).strip()})" for k, t in timings.items())
        ratio = row["speedup_vs_plain"]["fused_vae"]
        print(f"{case:17s} t={args.threads} median (p10): {cells}  fused_vae x{ratio['median']:.3f} "
              f"(x{ratio['p10']:.3f}) vs plain", flush=True)
    step = rows[0]
    ratio = step["speedup_vs_plain"]["fused_vae"]
    target = (f"[{'PASS' if ratio['p10'] >= 1.0 else 'MISS'}] default training step, {args.threads} thread(s): "
              f"fused_vae x{ratio['p10']:.3f} vs plain by p10, x{ratio['median']:.3f} by median (target: >= 1, "
              f"no slower); medians: fused_vae {us(step['impls']['fused_vae']['median_s']).strip()}, plain "
              f"{us(step['impls']['plain']['median_s']).strip()}")
    print(target)
    payload = {
        "benchmark": "bench_train_step",
        "environment": {**env, "load_average_at_end": load_average()},
        "quick": args.quick,
        "model": {"input_shape": list(INPUT_SHAPE), "latent_dim": LATENT_DIM, "hidden": list(HIDDEN),
                  "activation": "tanh", "likelihood": "bernoulli", "batch_size": BATCH,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "optimizer": {"name": "AdamW", "lr": LR, "weight_decay": WEIGHT_DECAY, "fused": fused_adamw},
                  "grad_clip": GRAD_CLIP},
        "available_backends": {name: info.available for name, info in fv.available_backends().items()},
        "loss_check_rel_diff": rel,
        "method": timing_method(min_run_time) + " (seconds per step)",
        "target_line": target,
        "results": rows,
    }
    return save_result(args, "cpu-train-step", payload)


if __name__ == "__main__":
    raise SystemExit(main())

"""K-sample training-step benchmark on the IWAE paper's MNIST net, fused against plain
PyTorch, side by side in one run; plus the time of the final k = 5000 test NLL.

The net is ``fused-vae train --preset iwae-mnist``'s: 784-200-200-50 tanh encoder and
decoder, Bernoulli pixels, batch 20, Adam (eps 1e-4, no weight decay, no clipping). One
step: zero the gradients, forward and loss, backward, optimizer step. For K = 1, 5, 50 and
both objectives:

- ``fused_vae``: ``MLPVAE(x, objective=..., num_samples=K, seed=...)``: one fused call draws
  the K samples and the KL; log q(z|x) comes from ``(z - mu) / std``;
- ``plain``: the same layers (benchmarks/plain.py's ``PlainMLPVAE`` weights) with
  ``torch.randn`` over ``[K, B, 50]``, ``mu + std * eps`` broadcast, closed-form KL, BCE
  with logits, and for IWAE ``log q`` from the stored eps.

Before timing, each case checks that both compute the same loss for the same noise. The
evaluation part times ``fused_vae.training.evaluate`` with k = 5000 per test image, at the
trainer's settings and at the previous ones (65536 decoded rows per pass, 250 samples per
chunk), on the same thread count. From the measured step
times the script estimates the cost of a full Table 1 run (3280 epochs of 3000 steps).

    python benchmarks/bench_iwae_step.py            # about 2 minutes
    python benchmarks/bench_iwae_step.py --quick
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, save_result, time_calls, timing_method, us  # noqa: E402
from plain import PlainMLPVAE, plain_loss  # noqa: E402

import fused_vae as fv  # noqa: E402
from fused_vae.models import MLPVAE, derive_seed  # noqa: E402
from fused_vae.training import evaluation  # noqa: E402

INPUT_SHAPE = (1, 28, 28)
LATENT_DIM, HIDDEN, BATCH = 50, (200, 200), 20
LR, ADAM_EPS = 1e-3, 1e-4
SAMPLES = (1, 5, 50)
OBJECTIVES = ("elbo", "iwae")
TRAIN_EXAMPLES, PAPER_EPOCHS, SHORT_EPOCHS = 60000, 3280, 121
EVAL_K, TEST_EXAMPLES = 5000, 10000
def adam(params) -> torch.optim.AdamW:
    """Adam as the preset builds it (AdamW with no weight decay; fused when torch has it)."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=LR, eps=ADAM_EPS, weight_decay=0.0, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, lr=LR, eps=ADAM_EPS, weight_decay=0.0)


def build_models():
    """(library model, plain model with the same weights)."""
    torch.manual_seed(0)
    model = MLPVAE(INPUT_SHAPE, latent_dim=LATENT_DIM, hidden=HIDDEN, activation="tanh")
    plain = PlainMLPVAE(math.prod(INPUT_SHAPE), LATENT_DIM, HIDDEN).copy_from(model)
    return model, plain


def check_same_loss(model, plain, x, k: int, objective: str) -> float:
    """Relative difference of the two losses for the same noise.

    Raises:
        AssertionError: the losses differ, so the benchmark would compare different computations.
    """
    seed = 12345
    eps = fv.standard_normal((k, BATCH, LATENT_DIM), seed)
    with torch.no_grad():
        fused = float(model(x, seed=seed, objective=objective, num_samples=k)["loss"])
        # With K = 1 the library trains L_1 with the closed-form KL, the ELBO's estimator.
        ref = float(plain_loss(plain, x, k, "elbo" if k == 1 else objective, eps=eps))
    rel = abs(fused - ref) / abs(ref)
    assert rel < 1e-4, f"K={k} {objective}: fused loss {fused}, plain loss {ref}"
    return rel


def step_callables(model, plain, x, k: int, objective: str) -> dict:
    """``{name: one training step}`` for the library model and the plain code."""
    opt_fused, opt_plain = adam(model.parameters()), adam(plain.parameters())
    steps = itertools.count()

    def fused_step():
        opt_fused.zero_grad(set_to_none=True)
        model(x, seed=derive_seed(0, next(steps)), objective=objective, num_samples=k)["loss"].backward()
        opt_fused.step()

    def plain_step():
        opt_plain.zero_grad(set_to_none=True)
        plain_loss(plain, x, k, objective).backward()
        opt_plain.step()

    return {"fused_vae": fused_step, "plain": plain_step}


def eval_callables(model, test: torch.Tensor) -> dict:
    """``{name: k = 5000 NLL of test}`` at the trainer's and at the previous pass sizes."""
    def at(rows: int, chunk: int):
        def run():
            saved = evaluation.IWAE_ROWS
            evaluation.IWAE_ROWS = rows
            try:
                evaluation.evaluate(model, test, iwae_samples=EVAL_K, iwae_chunk=chunk, seed=0)
            finally:
                evaluation.IWAE_ROWS = saved
        return run

    return {f"rows{evaluation.IWAE_ROWS}_chunk50": at(evaluation.IWAE_ROWS, 50), "rows65536_chunk250": at(65536, 250)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the trainer picks "
                        "for this net)")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help="seconds of timing per implementation and case (default 3.0; 0.5 with --quick)")
    parser.add_argument("--eval-images", type=int, default=None,
                        help="test images per timed NLL evaluation (default 20; 4 with --quick)")
    parser.add_argument("--quick", action="store_true", help="short runs")
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON path (default: results/cpu-iwae-step-<time>.json)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    min_run_time = args.min_run_time or (0.5 if args.quick else 3.0)
    x = (torch.rand(BATCH, *INPUT_SHAPE, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    rows = []
    for k, objective in itertools.product(SAMPLES, OBJECTIVES):
        model, plain = build_models()  # the timed steps train them apart
        rel = check_same_loss(model, plain, x, k, objective)
        timings = time_calls(step_callables(model, plain, x, k, objective), min_run_time=min_run_time)
        fused_s, plain_s = timings["fused_vae"]["median_s"], timings["plain"]["median_s"]
        steps = TRAIN_EXAMPLES // BATCH
        # On a shared machine the fastest block is the better estimate of an unloaded step.
        fused_min, plain_min = timings["fused_vae"]["min_s"], timings["plain"]["min_s"]
        row = {"objective": objective, "K": k, "threads": args.threads, "loss_check_rel_diff": rel,
               "impls": timings, "speedup_vs_plain": plain_s / fused_s, "speedup_vs_plain_min": plain_min / fused_min,
               "paper_run_hours_fused": fused_s * steps * PAPER_EPOCHS / 3600,
               "paper_run_hours_fused_min": fused_min * steps * PAPER_EPOCHS / 3600,
               "short_run_hours_fused_min": fused_min * steps * SHORT_EPOCHS / 3600}
        rows.append(row)
        print(f"{objective:4s} K={k:<3d} median: fused {us(fused_s)} plain {us(plain_s)} x{row['speedup_vs_plain']:.3f}"
              f" | min: fused {us(fused_min)} plain {us(plain_min)} x{row['speedup_vs_plain_min']:.3f} | 3280 epochs "
              f"{row['paper_run_hours_fused_min']:.1f} h, 121 epochs {row['short_run_hours_fused_min']:.2f} h (min)",
              flush=True)

    n_eval = args.eval_images or (4 if args.quick else 20)
    test = (torch.rand(n_eval, *INPUT_SHAPE, generator=torch.Generator().manual_seed(2)) < 0.3).float()
    model.eval()
    eval_t = time_calls(eval_callables(model, test), min_run_time=min_run_time, warmup=1)
    eval_rows = {name: {**t, "seconds_per_image_min": t["min_s"] / n_eval,
                        "test_set_minutes_min": t["min_s"] / n_eval * TEST_EXAMPLES / 60} for name, t in eval_t.items()}
    for name, r in eval_rows.items():
        print(f"k={EVAL_K} NLL, {name}, {args.threads} thread(s): {r['seconds_per_image_min'] * 1e3:.1f} ms per image "
              f"(min) -> {r['test_set_minutes_min']:.1f} min for {TEST_EXAMPLES} test images", flush=True)

    table1_hours = sum(r["paper_run_hours_fused_min"] for r in rows)
    print(f"all six Table 1 rows (VAE and IWAE, K = 1, 5, 50), fused, {args.threads} thread(s): "
          f"{table1_hours:.0f} h of training (from the fastest blocks)")
    payload = {
        "benchmark": "bench_iwae_step",
        "environment": environment(),
        "quick": args.quick,
        "model": {"input_shape": list(INPUT_SHAPE), "latent_dim": LATENT_DIM, "hidden": list(HIDDEN),
                  "activation": "tanh", "likelihood": "bernoulli", "batch_size": BATCH,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "optimizer": {"name": "AdamW", "lr": LR, "eps": ADAM_EPS, "weight_decay": 0.0}},
        "method": timing_method(min_run_time) + " (seconds per training step / per evaluation call)",
        "results": rows,
        "eval": {"k": EVAL_K, "images_per_call": n_eval, "threads": args.threads, "impls": eval_rows},
        "table1_training_hours_fused_all_rows_min": table1_hours,
    }
    return save_result(args, "cpu-iwae-step", payload)


if __name__ == "__main__":
    raise SystemExit(main())

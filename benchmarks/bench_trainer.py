"""Trainer benchmark: the ``fused-vae train`` command end to end against the same model
trained by a plain PyTorch loop, interleaved in one run (issue 15, item 3).

Each round runs, for every configuration and variant, ``python -m fused_vae train`` in a
fresh process (a temporary run directory, ``--overwrite``, ``--no-progress``,
``--threads 1``) and benchmarks/plain.py's :func:`train_plain` in this process (one torch
thread), alternating which goes first. Configurations, all on scikit-learn's bundled
digits (1437 training images of 8x8, 64 inputs):

- ``default``: the default run: 200-200-50 tanh MLP, Bernoulli, batch 100, fused Adam
  (torch AdamW, weight decay 0; lr 1e-3, eps 1e-8), gradient-norm clipping at 100, cosine schedule to
  0.1 lr at ``--max-steps``; the plain loop: ``PlainMLPVAE`` (``randn_like``, closed-form KL).
- ``iwae-<objective>-K<k>``: ``--preset iwae-mnist --data digits`` (the IWAE paper's
  200-200-50 tanh net, batch 20, dynamic binarization, Adam eps 1e-4, no clipping, the
  paper's lr stages) with ``--objective elbo|iwae --train-samples K``; the plain loop:
  ``torch.bernoulli`` binarization and :func:`plain_loss` (``torch.randn`` over [K, B, 50];
  IWAE: logsumexp over the K samples).
- ``iwae2-<objective>-K<k>``: ``--preset iwae-mnist-2layer --data digits`` (the paper's
  two-stochastic-layer net, x-200-200-h1(100)-100-100-h2(50), the same training setup); the
  plain loop: :func:`plain_two_layer_loss` on a fresh instance of the same layers.
- ``topdown-elbo-K1``, ``topdown-iwae-K5``: ``--model topdown --latent-dims 32 16 8 --hidden 200``
  (a top-down VAE with 3 stochastic layers and learned priors, the default run's training
  setup); the plain loop: :func:`plain_topdown_loss` (VDVAE-style sampling and KL).

Variants: ``eager``; ``compiled``: the trainer with ``--compile`` against the plain loop with
a ``torch.compile``-d loss (forward and backward graphs; clipping and fused Adam eager);
``cuda-graphs`` (``--device cuda``): the trainer with ``--cuda-graphs`` against the eager
plain loop, and its gain over the eager trainer step (issue 15's GPU target: >= 3x for the
default run). Both binarize anew each step in the IWAE-net runs (the trainer on the device,
from seeds of ``(seed, step, micro-batch)``; the plain loop with ``torch.bernoulli``). By
default only ``default`` and the two K = 5 configurations run the other variants (each
compiled trainer process compiles its step afresh, tens of seconds on a CPU);
``--compiled-configs`` picks others. ``--device cuda`` runs both sides on the GPU (the data
on the device; the plain loop reads its loss back every 50 steps, as the trainer's log does).

What the numbers include. Every trainer run passes ``--eval-every 0 --iwae-samples 0``
(no per-epoch test ELBO, no IWAE NLL), ``--amp off`` (float32, as the plain loop) and
``--log-every 50`` (the default run's; the preset's is 1000); checkpoints keep the
trainer's cadence (``last.pt`` about every 1000 steps, whole epochs)
because writing them is part of what the command costs. summary.json's ``train_time_s``
runs from the first step to the end of the final test-ELBO evaluation (the one evaluation
left) and covers the checkpoints, the first steps (allocator warm-up; with ``--compile``,
compilation) and the final checkpoint; image outputs are written after it and are not
included. So two numbers per run:

- ``end_to_end_ms_per_step``: ``train_time_s / steps`` (trainer) and the loop's total time
  / steps (plain; without evaluation or checkpoints, with compilation in round 1 only,
  since this process keeps its compiled code);
- ``steady_ms_per_step`` (the comparison the targets use): the time between the first and
  the last logged step (step 50 and the last step) over the steps between, from the
  trainer's metrics.jsonl ``time_s`` and the loop's own clock at the same steps. This
  leaves out start-up, compilation and the final evaluation; for the trainer it still
  holds the checkpoints written in that window (counted in the result, with the
  separately measured cost of one checkpoint).

Ratios are trainer / plain (below 1: the trainer is faster), per round and of the medians.

    python benchmarks/bench_trainer.py --quick     # about 3 minutes
    python benchmarks/bench_trainer.py             # about 12 minutes on 2 quiet cores
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, load_average, save_result  # noqa: E402
from plain import PlainMLPVAE, plain_topdown_loss, plain_two_layer_loss, train_plain  # noqa: E402

from fused_vae.training import config as config_module  # noqa: E402
from fused_vae.training.config import TrainConfig  # noqa: E402
from fused_vae.training.data import load_data  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOISE_NOTE = ("Timed on a shared machine (other jobs on the same cores): single rounds vary by tens of percent; "
              "read the medians and the spread, and rerun on a quiet machine before quoting.")
METHOD = ("trainer: `python -m fused_vae train` subprocess per run; plain: benchmarks/plain.py train_plain in the "
          "benchmark process; 1 thread each; rounds interleaved, order alternating. steady_ms_per_step: time between "
          "the first logged step (50) and the last over the steps between (trainer: metrics.jsonl time_s, includes "
          "the checkpoints written in that window; plain: perf_counter at the same steps). "
          "interval_median_ms_per_step: median over the 50-step intervals (robust to load bursts; leaves out the "
          "intervals with a checkpoint). end_to_end_ms_per_step: trainer summary.json train_time_s / steps (first "
          "step to the end of the final test-ELBO evaluation, incl. checkpoints and compilation); plain: whole "
          "loop / steps (compilation in the first round only). Ratios trainer / plain; values are per-round lists "
          "with median, min, max.")
LOG_EVERY = 50
# The trainer's flags per variant (the plain loop compiles its loss for "compiled" only).
VARIANT_FLAGS = {"eager": [], "compiled": ["--compile"], "cuda-graphs": ["--cuda-graphs"]}
# The trainer options every run shares: one thread, nothing but training between the logged steps.
COMMON_ARGS = ["--overwrite", "--no-progress", "--threads", "1", "--eval-every", "0", "--iwae-samples", "0",
               "--amp", "off"]  # float32 like the plain loop (auto would pick bf16 autocast on a GPU)


def configurations() -> dict[str, dict]:
    """``{name: {"args": trainer options, "plain": train_plain keyword arguments, "expect": config.json
    values the trainer must report}}`` for the default run and the IWAE preset's net on digits."""
    configs = {"default": {
        "args": [],
        "plain": dict(batch_size=100, objective="elbo", k=1, lr=1e-3, adam_eps=1e-8, grad_clip=100.0,
                      schedule="cosine", dynamic_binarize=False),
        "expect": dict(data="digits", hidden=[200, 200], latent_dim=50, activation="tanh", likelihood="bernoulli",
                       batch_size=100, objective="elbo", train_samples=1, lr=1e-3, adam_eps=1e-8, weight_decay=0.0,
                       grad_clip=100.0, lr_schedule="cosine", lr_warmup_steps=0, binarize="none", grad_accum=1),
    }}
    # The IWAE paper's one- and two-stochastic-layer nets (their presets) on digits; the two-layer
    # plain loop trains the same layers (a fresh instance of the model class) with plain.py's loss.
    nets = {
        "iwae": ("iwae-mnist", {}, dict(hidden=[200, 200], latent_dim=50), {}),
        "iwae2": ("iwae-mnist-2layer", dict(loss=plain_two_layer_loss),
                  dict(model="mlp2", hidden=[200, 200], latent_dims=[100, 50], upper_hidden=[100, 100]),
                  dict(net=dict(kind="mlp2", input_shape=[1, 8, 8], latent_dims=[100, 50], hidden=[200, 200],
                                upper_hidden=[100, 100], activation="tanh"))),
    }  # fmt: skip
    for prefix, (preset, plain_extra, expect_extra, extra) in nets.items():
        for objective in ("elbo", "iwae"):
            for k in (1, 5, 50):
                configs[f"{prefix}-{objective}-K{k}"] = {
                    "args": ["--preset", preset, "--data", "digits", "--objective", objective, "--train-samples", str(k)],
                    "plain": dict(batch_size=20, objective=objective, k=k, lr=1e-3, adam_eps=1e-4, grad_clip=0.0,
                                  schedule="iwae", dynamic_binarize=True, **plain_extra),
                    "expect": dict(data="digits", activation="tanh", likelihood="bernoulli", batch_size=20,
                                   objective=objective, train_samples=k, lr=1e-3, adam_eps=1e-4, weight_decay=0.0,
                                   grad_clip=0.0, lr_schedule="iwae", lr_warmup_steps=0, binarize="dynamic",
                                   grad_accum=1, **expect_extra),
                    **extra,
                }
    # A top-down VAE with 3 stochastic layers and learned priors, the default run's training setup.
    for objective, k in (("elbo", 1), ("iwae", 5)):
        configs[f"topdown-{objective}-K{k}"] = {
            "args": ["--model", "topdown", "--latent-dims", "32", "16", "8", "--hidden", "200", "--objective",
                     objective, "--train-samples", str(k)],
            "plain": dict(batch_size=100, objective=objective, k=k, lr=1e-3, adam_eps=1e-8, grad_clip=100.0,
                          schedule="cosine", dynamic_binarize=False, loss=plain_topdown_loss),
            "net": dict(kind="topdown", input_shape=[1, 8, 8], latent_dims=[32, 16, 8], hidden=200, activation="silu"),
            "expect": dict(data="digits", model="topdown", latent_dims=[32, 16, 8], hidden=[200], activation="silu",
                           likelihood="bernoulli", batch_size=100, objective=objective, train_samples=k, lr=1e-3,
                           adam_eps=1e-8, grad_clip=100.0, lr_schedule="cosine", binarize="none", grad_accum=1),
        }
    return configs


def plain_model(config: dict, input_dim: int) -> torch.nn.Module:
    """The network a configuration's plain loop trains: :class:`PlainMLPVAE`, or a fresh instance of the
    hierarchical model class (its layers only; the loss is plain.py's)."""
    if "net" not in config:
        return PlainMLPVAE(input_dim, 50, (200, 200))
    from fused_vae.models import build_model

    return build_model(config["net"])


def _env() -> dict:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def steady_ms(marks: list[tuple[int, float]]) -> float | None:
    """ms per step between the first and the last ``(step, seconds)`` mark (None with fewer than two)."""
    if len(marks) < 2 or marks[-1][0] == marks[0][0]:
        return None
    return (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0]) * 1e3


def interval_median_ms(marks: list[tuple[int, float]]) -> float | None:
    """Median over the intervals between consecutive marks of their ms per step: robust to bursts
    of load, and it also leaves out the rare intervals that hold a checkpoint."""
    per = [(t1 - t0) / (s1 - s0) * 1e3 for (s0, t0), (s1, t1) in zip(marks, marks[1:]) if s1 > s0]
    return statistics.median(per) if per else None


def run_trainer(config: dict, *, steps: int, variant: str, device: str, out_dir: Path, name: str,
                num_train: int) -> dict:
    """One ``python -m fused_vae train`` process; its summary's time per step and the steady time
    per step from metrics.jsonl.

    Raises:
        RuntimeError: the command failed, or its config.json differs from ``config["expect"]``.
    """
    cmd = [sys.executable, "-m", "fused_vae", "train", *config["args"], *COMMON_ARGS, "--out-dir", str(out_dir),
           "--name", name, "--max-steps", str(steps), "--log-every", str(LOG_EVERY), "--device", device,
           *VARIANT_FLAGS[variant]]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    run_dir = out_dir / name
    summary = json.loads((run_dir / "summary.json").read_text())
    used = json.loads((run_dir / "config.json").read_text())
    wrong = {k: (used.get(k), v) for k, v in config["expect"].items() if used.get(k) != v}
    if wrong:
        raise RuntimeError(f"the trainer ran another configuration than the plain loop (trainer vs plain): {wrong}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    marks = [(r["step"], r["time_s"]) for r in records if r.get("kind") == "train"]
    spe = num_train // config["plain"]["batch_size"]
    # (a trainer whose checkpoint_every defaults to None picks whole epochs of about CHECKPOINT_STEPS steps)
    ckpt_steps = spe * (used["checkpoint_every"] or -(-config_module.CHECKPOINT_STEPS // spe))
    return {"train_time_s": summary["train_time_s"], "steps": summary["steps"],
            "end_to_end_ms_per_step": summary["train_time_s"] / summary["steps"] * 1e3,
            "steady_ms_per_step": steady_ms(marks), "interval_median_ms_per_step": interval_median_ms(marks),
            "marks": marks,
            "checkpoints_in_steady_window": sum(1 for s in range(marks[0][0] + 1, marks[-1][0] + 1)
                                                if s % ckpt_steps == 0) if marks else 0,
            "optimizer": summary.get("optimizer"), "fused_backend": summary.get("fused_backend")}


def run_plain(model: torch.nn.Module, init: dict, train_x: torch.Tensor, config: dict, *, steps: int,
              compiled: bool) -> dict:
    """One :func:`train_plain` run from the weights ``init`` (on ``train_x``'s device); the same
    numbers as :func:`run_trainer`."""
    model.to(train_x.device).load_state_dict(init)
    t0 = time.perf_counter()
    marks = train_plain(model, train_x, steps=steps, log_every=LOG_EVERY, compile_loss=compiled, **config["plain"])
    total = time.perf_counter() - t0
    return {"train_time_s": total, "steps": steps, "end_to_end_ms_per_step": total / steps * 1e3,
            "steady_ms_per_step": steady_ms(marks), "interval_median_ms_per_step": interval_median_ms(marks),
            "marks": marks}


def checkpoint_ms(repeats: int = 5) -> float:
    """Median ms of one trainer checkpoint of the default model (state dicts of model, optimizer and
    schedule, written with fsync by ``atomic_save``) in a temporary directory."""
    from fused_vae.models import MLPVAE
    from fused_vae.training.checkpoint import atomic_save, make_checkpoint
    from fused_vae.training.optim import make_optimizer, make_scheduler

    model = MLPVAE((1, 8, 8), latent_dim=50, hidden=(200, 200), activation="tanh")
    opt, _ = make_optimizer(model.parameters(), lr=1e-3, weight_decay=0.0)
    model(torch.rand(4, 1, 8, 8), seed=0)["loss"].backward()
    opt.step()  # the optimizer state exists, as in a real checkpoint
    sched = make_scheduler(opt, total_steps=10, warmup_steps=0, schedule="cosine", min_ratio=0.1)
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            t0 = time.perf_counter()
            atomic_save(make_checkpoint(model=model, optimizer=opt, scheduler=sched, epoch=0, step=0, config={},
                                        model_spec={}), Path(tmp) / "last.pt")
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def spread(values: list[float]) -> dict:
    """Median, min, max and the relative spread (max - min) / median of ``values``."""
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values), "rel_spread": (max(values) - min(values)) / med,
            "values": values}


def summarize_case(rounds: list[dict]) -> dict:
    """Median and spread over rounds of each side's ms/step (steady, typical interval, end to end) and
    of the trainer / plain ratio."""
    out = {}
    for key in ("steady_ms_per_step", "interval_median_ms_per_step", "end_to_end_ms_per_step"):
        sides = {side: spread([r[side][key] for r in rounds]) for side in ("trainer", "plain")}
        tr, pl = sides["trainer"]["values"], sides["plain"]["values"]
        sides["ratio_of_medians"] = statistics.median(tr) / statistics.median(pl)
        sides["ratio_per_round"] = spread([t / p for t, p in zip(tr, pl)])
        out[key] = sides
    return out


def _round_line(sides: dict) -> str:
    pl, tr = sides["plain"], sides["trainer"]
    return (f"steady ms/step: trainer {tr['steady_ms_per_step']:.3f} plain {pl['steady_ms_per_step']:.3f} ratio "
            f"{tr['steady_ms_per_step'] / pl['steady_ms_per_step']:.3f} | end to end: trainer "
            f"{tr['end_to_end_ms_per_step']:.3f} plain {pl['end_to_end_ms_per_step']:.3f}")


def _case_line(stats: dict) -> str:
    s = stats["steady_ms_per_step"]
    cells = " ".join(f"{side} {s[side]['median']:.3f} [{s[side]['min']:.3f}-{s[side]['max']:.3f}]"
                     for side in ("trainer", "plain") if side in s)
    return (f"steady ms/step median [min-max]: {cells} ratio {s['ratio_of_medians']:.3f} (per round "
            f"{s['ratio_per_round']['min']:.3f}-{s['ratio_per_round']['max']:.3f}; typical interval ratio "
            f"{stats['interval_median_ms_per_step']['ratio_of_medians']:.3f})")


def run_rounds(cases: list[tuple[str, str]], all_configs: dict, *, rounds: int, steps: int,
               device: str) -> dict[tuple[str, str], list[dict]]:
    """``rounds`` interleaved rounds over ``cases`` (``(configuration, variant)``) on ``device``: in
    each, the trainer and the plain loop (alternating which goes first);
    ``{case: [{"round", "order", "trainer", "plain"}]}``."""
    train_x = load_data(TrainConfig(data="digits")).train.to(device)
    torch.manual_seed(0)
    models = {case: plain_model(all_configs[case[0]], train_x[0].numel()) for case in cases}
    inits = {case: {k: v.clone() for k, v in m.state_dict().items()} for case, m in models.items()}
    raw: dict[tuple[str, str], list[dict]] = {case: [] for case in cases}
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        for r in range(rounds):
            for name, variant in cases:
                config, sides = all_configs[name], {}
                order = ("trainer", "plain") if r % 2 == 0 else ("plain", "trainer")
                for side in order:
                    if side == "trainer":
                        sides[side] = run_trainer(config, steps=steps, variant=variant, device=device,
                                                  out_dir=Path(tmp), name=f"{name}-{variant}",
                                                  num_train=train_x.shape[0])
                    else:
                        sides[side] = run_plain(models[(name, variant)], inits[(name, variant)], train_x, config,
                                                steps=steps, compiled=variant == "compiled")
                raw[(name, variant)].append({"round": r, "order": list(order), **sides})
                print(f"round {r + 1}/{rounds} {name:14s} {variant:11s} {_round_line(sides)}", flush=True)
    return raw


def gains_over_eager(results: list[dict]) -> dict[str, dict]:
    """``{variant: {configuration: {side: variant's median steady ms/step / eager's}}}`` for the
    variants other than eager, where the eager variant ran too."""
    by = {(r["config"], r["variant"]): r["steady_ms_per_step"] for r in results}
    gains: dict[str, dict] = {}
    for (name, variant), other in by.items():
        eager = by.get((name, "eager"))
        if variant != "eager" and eager:
            gains.setdefault(variant, {})[name] = {side: other[side]["median"] / eager[side]["median"]
                                                   for side in ("trainer", "plain")}
    return gains


# Issue 15's and issue 22's targets on a CPU: the trainer's steady step / the plain loop's, at most.
TARGETS = {
    "default": ("default run", 0.9),
    "iwae-iwae-K5": ("IWAE preset net, batch 20, K = 5, iwae", 0.9),
    "iwae-iwae-K50": ("IWAE preset net, batch 20, K = 50, iwae", 0.9),
    "iwae2-iwae-K5": ("IWAE two-layer net, batch 20, K = 5, iwae", 0.85),
    "topdown-elbo-K1": ("top-down VAE, 3 stochastic layers, elbo", 0.85),
}


def target_lines(results: list[dict], gains: dict[str, dict]) -> list[str]:
    """The targets of :data:`TARGETS`, PASS or MISS, by the steady step and by the time a user sees
    (summary.json's train_time_s / steps); with CUDA graphs the default run's step >= 3x faster
    than the eager trainer step."""
    lines = []
    for name, (label, target) in TARGETS.items():
        row = next((x for x in results if x["config"] == name and x["variant"] == "eager"), None)
        if row:
            ratio = row["steady_ms_per_step"]["ratio_of_medians"]
            whole = row["end_to_end_ms_per_step"]["ratio_of_medians"]
            lines.append(f"[{'PASS' if ratio <= target else 'MISS'}] {label}: trainer step {ratio:.3f}x the plain "
                         f"loop's (steady, median of rounds; target <= {target}x); end to end {whole:.3f}x")
    graphs = gains.get("cuda-graphs", {}).get("default")
    if graphs:
        speedup = 1 / graphs["trainer"]
        lines.append(f"[{'PASS' if speedup >= 3 else 'MISS'}] default run, --cuda-graphs: trainer step {speedup:.2f}x "
                     "faster than the eager trainer step (steady, medians; target >= 3x)")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="2 rounds of default and iwae-iwae-K5, the other variants for default only, 200 steps")
    parser.add_argument("--configs", default=None,
                        help=f"comma-separated configurations (default: all; {', '.join(configurations())})")
    parser.add_argument("--variants", default="eager,compiled",
                        help=f"comma-separated variants ({', '.join(VARIANT_FLAGS)}; default: eager,compiled)")
    parser.add_argument("--compiled-configs", default=None,
                        help="configurations that also run the variants other than eager (default: default,"
                             "iwae-elbo-K5,iwae-iwae-K5; --quick: default)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: where both sides train")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; --quick 2)")
    parser.add_argument("--steps", type=int, default=None,
                        help="--max-steps of every run (default 600; --quick 200); at least 2 x 50")
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON path (default: results/<device>-trainer-<time>.json)")
    args = parser.parse_args(argv)

    all_configs = configurations()
    names = args.configs.split(",") if args.configs else (["default", "iwae-iwae-K5"] if args.quick else
                                                           list(all_configs))
    compiled_names = (args.compiled_configs.split(",") if args.compiled_configs else
                      ["default"] if args.quick else ["default", "iwae-elbo-K5", "iwae-iwae-K5"])
    variants = args.variants.split(",")
    unknown = [n for n in names + compiled_names if n not in all_configs] + \
              [v for v in variants if v not in VARIANT_FLAGS]
    if unknown:
        parser.error(f"unknown configuration or variant: {', '.join(unknown)}")
    device = torch.device(args.device).type
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        parser.error(f"--device must be cpu or cuda (with a CUDA device), got {args.device!r}")
    if "cuda-graphs" in variants and device != "cuda":
        parser.error("the cuda-graphs variant needs --device cuda")
    rounds = args.rounds or (2 if args.quick else 5)
    steps = args.steps or (200 if args.quick else 600)
    if steps < 2 * LOG_EVERY:
        parser.error(f"--steps must be at least {2 * LOG_EVERY}")

    torch.set_num_threads(1)
    torch._dynamo.config.recompile_limit = 64  # one compiled loss per (configuration, K, objective)
    env = environment()
    cases = [(n, v) for v in VARIANT_FLAGS if v in variants for n in names if v == "eager" or n in compiled_names]
    t_start = time.perf_counter()
    raw = run_rounds(cases, all_configs, rounds=rounds, steps=steps, device=device)
    wall = time.perf_counter() - t_start
    results = []
    for (name, variant), rows in raw.items():
        stats = summarize_case(rows)
        config = all_configs[name]
        results.append({"config": name, "variant": variant, "trainer_args": [*config["args"], *VARIANT_FLAGS[variant]],
                        "plain": {k: getattr(v, "__name__", v) for k, v in config["plain"].items()}, **stats,
                        "rounds": rows})
        print(f"{name:14s} {variant:11s} {_case_line(stats)}")
    gains = gains_over_eager(results)
    for variant, by_config in gains.items():
        for name, gain in by_config.items():
            print(f"{name:14s} {variant} / eager steady ms/step: " + ", ".join(f"{k} {v:.3f}" for k, v in gain.items()))
    targets = target_lines(results, gains)
    for line in targets:
        print(line)
    payload = {
        "benchmark": "bench_trainer",
        "environment": {**env, "load_average_at_end": load_average()},
        "note": NOISE_NOTE,
        "quick": args.quick,
        "device": device,
        "rounds": rounds,
        "max_steps": steps,
        "log_every": LOG_EVERY,
        "trainer_common_args": COMMON_ARGS,
        "checkpoint_ms_default_model": checkpoint_ms(),
        "wall_s": wall,
        "method": METHOD,
        "targets": targets,
        "over_eager_steady": gains,
        "results": results,
    }
    return save_result(args, f"{device}-trainer", payload)


if __name__ == "__main__":
    raise SystemExit(main())

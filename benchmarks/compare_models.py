"""Held-out comparison of the model zoo on the bundled digits: the test NLL each model reaches.

Trains, with the same data, binarization, optimiser, schedule, steps and seed, the one-layer
IWAE net (``--preset iwae-mnist``), the IWAE paper's two-stochastic-layer net
(``--preset iwae-mnist-2layer``) and a top-down VAE with 3 stochastic layers (``--model
topdown``) on scikit-learn's digits with dynamic binarization, each with ``--objective
iwae --train-samples 5`` and with ``--objective elbo``, through the ``fused-vae train``
command (one process per run, one thread). Each run's summary gives the test ELBO and the
test NLL by the IWAE bound with k = ``--iwae-samples``; the result file holds them, the
per-layer KL of the hierarchical models at the end of training, and two checks: every
new model's NLL against the one-layer net's at the same steps, and IWAE NLL <= -ELBO. With the
ELBO objective the hierarchical models also run with free bits (``--free-bits 1``: a floor of
1 nat on each stochastic layer's KL in the loss), which keeps their upper layers from
collapsing onto the prior.

    python benchmarks/compare_models.py             # about 10 minutes on 2 cores
    python benchmarks/compare_models.py --quick     # 5 epochs, k = 100, no result file
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODELS = {
    "mlp (one layer)": ["--preset", "iwae-mnist"],
    "mlp2 (two layers)": ["--preset", "iwae-mnist-2layer"],
    "topdown (three layers)": ["--preset", "iwae-mnist", "--model", "topdown", "--latent-dims", "32", "16", "8",
                               "--hidden", "200", "--activation", "silu"],
}
# Free bits is an ELBO option (the IWAE bound has no separate KL term to floor).
ELBO_ONLY = {f"{label[:-1]}, free bits 1 nat per layer)": [*args, "--free-bits", "1.0"]
             for label, args in list(MODELS.items())[1:]}


def models_for(objective: str) -> dict:
    """``{label: trainer arguments}`` of the models compared under ``objective``."""
    return {**MODELS, **(ELBO_ONLY if objective == "elbo" else {})}


def run(args: list[str], out: Path, name: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "fused_vae", "train", *args, "--out-dir", str(out), "--name", name, "--overwrite",
           "--no-progress", "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((out / name / "summary.json").read_text())
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    last_train = [r for r in records if r["kind"] == "train"][-1]
    summary["final_layer_kl"] = {k: v for k, v in last_train.items() if k.startswith("kl_") and k != "kl_penalty"}
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--iwae-samples", type=int, default=1000)
    p.add_argument("--objectives", default="iwae,elbo")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from common import environment, load_average, save_result

    if args.quick:
        args.epochs, args.iwae_samples = 5, 100
    env = environment()
    results = {}
    with tempfile.TemporaryDirectory(prefix="compare-models-") as tmp:
        for objective in args.objectives.split(","):
            k = ["--train-samples", "5"] if objective == "iwae" else ["--train-samples", "1"]
            for i, (label, model_args) in enumerate(models_for(objective).items()):
                common = ["--data", "digits", "--objective", objective, *k, "--epochs", str(args.epochs),
                          "--eval-every", "0", "--iwae-samples", str(args.iwae_samples), "--seed", "0"]
                s = run([*model_args, *common], Path(tmp), f"{objective}-{i}")
                results[f"{objective} {label}"] = {key: s.get(key) for key in (
                    "steps", "train_time_s", "test_elbo", "test_recon", "test_kl", "test_iwae_nll", "iwae_samples",
                    "final_layer_kl", "model")}  # fmt: skip
                r = results[f"{objective} {label}"]
                print(f"{objective:5s} {label:50s} steps {r['steps']}: test ELBO {r['test_elbo']:.3f}, "
                      f"NLL (k={r['iwae_samples']}) {r['test_iwae_nll']:.3f}, {r['train_time_s']:.0f} s, "
                      f"layer KL {r['final_layer_kl']}", flush=True)
    checks = {}
    for objective in args.objectives.split(","):
        base = results[f"{objective} mlp (one layer)"]["test_iwae_nll"]
        for label in list(models_for(objective))[1:]:
            r = results[f"{objective} {label}"]
            checks[f"{objective} {label}: NLL - one-layer NLL"] = r["test_iwae_nll"] - base
        for label in models_for(objective):
            r = results[f"{objective} {label}"]
            checks[f"{objective} {label}: IWAE NLL <= -ELBO"] = r["test_iwae_nll"] <= -r["test_elbo"]
    for key, value in checks.items():
        print(f"{key}: {value}")
    if args.quick:
        return 0
    payload = {"benchmark": "benchmarks/compare_models.py", "what": __doc__.split("\n\n")[1].strip(),
               "epochs": args.epochs, "environment": env | {"load_average_at_end": load_average()},
               "results": results, "checks": checks}
    return save_result(args, "cpu-compare-models", payload)


if __name__ == "__main__":
    sys.exit(main())

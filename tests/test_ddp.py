"""torchrun with 2 CPU processes (gloo) gives the single-process result on the same global batches.

Every random number of a micro-batch is derived from (seed, step, micro-batch id), and a
global batch is cut into world_size x grad_accum micro-batches (fused_vae/training/batches.py).
So 2 processes x 1 micro-batch must equal 1 process x 2 micro-batches (--grad-accum 2):
same batches, same noise, gradients averaged the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fused_vae.training import TrainConfig, load_checkpoint, train

REPO = Path(__file__).resolve().parents[1]
OPTS = dict(max_train_examples=400, max_test_examples=100, batch_size=40, hidden=[32], latent_dim=6, epochs=2,
            eval_every=1, checkpoint_every=1, iwae_samples=10, log_every=1, binarize="dynamic", free_bits=0.05,
            kl_warmup_steps=5, backend="cpu", progress=False)


def _flags(opts: dict) -> list[str]:
    out = []
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + k.replace("_", "-"))
        elif isinstance(v, list):
            out += [flag, *map(str, v)]
        else:
            out += [flag, str(v)]
    return out


def _records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_on_the_same_global_batches(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fused_vae", "train", *_flags(OPTS), "--out-dir", str(tmp_path), "--name", "ddp"]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    single = train(TrainConfig(**OPTS, grad_accum=2, out_dir=str(tmp_path), name="single"))

    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    a = load_checkpoint(ddp_dir / "checkpoints" / "last.pt")
    b = load_checkpoint(single_dir / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 2 * (400 // 40)
    for k in b["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-5)
    ra, rb = _records(ddp_dir, "train"), _records(single_dir, "train")
    assert len(ra) == len(rb) == 20  # rank 0 alone writes the metrics
    for x, y in zip(ra, rb):
        for key in ("loss", "recon", "kl", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-5)
    summary = json.loads((ddp_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and single["world_size"] == 1
    assert summary["test_iwae_nll"] == pytest.approx(single["test_iwae_nll"], abs=1.0)  # sharded noise differs
    assert (ddp_dir / "samples.png").is_file()

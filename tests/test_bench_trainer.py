"""benchmarks/bench_trainer.py cannot break unseen: its plain baseline computes the library's
losses and schedules, and its smallest configuration runs end to end."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import fused_vae as fv
from fused_vae.models import MLPVAE
from fused_vae.training.optim import make_scheduler

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_trainer  # noqa: E402
from plain import PlainMLPVAE, plain_loss, plain_scheduler  # noqa: E402


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
@pytest.mark.parametrize("k", [2, 5])
def test_plain_loss_is_the_library_loss(objective, k):
    """The plain loop's K-sample loss (its own logsumexp) equals MLPVAE's for the same noise."""
    torch.manual_seed(k)
    model = MLPVAE((1, 8, 8), latent_dim=50, hidden=(200, 200), activation="tanh")
    plain = PlainMLPVAE(64, 50, (200, 200)).copy_from(model)
    x = torch.rand(7, 1, 8, 8)
    seed = int(torch.randint(0, 2**31, ()))
    eps = fv.standard_normal((k, 7, 50), seed)
    with torch.no_grad():
        ours = model(x, seed=seed, objective=objective, num_samples=k)["loss"]
        theirs = plain_loss(plain, x, k, objective, eps=eps)
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=1e-4)


@pytest.mark.parametrize("schedule", ["cosine", "iwae"])
def test_plain_scheduler_is_the_trainer_schedule(schedule):
    spe, total = 5, 200  # 40 epochs: the iwae schedule's stages 0..3
    lrs = {}
    for name in ("trainer", "plain"):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        sched = (make_scheduler(opt, total_steps=total, warmup_steps=0, schedule=schedule, min_ratio=0.1,
                                steps_per_epoch=spe) if name == "trainer"
                 else plain_scheduler(opt, schedule, total_steps=total, steps_per_epoch=spe))
        lrs[name] = []
        for _ in range(total):
            lrs[name].append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    assert len(set(lrs["plain"])) > 3
    torch.testing.assert_close(torch.tensor(lrs["plain"], dtype=torch.float64),
                               torch.tensor(lrs["trainer"], dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.slow
def test_smallest_configuration_runs(tmp_path):
    out = tmp_path / "result.json"
    threads = torch.get_num_threads()
    try:
        assert bench_trainer.main(["--configs", "default", "--variants", "eager", "--rounds", "1", "--steps", "100",
                                   "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    (row,) = result["results"]
    assert (row["config"], row["variant"], result["device"]) == ("default", "eager", "cpu")
    (rnd,) = row["rounds"]
    assert rnd["trainer"]["steps"] == rnd["plain"]["steps"] == 100
    assert [s for s, _ in rnd["trainer"]["marks"]] == [s for s, _ in rnd["plain"]["marks"]] == [50, 100]
    assert row["steady_ms_per_step"]["ratio_of_medians"] > 0
    assert result["environment"]["git"]["commit"]
    with pytest.raises(SystemExit):  # CUDA graphs need a GPU: refused before anything runs
        bench_trainer.main(["--variants", "cuda-graphs", "--out", str(tmp_path / "no.json")])
    assert not (tmp_path / "no.json").exists()


@pytest.mark.slow
def test_trainer_breakdown_runs_and_switches_parts_off_and_on(tmp_path):
    """The breakdown's smoke run (a one-layer and a hierarchical net, split by operator);
    switching a part off and back on leaves the trainer as it was."""
    import trainer_breakdown
    from fused_vae.training import trainer as trainer_module

    real = (trainer_module.grad_norm, trainer_module.binarize_with_seed, trainer_module.Trainer._check_due)
    out = tmp_path / "breakdown.json"
    threads = torch.get_num_threads()
    try:
        assert trainer_breakdown.main(["--quick", "--profile", "--configs", "iwae-iwae-K5,topdown-elbo-K1",
                                       "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert (trainer_module.grad_norm, trainer_module.binarize_with_seed, trainer_module.Trainer._check_due) == real
    rows = json.loads(out.read_text())["results"]
    assert [row["config"] for row in rows] == ["iwae-iwae-K5", "topdown-elbo-K1"]
    for row in rows:
        assert set(row["sides"]["trainer"]["part_ms"]) == set(trainer_breakdown.PARTS)
        assert set(row["sides"]["plain loop"]["part_ms"]) == set(trainer_breakdown.PLAIN_PARTS)
        assert all(len(v) == 4 for v in row["values_ms_per_step"].values())
        assert row["trainer_over_plain_per_round_median"] > 0
        profiles = row["op_self_cpu_us_per_step"]
        assert any(op.startswith("fused_vae::") for op in profiles["trainer"])  # the fused ops run
        assert not any(op.startswith("fused_vae::") for op in profiles["plain loop"])
        assert all(p["total"] > 0 for p in profiles.values())

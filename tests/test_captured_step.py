"""The captured training step (--compile / --cuda-graphs) against the eager step."""

from __future__ import annotations

import json

import pytest
import torch

import test_training
from helpers import poison_forward

from fused_vae.training import NonFiniteLossError, TrainConfig, load_checkpoint, train
from fused_vae.training import step as step_mod
from fused_vae.training.config import ConfigError
from fused_vae.training.trainer import Trainer

def needs_cuda(fn):
    """A test of the real GPU (selected by ``-m gpu``, as benchmarks/gpu_checks.sh does)."""
    reason = "needs a CUDA device: CUDA graph capture cannot be emulated"
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason=reason)(fn))


def tiny(tmp_path, **kw) -> TrainConfig:
    """A seconds-long run: 200 digits, 4 steps per epoch, a 64-16-4 MLP."""
    base = dict(max_train_examples=200, max_test_examples=60, hidden=[16], latent_dim=4, device="cpu")
    return test_training.tiny(tmp_path, **{**base, **kw})


def _params(run_dir):
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def _losses(run_dir):
    recs = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in recs if r["kind"] == "train"]


@pytest.fixture
def uncompiled(monkeypatch):
    """--compile without the compiler: the captured step's own function, run eagerly."""
    monkeypatch.setattr(step_mod.torch, "compile", lambda fn: fn)


# A warm-up (a tensor beta), clipping that bites, 2 micro-batches, a decaying LR, free bits.
HARD = dict(kl_warmup_steps=5, grad_clip=5.0, grad_accum=2, lr_warmup_steps=2, free_bits=0.05)


@pytest.mark.parametrize("kw", [{}, HARD, dict(objective="iwae", train_samples=3, binarize="dynamic")],
                         ids=["default", "warmup-clip-accum", "iwae"])
def test_the_captured_step_is_the_eager_step_bit_for_bit(tmp_path, uncompiled, kw):
    """Same ops in the same order (seeds derived on the device from the step counter, a tensor
    LR and KL weight, statistics by index): the same bits as the eager step."""
    eager = train(tiny(tmp_path / "e", **kw))
    captured = train(tiny(tmp_path / "c", compile=True, **kw))
    pe, pc = _params(tmp_path / "e" / "run"), _params(tmp_path / "c" / "run")
    assert all(torch.equal(pe[k], pc[k]) for k in pe)
    assert _losses(tmp_path / "e" / "run") == _losses(tmp_path / "c" / "run")
    assert captured["test_elbo"] == eager["test_elbo"] and captured["steps"] == 12


class _Crash(Exception):
    pass


def test_resume_with_the_captured_step_is_exact(tmp_path, uncompiled, monkeypatch):
    kw = dict(compile=True, **HARD)
    train(tiny(tmp_path / "a", **kw))
    real, calls = Trainer._train_step, {"n": 0}

    def step(self, *a, **k):
        if calls["n"] == 6:  # mid-epoch 2, after the epoch-1 checkpoint
            raise _Crash
        calls["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(Trainer, "_train_step", step)
    cfg = tiny(tmp_path / "b", **kw)
    with pytest.raises(_Crash):
        train(cfg)
    monkeypatch.setattr(Trainer, "_train_step", real)
    train(cfg, resume=True)
    pa, pb = _params(tmp_path / "a" / "run"), _params(tmp_path / "b" / "run")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    la, lb = _losses(tmp_path / "a" / "run"), _losses(tmp_path / "b" / "run")
    assert [r for r in lb if r[0] > 4] == [r for r in la if r[0] > 4]


def test_a_bad_step_applies_no_update_and_stops_the_captured_run(tmp_path, uncompiled, monkeypatch):
    """The captured step has no host check before its update: fused AdamW's found_inf skips
    it, and every later one, until the host reads the window."""
    seen, holder = [], {}
    real_step = step_mod.CapturedStep.__call__

    def call(self, *a, **k):
        seen.append({k: v.clone() for k, v in self.model.state_dict().items()})
        holder["step"] = self
        return real_step(self, *a, **k)

    monkeypatch.setattr(step_mod.CapturedStep, "__call__", call)
    monkeypatch.setattr(Trainer, "_check_due", lambda self, run: (run.step + 1) % 6 == 0)
    poison_forward(monkeypatch, 11, float("inf"))
    cfg = tiny(tmp_path, compile=True, log_every=6, eval_every=0)
    with pytest.raises(NonFiniteLossError, match=r"step 11 \(epoch 3, batch 3\).*Found at step 12.*no update "
                                                 r"from step 11 on"):
        train(cfg)
    assert len(seen) == 12 and not torch.equal(seen[10]["decoder.0.weight"], seen[9]["decoder.0.weight"])
    assert load_checkpoint(cfg.run_dir / "checkpoints" / "last.pt")["step"] == 8
    final = holder["step"].model.state_dict()  # after step 12, whose update was skipped too
    assert all(torch.equal(seen[11][k], seen[10][k]) and torch.equal(final[k], seen[10][k]) for k in final)


def test_a_bad_step_on_a_cpu_stops_before_its_update(tmp_path, uncompiled, monkeypatch):
    poison_forward(monkeypatch, 3, float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"step 3 .*Training stopped before applying this step"):
        train(tiny(tmp_path, compile=True))


def test_compiled_step_matches_eager_and_resumes_exactly(tmp_path, monkeypatch):
    """torch.compile fuses the step's elementwise ops and reductions into its own kernels, which
    round differently from the eager ops: equal up to float32 rounding, not bit for bit."""
    kw = dict(epochs=2, eval_every=0, lr_schedule="constant")
    eager = train(tiny(tmp_path / "e", **kw))
    compiled = train(tiny(tmp_path / "c", compile=True, **kw))
    pe, pc = _params(tmp_path / "e" / "run"), _params(tmp_path / "c" / "run")
    for k in pe:
        torch.testing.assert_close(pc[k], pe[k], rtol=1e-4, atol=1e-5)
    le, lc = _losses(tmp_path / "e" / "run"), _losses(tmp_path / "c" / "run")
    assert [r[0] for r in le] == [r[0] for r in lc]
    torch.testing.assert_close(torch.tensor([r[1:] for r in lc]), torch.tensor([r[1:] for r in le]), rtol=1e-5, atol=1e-5)
    assert abs(compiled["test_elbo"] - eager["test_elbo"]) < 1e-3
    # Resume: the first epoch's checkpoint, continued, gives the uninterrupted compiled run's bits.
    cfg = tiny(tmp_path / "r", compile=True, max_steps=4, **kw)
    train(cfg)
    train(cfg.updated({"max_steps": None}), resume=True)
    pr = _params(tmp_path / "r" / "run")
    assert all(torch.equal(pr[k], pc[k]) for k in pc)


def test_cuda_graphs_off_cuda_and_unsupported_setups_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="--cuda-graphs needs a CUDA device"):
        train(tiny(tmp_path, cuda_graphs=True))


@needs_cuda
def test_cuda_graph_replay_matches_the_eager_step(tmp_path):
    """Replays of one captured step draw fresh noise each step (seeds from the device step
    counter): the same run as the eager step on the same GPU, up to the fused kernels' rounding."""
    kw = dict(device="cuda", backend=None, amp="off", epochs=2, eval_every=0)
    eager = train(tiny(tmp_path / "e", **kw))
    graphs = train(tiny(tmp_path / "g", cuda_graphs=True, **kw))
    pe, pg = _params(tmp_path / "e" / "run"), _params(tmp_path / "g" / "run")
    for k in pe:
        torch.testing.assert_close(pg[k], pe[k], rtol=1e-4, atol=1e-5)
    assert abs(graphs["test_elbo"] - eager["test_elbo"]) < 1e-3

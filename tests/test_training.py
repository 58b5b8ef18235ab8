"""The trainer: the loss goes down, outputs are written, IWAE vs ELBO, NaN detection, options."""

from __future__ import annotations

import copy
import json
import math
import sys

import pytest
import torch
from helpers import poison_forward

from fused_vae.training import DataBundle, NonFiniteLossError, TrainConfig, evaluate, load_checkpoint, train
from fused_vae.training.config import ConfigError, load_config_file


def tiny(tmp_path, **kw) -> TrainConfig:
    """A seconds-long run on digits with a small MLP."""
    base = dict(max_train_examples=400, max_test_examples=100, batch_size=50, hidden=[64], latent_dim=8, epochs=3,
                eval_every=1, checkpoint_every=1, iwae_samples=0, log_every=1, progress=False,
                out_dir=str(tmp_path), name="run", backend="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _records(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short default-architecture run shared by several tests."""
    out = tmp_path_factory.mktemp("trained")
    cfg = tiny(out, hidden=[200, 200], latent_dim=50, epochs=15, max_train_examples=None, max_test_examples=None,
               batch_size=100, lr=2e-3, eval_every=5, checkpoint_every=5, log_every=10, iwae_samples=200)
    return cfg, train(cfg)


def test_short_run_lowers_the_loss_and_writes_every_output(trained):
    cfg, summary = trained
    run = cfg.run_dir
    tr = _records(run, "train")
    assert tr[-1]["loss"] < 0.8 * tr[0]["loss"]
    ev = _records(run, "eval")
    assert [e["step"] for e in ev] == [70, 140, 210]
    assert ev[-1]["test_elbo"] > ev[0]["test_elbo"]
    assert summary["test_elbo"] == ev[-1]["test_elbo"] and summary["steps"] == 210
    for name in ("config.json", "summary.json", "metrics.jsonl", "metrics.csv", "reconstructions.png", "samples.png",
                 "interpolation.png", "loss_curves.png", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    from PIL import Image

    for name in ("reconstructions.png", "samples.png", "interpolation.png", "loss_curves.png"):
        with Image.open(run / name) as im:
            im.verify()
    # config.json records what the run settled on, not "auto"/None.
    stored = json.loads((run / "config.json").read_text())
    assert stored == {**cfg.to_dict(), "activation": "tanh", "amp": "off", "threads": 1, "name": "run"}
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"kind", "step", "loss", "test_elbo", "test_iwae_nll"} <= set(header)


def test_iwae_nll_is_below_minus_elbo_on_a_trained_model(trained):
    cfg, summary = trained
    # The IWAE bound L_k (k=200) is tighter than the ELBO: NLL estimate <= -ELBO.
    assert summary["test_iwae_nll"] <= -summary["test_elbo"]
    assert -summary["test_elbo"] - summary["test_iwae_nll"] < 5.0  # and not absurdly far from it
    from fused_vae.models import build_model
    from fused_vae.training import load_data

    ck = load_checkpoint(cfg.run_dir / "checkpoints" / "last.pt")
    model = build_model(ck["model_spec"])
    model.load_state_dict(ck["model"])
    test = load_data(cfg).test[:100]
    res = {k: evaluate(model, test, iwae_samples=k, seed=1)["test_iwae_nll"] for k in (1, 10, 100)}
    elbo = evaluate(model, test, seed=1)["test_elbo"]
    assert res[100] <= res[10] <= res[1] + 0.05 and res[100] <= -elbo


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    poison_forward(monkeypatch, 11, float("nan"))  # step 11: the 3rd step of epoch 3 (4 steps per epoch)
    cfg = tiny(tmp_path, max_train_examples=200)
    with pytest.raises(NonFiniteLossError, match=r"step 11 \(epoch 3, batch 3\).*checkpoints/last\.pt \(step 8\)"):
        train(cfg)
    ck = load_checkpoint(cfg.run_dir / "checkpoints" / "last.pt")
    assert ck["step"] == 8 and all(torch.isfinite(v).all() for v in ck["model"].values())
    errors = _records(cfg.run_dir, "error")
    assert errors and errors[0]["step"] == 11


def test_a_coarse_finiteness_check_still_names_the_step_that_went_bad(tmp_path, monkeypatch):
    """On GPUs the NaN/Inf check runs at the logging interval (no host sync per step); the
    statistics stay on the device, so the error still names the first bad step."""
    from fused_vae.training.trainer import Trainer

    poison_forward(monkeypatch, 11, float("inf"))
    monkeypatch.setattr(Trainer, "_check_due", lambda self, run: (run.step + 1) % 6 == 0)
    cfg = tiny(tmp_path, max_train_examples=200, log_every=6, eval_every=0)  # 4 steps per epoch
    with pytest.raises(NonFiniteLossError, match=r"step 11 \(epoch 3, batch 3\).*Found at step 12"):
        train(cfg)
    assert load_checkpoint(cfg.run_dir / "checkpoints" / "last.pt")["step"] == 8
    assert _records(cfg.run_dir, "error")[0]["step"] == 11


def test_the_step_statistics_window():
    from fused_vae.training.stats import STAT_NAMES, StatsWindow

    w = StatsWindow(torch.device("cpu"), size=4, divisor=2, step=4)
    rows = torch.rand(4, len(STAT_NAMES), dtype=torch.float64)

    def put(step, row):
        w.batch_row(step).copy_(row[:5] * 2)  # sums over the 2 micro-batches
        w.norm_row(step).copy_(row[5])
        w.advance(step)

    for i, row in enumerate(rows[:3]):
        put(5 + i, row)
    assert w.first_non_finite() is None and w.count == 3
    means = w.means()
    assert list(means) == list(STAT_NAMES) == ["loss", "recon", "kl", "elbo", "bound", "grad_norm"]
    assert means["kl"] == pytest.approx(rows[:3, 2].mean().item()) and w.count == 0
    assert means["grad_norm"] == pytest.approx(rows[:3, 5].mean().item())
    with pytest.raises(RuntimeError, match="does not fit"):
        w.batch_row(9)  # the window (steps 8..) would cross step 8, a multiple of its size
    bad = rows[3].clone()
    bad[5] = float("nan")
    put(8, bad)
    w.means()
    put(9, rows[0])
    put(10, bad)
    put(11, bad * 0 + float("inf"))
    step, stats = w.first_non_finite()
    assert step == 10 and stats["loss"] == rows[3, 0].item() and math.isnan(stats["grad_norm"])
    assert w.first_non_finite()[0] == 10


def test_checkpoint_cadence_defaults_to_about_a_thousand_steps(tmp_path, monkeypatch):
    """Short epochs (8 steps here) do not write a checkpoint per evaluation: by default last.pt
    comes every ceil(1000 / 8) = 125 epochs and at the end; --checkpoint-every N is exact."""
    from fused_vae.training.trainer import Trainer

    writes = []
    real = Trainer._checkpoint

    def checkpoint(self, run, name, metrics):
        writes.append((name, run.step))
        return real(self, run, name, metrics)

    monkeypatch.setattr(Trainer, "_checkpoint", checkpoint)
    train(tiny(tmp_path / "auto", checkpoint_every=None, epochs=3))
    assert [w for w in writes if w[0] == "last.pt"] == [("last.pt", 24)]
    writes.clear()
    train(tiny(tmp_path / "two", checkpoint_every=2, epochs=3))
    assert [w for w in writes if w[0] == "last.pt"] == [("last.pt", 16), ("last.pt", 24)]


def test_nan_in_the_first_step_says_no_checkpoint_exists(tmp_path):
    x = torch.rand(60, 1, 4, 4)
    x[::2] = float("nan")
    bundle = DataBundle(train=x, test=torch.rand(10, 1, 4, 4), name="bad")
    with pytest.raises(NonFiniteLossError, match=r"step 1 .*no checkpoint"):
        train(tiny(tmp_path, batch_size=20), data=bundle)


def test_options_conv_gaussian_warmup_free_bits(tmp_path):
    import numpy as np

    np.save(tmp_path / "x.npy", (np.random.default_rng(0).random((120, 3, 6, 6)) * 4 - 2).astype(np.float32))
    cfg = tiny(tmp_path, data="tensor", data_path=str(tmp_path / "x.npy"), model="conv", conv_channels=[4, 8],
               hidden=[16], likelihood="gaussian", learn_sigma=True, sigma=1.0, kl_warmup_steps=4, free_bits=0.1,
               batch_size=20, epochs=2, lr_warmup_steps=2, lr_schedule="linear", grad_clip=0.0, iwae_samples=8,
               logvar_clamp=[-10.0, 10.0])
    summary = train(cfg)
    tr = _records(cfg.run_dir, "train")
    assert [round(r["beta"], 3) for r in tr[:5]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert tr[0]["lr"] == pytest.approx(1e-3)  # warm-up step 2 of 2 done after the first step
    assert "test_iwae_nll" in summary
    ck = load_checkpoint(cfg.run_dir / "checkpoints" / "last.pt")
    assert "likelihood.log_sigma" in ck["model"] and ck["model_spec"]["kind"] == "conv"


def test_config_files_and_validation(tmp_path):
    (tmp_path / "c.toml").write_text('epochs = 3\nhidden = [10, 20]\n[unused]\n')
    with pytest.raises(ConfigError, match="unused"):
        TrainConfig.from_dict(load_config_file(tmp_path / "c.toml"))
    (tmp_path / "c.toml").write_text('epochs = 3\nhidden = [10, 20]\nlatent-dim = 7\n')
    cfg = TrainConfig.from_dict(load_config_file(tmp_path / "c.toml"))
    assert (cfg.epochs, cfg.hidden, cfg.latent_dim) == (3, [10, 20], 7)
    (tmp_path / "c.json").write_text('{"train": {"lr": 0.01, "model": "conv"}}')
    cfg = TrainConfig.from_dict(load_config_file(tmp_path / "c.json"))
    assert (cfg.lr, cfg.model) == (0.01, "conv")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ConfigError, match=r"bad\.json.*parse"):
        load_config_file(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig.from_dict({"batch_size": 0})
    with pytest.raises(ConfigError, match="binarize"):
        TrainConfig.from_dict({"binarize": "dynamic", "likelihood": "gaussian"})
    with pytest.raises(ConfigError, match="divisible"):
        train(tiny(tmp_path, batch_size=50, grad_accum=3))


def test_tensorboard_on_without_the_package_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.raises(ConfigError, match=r"pip install tensorboard"):
        train(tiny(tmp_path, epochs=1, tensorboard="on"))
    assert not (tmp_path / "run").exists()
    train(tiny(tmp_path, epochs=1, tensorboard="auto"))  # auto goes on without it
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_paper_architecture_on_mnist_idx_files(tmp_path):
    """The IWAE paper's net (200-200 tanh, 50 latents) on (synthetic) MNIST IDX files with
    dynamic binarization: the run a user makes with their own MNIST files."""
    import gzip
    import struct

    import numpy as np

    rng = np.random.default_rng(0)
    root = tmp_path / "mnist"
    root.mkdir()
    for split_name, n in (("train", 100), ("t10k", 20)):
        arr = (rng.random((n, 28, 28)) < 0.2).astype(np.uint8) * 255
        head = bytes([0, 0, 8, 3]) + struct.pack(">3I", n, 28, 28)
        (root / f"{split_name}-images-idx3-ubyte.gz").write_bytes(gzip.compress(head + arr.tobytes()))
    cfg = tiny(tmp_path, data="mnist", data_path=str(root), binarize="dynamic", hidden=[200, 200], latent_dim=50,
               epochs=2, iwae_samples=20)
    summary = train(cfg)
    ck = load_checkpoint(cfg.run_dir / "checkpoints" / "last.pt")
    assert ck["model_spec"]["input_shape"] == [1, 28, 28] and ck["model_spec"]["hidden"] == [200, 200]
    assert summary["steps"] == 4 and summary["test_iwae_nll"] <= -summary["test_elbo"] + 1.0


def _adam_pair(weight_decay):
    from fused_vae.training.optim import make_optimizer

    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 7)]
    a = [torch.randn(s, requires_grad=True) for s in shapes]
    b = [p.detach().clone().requires_grad_() for p in a]
    opt_a, fused = make_optimizer(a, lr=1e-2, weight_decay=weight_decay, eps=1e-4)
    opt_b, _ = make_optimizer(b, lr=1e-2, weight_decay=weight_decay, eps=1e-4)
    if not fused:
        pytest.skip("no fused Adam on this torch/device")
    return a, b, opt_a, opt_b


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_direct_adam_gives_optimizer_step_bits_and_state(weight_decay):
    from fused_vae.training.optim import DirectAdam, make_optimizer, make_scheduler

    a, b, opt_a, opt_b = _adam_pair(weight_decay)
    sched_a = make_scheduler(opt_a, total_steps=6, warmup_steps=2, schedule="cosine", min_ratio=0.1)
    sched_b = torch.optim.lr_scheduler.LambdaLR(opt_b, lambda s: sched_a.lr_lambdas[0](s))
    direct = DirectAdam(opt_a, a)
    for step in range(6):
        grads = [torch.randn_like(p) for p in a]
        for pa, pb, g in zip(a, b, grads):
            pa.grad, pb.grad = g.clone(), g.clone()
        direct.step()
        opt_b.step()
        assert (direct._lists is not None) == (step >= 0)  # gathered after the first (initialising) step
        sched_a.step()
        sched_b.step()
        assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"] and sched_a.get_last_lr() == sched_b.get_last_lr()
        for pa, pb in zip(a, b):
            assert torch.equal(pa, pb)
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    for i in range(len(a)):
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa["state"][i][k], sb["state"][i][k])
    assert len({id(st["step"]) for st in sa["state"].values()}) == len(a)  # the shared counter stays inside
    assert sched_a.state_dict().keys() == sched_b.state_dict().keys()
    assert sched_a.state_dict()["last_epoch"] == sched_b.state_dict()["last_epoch"] == 6
    # A resumed optimizer (state loaded into it) goes on with the same bits.
    c = [p.detach().clone().requires_grad_() for p in a]
    opt_c, _ = make_optimizer(c, lr=1e-2, weight_decay=weight_decay, eps=1e-4)
    opt_c.load_state_dict(copy.deepcopy(sa))
    opt_a.load_state_dict(copy.deepcopy(sb))
    direct_c = DirectAdam(opt_c, c)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in a]
        for pa, pb, pc, g in zip(a, b, c, grads):
            pa.grad, pb.grad, pc.grad = g.clone(), g.clone(), g.clone()
        direct.step()
        direct_c.step()
        opt_b.step()
        for pa, pb, pc in zip(a, b, c):
            assert torch.equal(pa, pb) and torch.equal(pc, pb)
    for opt in (opt_a, opt_c):
        assert all(torch.equal(x["step"], y["step"]) for x, y in zip(opt.state_dict()["state"].values(),
                                                                     opt_b.state_dict()["state"].values()))


def test_direct_adam_falls_back_to_optimizer_step_for_a_missing_gradient():
    from fused_vae.training.optim import DirectAdam

    a, b, opt_a, opt_b = _adam_pair(0.0)
    direct = DirectAdam(opt_a, a)
    for step in range(3):
        for i, (pa, pb) in enumerate(zip(a, b)):
            g = None if (step == 2 and i == 1) else torch.randn_like(pa)
            pa.grad, pb.grad = g, (None if g is None else g.clone())
        direct.step()
        opt_b.step()
        for pa, pb in zip(a, b):
            assert torch.equal(pa, pb)
    assert torch.equal(opt_a.state[a[1]]["step"], opt_b.state[b[1]]["step"])


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_grad_norm_and_clip_divisor_match_clip_grad_norm(max_norm):
    """The norm is clip_grad_norm_'s (same bits); dividing by clip_divisor clips as it does (to
    rounding: a division by 1/c where it multiplies by c), and DirectAdam's fused kernel
    applies the divisor with the same bits as dividing first and calling optimizer.step()."""
    from fused_vae.training.optim import DirectAdam, make_optimizer
    from fused_vae.training.step import clip_divisor, grad_norm

    torch.manual_seed(1)
    a = [torch.randn(s, requires_grad=True) for s in [(4, 3), (3,), (6,)]]
    b = [p.detach().clone().requires_grad_() for p in a]
    for pa, pb in zip(a, b):
        pa.grad = torch.randn_like(pa)
        pb.grad = pa.grad.clone()
    ref = torch.cat([p.grad.double().flatten() for p in b]).norm()
    got = grad_norm(a)
    assert torch.equal(got, torch.nn.utils.get_total_norm([p.grad for p in b], foreach=True))
    assert torch.equal(got, torch.nn.utils.clip_grad_norm_(b, max_norm, foreach=True))
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    divisor = clip_divisor(got, max_norm)
    assert divisor.dtype == torch.float32 and divisor.item() == pytest.approx(max(1.0, ref.item() / max_norm), rel=1e-6)
    clipped = [p.grad / divisor for p in a]
    for g, pb in zip(clipped, b):
        torch.testing.assert_close(g, pb.grad, rtol=1e-6, atol=0)
    if max_norm == 0.5:
        assert torch.cat([g.double().flatten() for g in clipped]).norm().item() == pytest.approx(0.5, rel=1e-5)
    # In the fused kernel (after the initialising step) and in the fallback: the same bits.
    c = [p.detach().clone().requires_grad_() for p in a]
    opt_a, fused = make_optimizer(a, lr=1e-2, weight_decay=0.0)
    opt_c, _ = make_optimizer(c, lr=1e-2, weight_decay=0.0)
    if not fused:
        pytest.skip("no fused Adam on this torch/device")
    direct = DirectAdam(opt_a, a)
    for _ in range(3):
        grads = [torch.randn_like(p) * 3 for p in a]
        for pa, pc, g in zip(a, c, grads):
            pa.grad, pc.grad = g.clone(), g.clone()
        divisor = clip_divisor(grad_norm(a), max_norm)
        direct.step(divisor)
        torch._foreach_div_([p.grad for p in c], divisor)
        opt_c.step()
        assert all(torch.equal(pa, pc) for pa, pc in zip(a, c))

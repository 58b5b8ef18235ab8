"""Checkpoints: atomic writes, safe loading, corrupt files, round trip and exact resume."""

from __future__ import annotations

import pickle
import shutil

import pytest
import torch

from fused_vae.training import checkpoint as ckpt_mod
from fused_vae.training.checkpoint import CheckpointError, atomic_save, load_checkpoint
from fused_vae.training.config import TrainConfig
from fused_vae.training.trainer import Trainer, train


def tiny(tmp_path, **kw) -> TrainConfig:
    """A seconds-long run on 200 digits with a small MLP."""
    base = dict(max_train_examples=200, max_test_examples=60, batch_size=50, hidden=[32], latent_dim=4, epochs=2,
                eval_every=1, checkpoint_every=1, iwae_samples=0, log_every=1, progress=False,
                out_dir=str(tmp_path), name="run", backend="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _params(path):
    return load_checkpoint(path)["model"]


def _train_records(run_dir):
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "train"]


def test_atomic_save_keeps_the_old_file_when_a_save_crashes(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    atomic_save({"a": torch.ones(3)}, path)

    def crash(obj, f, *a, **k):
        f.write(b"partial data")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left behind


def test_a_failed_run_checkpoint_write_says_what_is_intact(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "checkpoints" / "last.pt"

    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", full)
    with pytest.raises(ckpt_mod.CheckpointWriteError) as e:
        ckpt_mod.save_run_checkpoint({"a": 1}, path, last_good=None, run_dir=tmp_path)
    assert str(e.value) == (f"cannot write checkpoint {path}: the disk is full; no earlier checkpoint of this run "
                            "was written, so nothing was lost; free space and start again")
    assert isinstance(e.value, CheckpointError) and not path.exists()
    denied = ckpt_mod.write_error(path, PermissionError(errno.EACCES, "Permission denied"),
                                  last_good=(path, 7), run_dir=tmp_path)
    assert str(denied).startswith(f"cannot write checkpoint {path}: Permission denied; the last good checkpoint "
                                  f"{path} (step 7) is intact")


def test_checkpoint_round_trip_and_contents(tmp_path):
    cfg = tiny(tmp_path)
    summary = train(cfg)
    run = tmp_path / "run"
    ck = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ck["step"] == summary["steps"] == 8 and ck["epoch"] == 2 and ck["batch_in_epoch"] == 0
    assert ck["config"] == cfg.resolved(threads=1, amp="off").to_dict()
    assert ck["model_spec"]["kind"] == "mlp" and ck["data"]["input_shape"] == [1, 8, 8]
    assert isinstance(ck["rng"]["torch"], torch.Tensor)
    assert {"state", "param_groups"} <= set(ck["optimizer"]) and ck["scheduler"]["last_epoch"] == 8
    assert (run / "checkpoints" / "best.pt").is_file()
    from fused_vae.models import build_model

    model = build_model(ck["model_spec"])
    model.load_state_dict(ck["model"])


def test_files_that_are_not_checkpoints_say_so_without_advising_weights_only_false(tmp_path):
    """torch's own message for such files advises weights_only=False, which runs the file's code."""
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")
    from PIL import Image

    Image.new("L", (4, 4)).save(tmp_path / "image.png")
    (tmp_path / "notes.txt").write_text("hello\n")
    expected = {
        "module.pt": "not a fused_vae checkpoint: it holds Python objects (torch.nn.modules.linear.Linear), where a "
                     "checkpoint holds only tensors, numbers, strings, lists and dicts; it was not loaded",
        "image.png": r"not a fused_vae checkpoint: not a file written by torch.save (it starts with b'\x89PNG'",
        "notes.txt": "not a fused_vae checkpoint: not a file written by torch.save (it starts with b'hell'",
    }
    for name, text in expected.items():
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(tmp_path / name)
        msg = str(e.value)
        assert msg.startswith(f"cannot load checkpoint {tmp_path / name}: ") and text in msg, msg
        assert "\n" not in msg and "weights_only" not in msg and "\x1b" not in msg


def test_corrupt_and_foreign_checkpoints_raise_clear_errors(tmp_path):
    train(tiny(tmp_path, epochs=1))
    good = tmp_path / "run" / "checkpoints" / "last.pt"
    data = good.read_bytes()
    cases = {
        "truncated.pt": data[: len(data) // 2],
        "garbage.pt": b"\x00\x01 this is not a checkpoint" * 40,
        "empty.pt": b"",
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(CheckpointError, match=rf"{name}.*corrupt"):
            load_checkpoint(tmp_path / name)

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"format": "fused_vae.checkpoint", "x": Evil()}, protocol=2))
    with pytest.raises(CheckpointError, match=r"evil\.pt: not a fused_vae checkpoint: it holds Python objects"):
        load_checkpoint(tmp_path / "evil.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match=r"foreign\.pt.*not a fused_vae checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    ck = load_checkpoint(good)
    ck["version"] = 99
    torch.save(ck, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match=r"future\.pt.*version 99"):
        load_checkpoint(tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match=r"missing\.pt.*does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


class _Crash(Exception):
    pass


def _crash_after(monkeypatch, n_steps):
    """Makes Trainer raise _Crash when it starts step n_steps + 1."""
    real = Trainer._train_step
    calls = {"n": 0}

    def step(self, *a, **k):
        if calls["n"] == n_steps:
            raise _Crash
        calls["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(Trainer, "_train_step", step)


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    # 4 steps/epoch; the crash comes mid-epoch 3, after last.pt of epoch 2 was written.
    kw = dict(epochs=4, eval_every=2, binarize="dynamic", kl_warmup_steps=5, free_bits=0.05, grad_accum=2)
    full = train(tiny(tmp_path / "a", **kw))
    cfg_b = tiny(tmp_path / "b", **kw)
    _crash_after(monkeypatch, 10)
    with pytest.raises(_Crash):
        train(cfg_b)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "last.pt")["step"] == 8
    resumed = train(cfg_b, resume=True)
    pa, pb = _params(tmp_path / "a" / "run" / "checkpoints" / "last.pt"), _params(tmp_path / "b" / "run" / "checkpoints" / "last.pt")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert resumed["test_elbo"] == full["test_elbo"] and resumed["steps"] == full["steps"] == 16
    ra, rb = _train_records(tmp_path / "a" / "run"), _train_records(tmp_path / "b" / "run")
    assert [r["step"] for r in rb] == list(range(1, 17))  # steps after the checkpoint are logged once
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]


def test_resume_from_a_mid_epoch_checkpoint(tmp_path):
    # A constant LR makes the schedule independent of where the first run stopped.
    kw = dict(epochs=3, lr_schedule="constant", eval_every=0)
    train(tiny(tmp_path / "a", **kw))
    cfg = tiny(tmp_path / "b", max_steps=6, **kw)  # stops in the middle of epoch 2
    train(cfg)
    ck = load_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "last.pt")
    assert (ck["step"], ck["epoch"], ck["batch_in_epoch"]) == (6, 1, 2)
    cfg2 = cfg.updated({"max_steps": None})
    train(cfg2, resume=True)
    pa, pb = _params(tmp_path / "a" / "run" / "checkpoints" / "last.pt"), _params(tmp_path / "b" / "run" / "checkpoints" / "last.pt")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_resume_refuses_a_different_model_and_new_runs_refuse_to_overwrite(tmp_path):
    from fused_vae.training import RunExistsError

    cfg = tiny(tmp_path, epochs=1)
    train(cfg)
    with pytest.raises(RunExistsError, match="--resume"):
        train(cfg)
    with pytest.raises(CheckpointError, match="latent_dim"):
        train(cfg.updated({"latent_dim": 3}), resume=True)
    shutil.copy(tmp_path / "run" / "checkpoints" / "last.pt", tmp_path / "copy.pt")
    train(cfg.updated({"epochs": 2}), resume=str(tmp_path / "copy.pt"))
    train(cfg, overwrite=True)

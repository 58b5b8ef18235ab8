"""The command line: help, train / eval / sample, config files, resume, error messages."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fused_vae.cli import main
from fused_vae.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
TINY = ["--max-train-examples", "200", "--max-test-examples", "50", "--batch-size", "50", "--hidden", "16",
        "--latent-dim", "4", "--iwae-samples", "10", "--no-progress", "--eval-every", "1", "--checkpoint-every", "1"]


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
    for opt in ("--config", "--resume", "--overwrite"):
        assert opt in text
    for cmd, opts in (("eval", ("--iwae-samples", "--checkpoint", "--data-path", "--out")),
                      ("sample", ("--num", "--seed", "--mode", "--out", "--npy"))):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = capsys.readouterr().out
        assert all(o in text for o in opts)


def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "fused_vae", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "train" in res.stdout and "sample" in res.stdout


def _start_command(*argv: str) -> subprocess.Popen:
    """Starts the ``fused-vae`` console script as pip's wrapper runs it: pyproject's entry point
    imported and called, in a new process."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["fused-vae"]
    module, func = target.split(":")
    code = f"import sys; from {module} import {func}; sys.exit({func}(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # SIGINT back to its default in the child: a test run started in the background by a
    # non-interactive shell ignores SIGINT, the child would inherit that, and Python only
    # turns SIGINT into KeyboardInterrupt when it starts with the default action.
    return subprocess.Popen([sys.executable, "-c", code, *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _interrupt(proc: subprocess.Popen) -> tuple[int, str, str]:
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="watches /proc/PID/maps (Linux)")
def test_ctrl_c_while_torch_is_imported_is_one_line(tmp_path):
    proc = _start_command("train", "--out-dir", str(tmp_path))
    maps = Path(f"/proc/{proc.pid}/maps")
    while proc.poll() is None and "libtorch" not in maps.read_text():  # torch's import has begun: seconds to go
        time.sleep(0.002)
    assert proc.poll() is None, proc.communicate()
    code, out, err = _interrupt(proc)
    assert (code, out, err) == (130, "", "fused-vae: interrupted\n")


def test_ctrl_c_while_training_is_one_line_naming_the_checkpoint(tmp_path):
    proc = _start_command("train", *TINY, "--epochs", "100000", "--out-dir", str(tmp_path), "--name", "r")
    lines = [proc.stdout.readline() for _ in range(2)]  # the second evaluation comes after epoch 1's checkpoint
    assert lines[1].startswith("step 8 (epoch 2): test ELBO"), "".join(lines) + proc.communicate()[1]
    code, out, err = _interrupt(proc)
    assert code == 130 and len(err.splitlines()) == 1, err
    assert err.startswith("fused-vae train: interrupted at step ") and f"fused-vae train --resume {tmp_path / 'r'}" in err


def test_train_eval_sample_and_resume(tmp_path, capsys):
    code, out, _ = _run(capsys, "train", *TINY, "--epochs", "1", "--out-dir", str(tmp_path), "--name", "r")
    assert code == 0 and "test ELBO" in out and "test NLL (IWAE, k=10)" in out
    assert "done: 4 steps (1 epoch) in " in out
    run = tmp_path / "r"
    assert (run / "samples.png").is_file()

    code, out, _ = _run(capsys, "eval", str(run), "--iwae-samples", "20")
    res = json.loads(out)
    assert code == 0 and res["iwae_samples"] == 20 and res["num_test"] == 50 and res["checkpoint_step"] == 4
    assert res["test_iwae_nll"] <= -res["test_elbo"] + 1.0

    code, out, _ = _run(capsys, "sample", str(run / "checkpoints" / "best.pt"), "-n", "6", "--out",
                        str(tmp_path / "s.png"), "--npy", str(tmp_path / "s.npy"), "--mode", "sample")
    assert code == 0 and (tmp_path / "s.png").is_file()
    arr = np.load(tmp_path / "s.npy")
    assert arr.shape == (6, 1, 8, 8) and set(np.unique(arr)) <= {0.0, 1.0}
    code, out, _ = _run(capsys, "sample", str(run))
    assert code == 0 and (run / "samples-seed0.png").is_file()

    # Resume with more epochs: the stored config is kept, the flag overrides it.
    code, out, err = _run(capsys, "train", "--out-dir", str(tmp_path), "--name", "r", "--resume", "--epochs", "2")
    assert code == 0, err
    assert f"resuming from step 4 (epoch 1) of {run / 'checkpoints' / 'last.pt'}\n" in out
    summary = json.loads((run / "summary.json").read_text())
    cfg = json.loads((run / "config.json").read_text())
    assert summary["steps"] == 8 and cfg["epochs"] == 2 and cfg["hidden"] == [16]
    # A run moved elsewhere resumes from its checkpoint path.
    moved = tmp_path / "moved"
    run.rename(moved)
    code, out, err = _run(capsys, "train", "--resume", str(moved / "checkpoints" / "last.pt"), "--epochs", "3")
    assert code == 0, err
    assert json.loads((moved / "summary.json").read_text())["steps"] == 12


@pytest.fixture
def torch_default_threads():
    """torch's thread count set to 3 for the test (so that "torch's choice" is neither 1 nor 2), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(before)


def _record_threads(monkeypatch, owner, name: str) -> list[int]:
    """torch's thread count at each call of ``owner.name`` from now on."""
    import torch

    seen: list[int] = []
    real = getattr(owner, name)

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(owner, name, spy)
    return seen


def test_eval_and_sample_pick_threads_the_way_train_does(tmp_path, capsys, monkeypatch, torch_default_threads):
    import torch

    from fused_vae.models.base import VAE
    from fused_vae.training import evaluation

    runs = {}
    for name, hidden in (("small", "16"), ("big", "1024")):  # 4.8k and 2.2M parameters: below and above 1M
        code, _, err = _run(capsys, "train", *TINY, "--hidden", hidden, hidden, "--epochs", "1", "--iwae-samples", "0",
                            "--out-dir", str(tmp_path), "--name", name)
        assert code == 0, err
        runs[name] = tmp_path / name
    train_threads = {k: json.loads((r / "config.json").read_text())["threads"] for k, r in runs.items()}
    assert train_threads == {"small": 1, "big": torch_default_threads}

    evals = _record_threads(monkeypatch, evaluation, "evaluate")
    draws = _record_threads(monkeypatch, VAE, "generate")
    for name, extra, want in (("small", (), 1), ("small", ("--threads", "2"), 2),
                              ("big", (), torch_default_threads), ("big", ("--threads", "2"), 2)):
        code, out, err = _run(capsys, "eval", str(runs[name]), "--iwae-samples", "2", *extra)
        assert code == 0, err
        assert evals[-1] == want and json.loads(out)["threads"] == want, (name, extra)
        code, _, err = _run(capsys, "sample", str(runs[name]), "-n", "4", "--out", str(tmp_path / "s.png"), *extra)
        assert code == 0 and draws[-1] == want, (name, extra, err)
        assert torch.get_num_threads() == torch_default_threads  # restored


def test_default_threads_rule():
    from fused_vae.models import MLPVAE
    from fused_vae.training.trainer import SMALL_MODEL_PARAMS, default_threads

    small, big = MLPVAE((1, 8, 8), hidden=[16]), MLPVAE((1, 28, 28), hidden=[1024, 1024])
    assert sum(p.numel() for p in small.parameters()) < SMALL_MODEL_PARAMS <= sum(p.numel() for p in big.parameters())
    assert [default_threads(small, "cpu"), default_threads(big, "cpu"), default_threads(small, "cuda")] == [1, None, None]
    assert default_threads(big, "cpu", 4) == default_threads(small, "cuda:0", 4) == 4


def test_eval_uses_the_runs_max_test_examples_unless_told(tmp_path, capsys):
    code, _, err = _run(capsys, "train", *TINY, "--epochs", "1", "--iwae-samples", "0", "--out-dir", str(tmp_path),
                        "--name", "r")
    assert code == 0, err
    for extra, n in (((), 50), (("--max-test-examples", "20"), 20), (("--max-test-examples", "all"), 359)):
        code, out, err = _run(capsys, "eval", str(tmp_path / "r"), "--iwae-samples", "0", *extra)
        assert code == 0 and json.loads(out)["num_test"] == n, (extra, err)


def test_config_file_and_flags(tmp_path, capsys):
    (tmp_path / "cfg.toml").write_text(f'epochs = 1\nlr = 0.01\nname = "fromfile"\nout_dir = "{tmp_path.as_posix()}"\n')
    code, _, err = _run(capsys, "train", "--config", str(tmp_path / "cfg.toml"), *TINY, "--lr", "0.005")
    assert code == 0, err
    cfg = json.loads((tmp_path / "fromfile" / "config.json").read_text())
    assert cfg["lr"] == 0.005 and cfg["epochs"] == 1


def test_errors_are_clear_and_set_the_exit_status(tmp_path, capsys):
    code, _, err = _run(capsys, "train", "--data", "mnist", "--data-path", str(tmp_path / "no-mnist"),
                        "--out-dir", str(tmp_path))
    assert code == 1 and "no-mnist" in err and "idx3-ubyte" in err
    (tmp_path / "bad.json").write_text('{"epochz": 3}')
    code, _, err = _run(capsys, "train", "--config", str(tmp_path / "bad.json"))
    assert code == 2 and "epochz" in err and "bad.json" in err
    code, _, err = _run(capsys, "train", "--data", "tensor")
    assert code == 2 and "data_path" in err
    code, _, _ = _run(capsys, "train", *TINY, "--epochs", "1", "--out-dir", str(tmp_path), "--name", "x")
    assert code == 0
    code, _, err = _run(capsys, "train", *TINY, "--epochs", "1", "--out-dir", str(tmp_path), "--name", "x")
    assert code == 2 and "--resume" in err and "--overwrite" in err
    code, _, err = _run(capsys, "train", *TINY, "--epochs", "1", "--out-dir", str(tmp_path), "--name", "x",
                        "--overwrite")
    assert code == 0
    (tmp_path / "x" / "checkpoints" / "last.pt").write_bytes(b"truncated")
    code, _, err = _run(capsys, "eval", str(tmp_path / "x"))
    assert code == 1 and "last.pt" in err and "corrupt" in err
    code, _, err = _run(capsys, "sample", str(tmp_path / "nothing.pt"))
    assert code == 1 and "nothing.pt" in err


@pytest.mark.parametrize("argv,expected", [
    (["train", "--lr", "abc"], "fused-vae train: error: argument --lr: expected a number, got 'abc'"),
    (["train", "--epochs", "2.5"], "argument --epochs: expected an integer, got '2.5'"),
    (["train", "--hidden", "200", "x"], "argument --hidden: expected an integer, got 'x'"),
    (["train", "--preset", "nope"], "argument --preset: invalid choice: 'nope' (choose from 'iwae-mnist', 'iwae-mnist-2layer')"),
    (["train", "--data", "cifar"], "argument --data: invalid choice: 'cifar'"),
    (["eval", "run", "--iwae-samples", "-1"], "fused-vae eval: error: argument --iwae-samples: expected an integer >= 0"),
    (["eval", "run", "--threads", "0"], "argument --threads: expected an integer >= 1, got '0'"),
    (["eval", "run", "--max-test-examples", "0"], "argument --max-test-examples: expected an integer >= 1 or 'all', got '0'"),
    (["sample", "run", "--threads", "x"], "argument --threads: expected an integer >= 1, got 'x'"),
    (["sample", "run", "-n", "0"], "fused-vae sample: error: argument -n/--num: expected an integer >= 1, got '0'"),
    (["sample", "run", "--seed", "one"], "argument --seed: expected an integer, got 'one'"),
    (["nope"], "fused-vae: error: argument {train,eval,sample}: invalid choice: 'nope'"),
    ([], "fused-vae: error: the following arguments are required: {train,eval,sample}"),
])
def test_bad_arguments_give_one_line_naming_the_argument(argv, expected, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""
    assert len(err.splitlines()) == 1 and expected in err and err.rstrip().endswith("--help` lists the options)"), err


def test_config_values_of_the_wrong_type_name_the_option_and_the_type(tmp_path, capsys):
    for text, expected in (('epochs = "x"', "epochs must be an integer, got 'x'"),
                           ("lr = true", "lr must be a number, got True"),
                           ("hidden = [200, 1.5]", "hidden must be a list of integers, got [200, 1.5]"),
                           ("logvar_clamp = [1.0]", "logvar_clamp must be a list of 2 numbers, got [1.0]"),
                           ("progress = 1", "progress must be true or false, got 1")):
        (tmp_path / "c.toml").write_text(text + "\n")
        code, _, err = _run(capsys, "train", "--config", str(tmp_path / "c.toml"))
        assert code == 2 and err == f"fused-vae train: error: {tmp_path / 'c.toml'}: {expected}\n"


def test_version(capsys):
    import torch

    import fused_vae

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"fused-vae {fused_vae.__version__} (torch {torch.__version__}, Python {sys.version.split()[0]})\n"


def test_help_and_messages_never_offer_none(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "None" not in capsys.readouterr().out
    code, _, err = _run(capsys, "train", "--backend", "fast")
    assert code == 2 and "backend must be one of cpu, cuda, triton, reference" in err and "None" not in err


def test_resuming_a_finished_run_says_it_is_complete(tmp_path, capsys):
    code, _, err = _run(capsys, "train", *TINY, "--epochs", "1", "--out-dir", str(tmp_path), "--name", "r")
    assert code == 0, err
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    code, out, err = _run(capsys, "train", "--out-dir", str(tmp_path), "--name", "r", "--resume")
    assert code == 0, err
    assert "is already complete (4 steps, 1 epoch)" in out and "done:" not in out and "test ELBO" in out
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before  # nothing rewritten


def test_ctrl_c_names_the_last_checkpoint_and_how_to_resume(tmp_path, capsys, monkeypatch):
    from fused_vae.training.trainer import Trainer

    real = Trainer._train_step
    calls = {"n": 0}

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # 4 steps per epoch: after the epoch-1 checkpoint
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Trainer, "_train_step", step)
    code, out, err = _run(capsys, "train", *TINY, "--epochs", "2", "--out-dir", str(tmp_path), "--name", "r")
    run = tmp_path / "r"
    assert code == 130
    assert f"Last checkpoint: {run / 'checkpoints' / 'last.pt'} (step 4)" in err
    assert f"fused-vae train --resume {run}" in err
    monkeypatch.undo()
    code, _, err = _run(capsys, "train", "--resume", str(run))
    assert code == 0, err
    assert json.loads((run / "summary.json").read_text())["steps"] == 8


def test_ctrl_c_before_the_first_checkpoint_says_a_plain_rerun_starts_over(tmp_path, capsys, monkeypatch):
    from fused_vae.training.trainer import Trainer

    def step(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_train_step", step)
    argv = ["train", *TINY, "--epochs", "2", "--checkpoint-every", "2", "--out-dir", str(tmp_path), "--name", "r"]
    code, out, err = _run(capsys, *argv)
    assert code == 130
    assert err == ("fused-vae train: interrupted at step 0 of 8. No checkpoint of this run was written yet (the first "
                   "comes after 2 epochs, --checkpoint-every), so there is nothing to resume; run the same command "
                   "again to start over.\n")
    monkeypatch.undo()
    code, _, err = _run(capsys, *argv)  # the same command, as the message says
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["steps"] == 8
    monkeypatch.setattr(Trainer, "_train_step", step)  # --overwrite stopped before its first checkpoint:
    code, _, err = _run(capsys, *argv, "--overwrite")  # the earlier run's last.pt is still there
    last = tmp_path / "r" / "checkpoints" / "last.pt"
    assert code == 130 and err == (f"fused-vae train: interrupted at step 0 of 8. {last} exists (written as the run "
                                   "stopped, or by an earlier run); resume from it with: fused-vae train --resume "
                                   f"{tmp_path / 'r'}, or start over with --overwrite.\n")


def test_a_full_disk_while_saving_names_the_file_and_how_to_resume(tmp_path, capsys, monkeypatch):
    import errno

    import torch

    from fused_vae.training import checkpoint as ckpt_mod

    real_save = torch.save

    def save(obj, f, *a, **k):
        if obj["step"] > 4:  # the checkpoints after the first epoch (4 steps) find the disk full
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", save)
    code, out, err = _run(capsys, "train", *TINY, "--epochs", "2", "--out-dir", str(tmp_path), "--name", "r")
    monkeypatch.undo()
    run = tmp_path / "r"
    last = run / "checkpoints" / "last.pt"
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"error: cannot write checkpoint {last}: the disk is full;" in err
    assert f"the last good checkpoint {last} (step 4) is intact" in err
    assert err.strip().endswith(f"free space and resume with: fused-vae train --resume {run}")
    assert ckpt_mod.load_checkpoint(last)["step"] == 4
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.pt", "last.pt"]  # no temp file left
    code, out, err = _run(capsys, "train", "--resume", str(run))
    assert code == 0, err
    assert "resuming from step 4 (epoch 1)" in out and json.loads((run / "summary.json").read_text())["steps"] == 8


def test_an_unwritable_metrics_csv_does_not_hide_the_error_that_stopped_the_run(tmp_path, capsys):
    from fused_vae.training.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, tensorboard="off")
    logger.log({"kind": "train", "step": 1, "loss": 1.0})
    (tmp_path / "metrics.csv").mkdir()  # open() for writing fails with an OSError
    logger.close()
    err = capsys.readouterr().err
    assert f"could not write {tmp_path / 'metrics.csv'}" in err and "metrics.jsonl holds the same records" in err


def test_adam_without_weight_decay_is_called_adam(tmp_path, capsys):
    for decay, name in (("0", "Adam"), ("0.01", "AdamW (weight decay 0.01)")):
        code, out, err = _run(capsys, "train", *TINY, "--epochs", "1", "--iwae-samples", "0", "--weight-decay", decay,
                              "--out-dir", str(tmp_path), "--name", decay)
        assert code == 0, err
        shown = json.loads((tmp_path / decay / "summary.json").read_text())["optimizer"]
        assert shown.split(", ")[0] == name and f"optimizer {shown}\n" in out


def _fake_mnist(root: Path, n_train: int = 60, n_test: int = 20) -> Path:
    import gzip
    import struct

    rng = np.random.default_rng(0)
    root.mkdir()
    for split, n in (("train", n_train), ("t10k", n_test)):
        arr = (rng.random((n, 28, 28)) < 0.2).astype(np.uint8) * 255
        head = bytes([0, 0, 8, 3]) + struct.pack(">3I", n, 28, 28)
        (root / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(head + arr.tobytes()))
    return root


def test_the_iwae_mnist_preset_in_one_command(tmp_path, capsys):
    data = _fake_mnist(tmp_path / "mnist")
    code, out, err = _run(capsys, "train", "--preset", "iwae-mnist", "--data", "mnist", "--data-path", str(data),
                          "--objective", "iwae", "--train-samples", "3", "--epochs", "2", "--iwae-samples", "30",
                          "--out-dir", str(tmp_path), "--no-progress")
    assert code == 0, err
    run = tmp_path / "mnist-mlp-iwae3"
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["hidden"], cfg["latent_dim"], cfg["activation"], cfg["binarize"]) == ([200, 200], 50, "tanh", "dynamic")
    assert (cfg["batch_size"], cfg["adam_eps"], cfg["lr_schedule"], cfg["objective"]) == (20, 1e-4, "iwae", "iwae")
    assert cfg["train_samples"] == 3 and cfg["epochs"] == 2 and cfg["amp"] == "off"
    assert "trained objective: iwae with K = 3" in out and "test NLL (IWAE, k=30)" in out
    lrs = [r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert lrs[-1] == pytest.approx(1e-3 * 10 ** (-1 / 7))  # epoch 2 starts stage 1


def test_train_and_eval_keep_freed_memory_for_their_steps(tmp_path, capsys, monkeypatch):
    from fused_vae.training import allocator

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(True) or True)
    code, _, err = _run(capsys, "train", *TINY, "--epochs", "1", "--iwae-samples", "0", "--out-dir", str(tmp_path),
                        "--name", "r")
    assert code == 0 and len(calls) == 1, err
    code, _, err = _run(capsys, "eval", str(tmp_path / "r"), "--iwae-samples", "2")
    assert code == 0 and len(calls) == 2, err
    code, _, err = _run(capsys, "sample", str(tmp_path / "r"), "-n", "2", "--out", str(tmp_path / "s.png"))
    assert code == 0 and len(calls) == 2, err  # a few draws: the process's allocator is left as it is

"""The op protocol of docs/design.md section 8: one set of rules for every backend's ops.

Schemas agree between C++ and Python, every backend's ops refuse the same mistakes with
the same exception type and message, and absent gradients give the same result.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fused_vae as fv
from fused_vae.backends import protocol as P
from fused_vae.backends import reference
from helpers import backend_op_pair, make_inputs


def backend_ops(backend):
    """(forward, backward or None) of a backend, called with the protocol's arguments."""
    ops = backend_op_pair(backend)
    return (reference.reparam_kl, None) if ops is None else ops


def _schema_args(name: str) -> str:
    schema = str(getattr(torch.ops.fused_vae, name).default._schema)
    return schema[schema.index("(") :]


@pytest.mark.parametrize("which", ["fwd", "bwd"])
def test_cpp_and_python_schemas_agree(which):
    if not fv.available_backends()["cpu"].available:
        pytest.skip("the C++ extension is not loaded")
    expected = P.FWD_SCHEMA if which == "fwd" else P.BWD_SCHEMA
    assert _schema_args(f"reparam_kl_{which}") == expected
    assert _schema_args(f"triton_reparam_kl_{which}") == expected


def test_kl_mode_numbers_agree_with_the_cpp_header():
    header = (P.__file__.rsplit("fused_vae", 1)[0] + "csrc/include/fused_vae/elementwise.h").replace("\\", "/")
    text = open(header).read()
    for cname, value in {"kKlSkip": P.KL_SKIP, "kKlElementwise": P.KL_ELEMENTWISE, "kKlPerSample": P.KL_PER_SAMPLE,
                         "kKlSum": P.KL_SUM, "kKlBatchMean": P.KL_BATCHMEAN}.items():  # fmt: skip
        assert f"{cname} = {value}," in text


def fwd_cases(device):
    mu, lv = make_inputs((4, 3), torch.float32, device, seed=1)
    seed = torch.tensor(3, device=device)
    return [
        ((mu[0, 0], lv[0, 0], seed, 1, 4), ValueError, "fused_vae: mu must be at least 1-D, got 0-D"),
        ((mu, lv[:2], seed, 1, 4), ValueError, r"fused_vae: logvar shape \[2, 3\] must equal mu shape \[4, 3\]"),
        ((mu.long(), lv.long(), seed, 1, 4), TypeError,
         "fused_vae: mu must be float32, float64, float16 or bfloat16, got torch.int64"),
        ((mu, lv.double(), seed, 1, 4), TypeError,
         "fused_vae: logvar dtype torch.float64 must equal mu dtype torch.float32"),
        ((mu, lv, torch.tensor(1.0, device=device), 1, 4), TypeError,
         "fused_vae: seed must be a one-element int64 tensor"),
        ((mu, lv, torch.tensor([1, 2], device=device), 1, 4), TypeError,
         "fused_vae: seed must be a one-element int64 tensor"),
        ((mu, lv, torch.tensor(1, device="meta"), 1, 4), ValueError,
         f"fused_vae: seed is on meta but mu is on {device}"),
        ((mu, lv, seed, -1, 4), ValueError, "fused_vae: num_samples must be >= 0, got -1"),
        ((mu, lv, seed, 1, 9), ValueError, r"fused_vae: kl_mode must be in \[0, 4\], got 9"),
    ]  # fmt: skip


def bwd_cases(device):
    mu, lv = make_inputs((4, 3), torch.float32, device, seed=2)
    seed = torch.tensor(3, device=device)
    gz = torch.ones(1, 4, 3, device=device)
    return [
        ((gz, None, mu, lv, seed, 0, 4), ValueError, "fused_vae: grad_z given but num_samples is 0"),
        ((gz[:, :2], None, mu, lv, seed, 1, 4), ValueError,
         r"fused_vae: grad_z must have num_samples \* mu.numel\(\) = 12 elements, got 6"),
        ((gz.double(), None, mu, lv, seed, 1, 4), TypeError,
         "fused_vae: grad_z dtype torch.float64 must equal mu dtype torch.float32"),
        ((None, torch.ones(4, device=device), mu, lv, seed, 1, 0), ValueError,
         "fused_vae: grad_kl given but kl_mode is 0"),
        ((None, torch.ones(5, device=device), mu, lv, seed, 1, 2), ValueError,
         "fused_vae: grad_kl must have 4 elements, got 5"),
        ((None, torch.ones(4, device=device, dtype=torch.float64), mu, lv, seed, 1, 2), TypeError,
         "fused_vae: grad_kl dtype torch.float64 must be torch.float32"),
        ((None, torch.ones((), device=device, dtype=torch.float16), mu, lv, seed, 1, 4), TypeError,
         "fused_vae: grad_kl dtype torch.float16 must be torch.float32"),
        ((None, torch.ones(4, 3, device=device, dtype=torch.float64), mu, lv, seed, 1, 1), TypeError,
         "fused_vae: grad_kl dtype torch.float64 must be torch.float32"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(9))
def test_forward_op_errors_are_the_same_on_every_backend(backend, case):
    fwd, _ = backend_ops(backend)
    args, exc, msg = fwd_cases(backend[1])[case]
    with pytest.raises(exc, match="^" + msg):
        fwd(*args, None, None)


@pytest.mark.parametrize("case", range(8))
def test_backward_op_errors_are_the_same_on_every_backend(op_backend, case):
    _, bwd = backend_ops(op_backend)
    args, exc, msg = bwd_cases(op_backend[1])[case]
    with pytest.raises(exc, match="^" + msg):
        bwd(*args, None, None)


def test_python_checks_match_the_messages_above():
    """protocol.py's checks (the Triton and reference ops') give the table's texts too."""
    for args, exc, msg in fwd_cases("cpu"):
        with pytest.raises(exc, match="^" + msg):
            P.check_fwd_args(*args)
    for args, exc, msg in bwd_cases("cpu"):
        with pytest.raises(exc, match="^" + msg):
            P.check_bwd_args(*args)


@pytest.mark.parametrize("shape", [(4, 3), (0, 3), (2, 0)])
def test_backward_without_incoming_gradients_is_zero(op_backend, shape):
    _, bwd = backend_ops(op_backend)
    device = op_backend[1]
    mu, lv = make_inputs(shape, torch.float32, device, seed=3)
    g_mu, g_lv = bwd(None, None, mu, lv, torch.tensor(1, device=device), 2, 3, None, None)
    assert g_mu.shape == mu.shape and g_lv.shape == mu.shape
    assert g_mu.is_contiguous() and g_lv.is_contiguous()
    assert not g_mu.any() and not g_lv.any()


@pytest.mark.parametrize("kl_mode", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("num_samples", [0, 1, 3])
def test_outputs_follow_the_protocol_allocation(backend, kl_mode, num_samples):
    fwd, _ = backend_ops(backend)
    device = backend[1]
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        mu, lv = make_inputs((3, 2, 2), dtype, device, seed=4)
        z, kl = fwd(mu, lv, torch.tensor(5, device=device), num_samples, kl_mode, None, None)
        want_z, want_kl = P.alloc_outputs(mu, num_samples, kl_mode)
        assert (z.shape, z.dtype) == (want_z.shape, want_z.dtype)
        assert (kl.shape, kl.dtype) == (want_kl.shape, want_kl.dtype)


def test_backend_for_names_the_automatic_choice(monkeypatch):
    auto = fv.available_backends().auto["cpu"]
    assert fv.backend_for("cpu") == auto
    assert fv.backend_for(torch.device("cpu"), "reference") == "reference"
    monkeypatch.setenv("FUSED_VAE_BACKEND", "reference")
    assert fv.backend_for("cpu") == "reference"
    with pytest.raises(ValueError, match="backend must be one of 'reference', 'cpu', 'cuda', 'triton' or None"):
        fv.backend_for("cpu", "tpu")
    monkeypatch.setenv("FUSED_VAE_BACKEND", "tpu")
    with pytest.raises(ValueError, match="FUSED_VAE_BACKEND environment variable must be one of .* or 'auto', got 'tpu'"):
        fv.backend_for("cpu")


def test_available_backends_prints_a_readable_table():
    text = str(fv.available_backends())
    lines = text.splitlines()
    assert lines[0] == "fused_vae backends:"
    assert any(line.split()[0] == "reference" for line in lines[1:5])
    assert any(line.startswith("automatic choice: cpu tensors -> ") for line in lines)
    assert any(line.startswith("C++/CUDA extension: ") for line in lines)
    assert max(len(line) for line in lines) < 200


def test_import_does_not_import_dynamo():
    code = "import sys, fused_vae; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"

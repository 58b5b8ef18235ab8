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


def backend_ops(backend, op="reparam_kl"):
    """(forward, backward or None) of op family ``op`` of a backend, called with the protocol's arguments."""
    ops = backend_op_pair(backend, op)
    return (lambda *args: reference.run(op, *args), None) if ops is None else ops


def _schema_args(name: str) -> str:
    schema = str(getattr(torch.ops.fused_vae, name).default._schema)
    return schema[schema.index("(") :]


@pytest.mark.parametrize("op", list(P.OPS))
@pytest.mark.parametrize("which", ["fwd", "bwd"])
def test_cpp_and_python_schemas_agree(which, op):
    if not fv.available_backends()["cpu"].available:
        pytest.skip("the C++ extension is not loaded")
    spec = P.OPS[op]
    expected = spec.fwd_schema if which == "fwd" else spec.bwd_schema
    assert _schema_args(f"{op}_{which}") == expected
    assert _schema_args(f"triton_{op}_{which}") == expected


def test_emulated_schemas_agree(cuda_emulation):
    from fused_vae.backends import cuda_emulation as emu

    if not cuda_emulation or not emu.status().loaded:
        pytest.skip("the emulated CUDA device is off or not built")
    for spec in P.OPS.values():
        assert _schema_args(f"cuda_emu_{spec.name}_fwd") == spec.fwd_schema
        assert _schema_args(f"cuda_emu_{spec.name}_bwd") == spec.bwd_schema


def test_mode_numbers_agree_with_the_cpp_header():
    header = (P.__file__.rsplit("fused_vae", 1)[0] + "csrc/include/fused_vae/elementwise.h").replace("\\", "/")
    text = open(header).read()
    names = {"kReduceSkip": P.REDUCE_SKIP, "kReduceElementwise": P.REDUCE_ELEMENTWISE,
             "kReducePerSample": P.REDUCE_PER_SAMPLE, "kReduceSum": P.REDUCE_SUM, "kReduceBatchMean": P.REDUCE_BATCHMEAN,
             "kLogqSkip": P.LOGQ_SKIP, "kLogqDensity": P.LOGQ_DENSITY, "kLogqRatio": P.LOGQ_RATIO,
             "kLogqDensityPath": P.LOGQ_DENSITY_PATH, "kLogqRatioPath": P.LOGQ_RATIO_PATH}  # fmt: skip
    for cname, value in names.items():
        assert f"{cname} = {value}," in text


def fwd_cases(device):
    """(op, forward arguments, exception, message) of mistakes every backend refuses alike."""
    mu, lv = make_inputs((4, 3), torch.float32, device, seed=1)
    seed = torch.tensor(3, device=device)
    R = "reparam_kl"

    def rp(m=mu, v=lv, pm=None, pv=None, s=seed, n=1, kl=4, lq=0):
        return (m, v, pm, pv, s, n, kl, lq, None, None)

    return [
        (R, rp(m=mu[0, 0], v=lv[0, 0]), ValueError, "fused_vae: mu must be at least 1-D, got 0-D"),
        (R, rp(v=lv[:2]), ValueError, r"fused_vae: logvar shape \[2, 3\] must equal mu shape \[4, 3\]"),
        (R, rp(m=mu.long(), v=lv.long()), TypeError,
         "fused_vae: mu must be float32, float64, float16 or bfloat16, got torch.int64"),
        (R, rp(v=lv.double()), TypeError, "fused_vae: logvar dtype torch.float64 must equal mu dtype torch.float32"),
        (R, rp(s=torch.tensor(1.0, device=device)), TypeError, "fused_vae: seed must be a one-element int64 tensor"),
        (R, rp(s=torch.tensor([1, 2], device=device)), TypeError, "fused_vae: seed must be a one-element int64 tensor"),
        (R, rp(s=torch.tensor(1, device="meta")), ValueError, f"fused_vae: seed is on meta but mu is on {device}"),
        (R, rp(n=-1), ValueError, "fused_vae: num_samples must be >= 0, got -1"),
        (R, rp(kl=9), ValueError, r"fused_vae: kl_mode must be in \[0, 4\], got 9"),
        (R, rp(lq=5), ValueError, r"fused_vae: logq_mode must be in \[0, 4\], got 5"),
        (R, rp(n=0, lq=2), ValueError, "fused_vae: logq_mode needs num_samples >= 1"),
        (R, rp(pm=mu[:1], pv=lv), ValueError, r"fused_vae: prior_mu shape \[1, 3\] must equal mu shape \[4, 3\]"),
        (R, rp(pm=mu, pv=lv.half()), TypeError,
         "fused_vae: prior_logvar dtype torch.float16 must equal mu dtype torch.float32"),
        (R, rp(pm=mu, pv=lv.to("meta")), ValueError, f"fused_vae: prior_logvar is on meta but mu is on {device}"),
        (R, rp(pm=mu), ValueError, "fused_vae: prior_mu and prior_logvar must be given together"),
        (R, rp(pv=lv), ValueError, "fused_vae: prior_mu and prior_logvar must be given together"),
        ("gaussian_log_prob", (mu, mu, lv, 0, None, None), ValueError, r"fused_vae: reduction must be in \[1, 4\], got 0"),
        ("gaussian_log_prob", (mu, lv[:1], lv, 2, None, None), ValueError,
         r"fused_vae: mu shape \[1, 3\] must equal x shape \[4, 3\]"),
        ("gaussian_log_prob", (mu, mu, lv.double(), 2, None, None), TypeError,
         "fused_vae: logvar dtype torch.float64 must equal x dtype torch.float32"),
        ("gaussian_log_prob", (mu[0, 0], mu[0, 0], lv[0, 0], 2, None, None), ValueError,
         "fused_vae: x must be at least 1-D, got 0-D"),
    ]  # fmt: skip


def bwd_cases(device):
    """(op, backward arguments, exception, message)."""
    mu, lv = make_inputs((4, 3), torch.float32, device, seed=2)
    seed = torch.tensor(3, device=device)
    gz = torch.ones(1, 4, 3, device=device)
    R = "reparam_kl"

    def rp(gz=None, gkl=None, glq=None, n=1, kl=4, lq=0):
        return (gz, gkl, glq, mu, lv, None, None, seed, n, kl, lq, None, None)

    return [
        (R, rp(gz=gz, n=0), ValueError, "fused_vae: grad_z given but num_samples is 0"),
        (R, rp(gz=gz[:, :2]), ValueError, "fused_vae: grad_z must have 12 elements, got 6"),
        (R, rp(gz=gz.double()), TypeError, "fused_vae: grad_z dtype torch.float64 must be torch.float32"),
        (R, rp(gkl=torch.ones(4, device=device), kl=0), ValueError, "fused_vae: grad_kl given but kl_mode is 0"),
        (R, rp(gkl=torch.ones(5, device=device), kl=2), ValueError, "fused_vae: grad_kl must have 4 elements, got 5"),
        (R, rp(gkl=torch.ones(4, device=device, dtype=torch.float64), kl=2), TypeError,
         "fused_vae: grad_kl dtype torch.float64 must be torch.float32"),
        (R, rp(gkl=torch.ones((), device=device, dtype=torch.float16)), TypeError,
         "fused_vae: grad_kl dtype torch.float16 must be torch.float32"),
        (R, rp(gkl=torch.ones(4, 3, device=device, dtype=torch.float64), kl=1), TypeError,
         "fused_vae: grad_kl dtype torch.float64 must be torch.float32"),
        (R, rp(glq=torch.ones(1, 4, device=device)), ValueError, "fused_vae: grad_logq given but logq_mode is 0"),
        (R, rp(glq=torch.ones(2, 4, device=device), lq=2), ValueError, "fused_vae: grad_logq must have 4 elements, got 8"),
        (R, rp(glq=torch.ones(1, 4, device=device, dtype=torch.float16), lq=1), TypeError,
         "fused_vae: grad_logq dtype torch.float16 must be torch.float32"),
        (R, rp(glq=torch.ones(1, 4, device="meta"), lq=1), ValueError,
         f"fused_vae: grad_logq is on meta but mu is on {device}"),
        ("gaussian_log_prob", (torch.ones(5, device=device), mu, mu, lv, 2, None, None), ValueError,
         "fused_vae: grad_log_prob must have 4 elements, got 5"),
        ("gaussian_log_prob", (torch.ones(4, 3, device=device, dtype=torch.float64), mu, mu, lv, 1, None, None),
         TypeError, "fused_vae: grad_log_prob dtype torch.float64 must be torch.float32"),
    ]  # fmt: skip


N_FWD, N_BWD = len(fwd_cases("cpu")), len(bwd_cases("cpu"))


@pytest.mark.parametrize("case", range(N_FWD))
def test_forward_op_errors_are_the_same_on_every_backend(backend, case):
    op, args, exc, msg = fwd_cases(backend[1])[case]
    fwd, _ = backend_ops(backend, op)
    with pytest.raises(exc, match="^" + msg):
        fwd(*args)


@pytest.mark.parametrize("case", range(N_BWD))
def test_backward_op_errors_are_the_same_on_every_backend(op_backend, case):
    op, args, exc, msg = bwd_cases(op_backend[1])[case]
    _, bwd = backend_ops(op_backend, op)
    with pytest.raises(exc, match="^" + msg):
        bwd(*args)


def test_python_checks_match_the_messages_above():
    """protocol.py's checks (the Triton and reference ops') give the table's texts too."""
    for op, args, exc, msg in fwd_cases("cpu"):
        spec = P.OPS[op]
        with pytest.raises(exc, match="^" + msg):
            spec.check_fwd_args(*spec.split(args))
    for op, args, exc, msg in bwd_cases("cpu"):
        spec = P.OPS[op]
        n = len(spec.outputs)
        with pytest.raises(exc, match="^" + msg):
            spec.check_bwd_args(args[:n], *spec.split(args[n:]))


@pytest.mark.parametrize("shape", [(4, 3), (0, 3), (2, 0)])
def test_backward_without_incoming_gradients_is_zero(op_backend, shape):
    device = op_backend[1]
    mu, lv = make_inputs(shape, torch.float32, device, seed=3)
    seed = torch.tensor(1, device=device)
    _, bwd = backend_ops(op_backend)
    for prior in ((None, None), (mu, lv)):
        grads = bwd(None, None, None, mu, lv, *prior, seed, 2, 3, 2, None, None)
        for g, given in zip(grads, (mu, lv, *prior)):
            assert g.shape == (mu.shape if given is not None else (0,)) and g.is_contiguous()
            assert not g.any()
    _, bwd = backend_ops(op_backend, "gaussian_log_prob")
    for g in bwd(None, mu, mu, lv, 2, None, None):
        assert g.shape == mu.shape and g.is_contiguous() and not g.any()


@pytest.mark.parametrize("kl_mode", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("num_samples", [0, 1, 3])
def test_outputs_follow_the_protocol_allocation(backend, kl_mode, num_samples):
    fwd, _ = backend_ops(backend)
    device = backend[1]
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        mu, lv = make_inputs((3, 2, 2), dtype, device, seed=4)
        for prior, logq_mode in (((None, None), 0), ((mu, lv), 2 if num_samples else 0)):
            args = (mu, lv, *prior, torch.tensor(5, device=device), num_samples, kl_mode, logq_mode, None, None)
            outs = fwd(*args)
            want = P.REPARAM.alloc(*P.REPARAM.split(args))
            assert [(o.shape, o.dtype) for o in outs] == [(w.shape, w.dtype) for w in want]


@pytest.mark.parametrize("reduction", [1, 2, 3, 4])
def test_log_prob_outputs_follow_the_protocol_allocation(backend, reduction):
    fwd, _ = backend_ops(backend, "gaussian_log_prob")
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x, mu = make_inputs((3, 2, 2), dtype, backend[1], seed=5)
        args = (x, mu, mu, reduction, None, None)
        out = fwd(*args)
        (want,) = P.LOG_PROB.alloc(*P.LOG_PROB.split(args))
        assert (out.shape, out.dtype) == (want.shape, want.dtype)


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

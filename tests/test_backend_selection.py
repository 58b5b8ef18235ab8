"""Backend choice: automatic order, FUSED_VAE_BACKEND, explicit argument, fallback."""

from __future__ import annotations

import pytest
import torch

import fused_vae as fv
from helpers import run_python
from fused_vae import backends


def test_available_backends_reports_every_backend():
    info = fv.available_backends()
    assert set(info) == {"reference", "cpu", "cuda", "triton"}
    assert info["reference"].available and "cpu" in info["reference"].devices
    for name, entry in info.items():
        assert entry.available == bool(entry.devices)
        if not entry.available:
            assert isinstance(entry.reason, str) and entry.reason, f"{name} must say why it is unavailable"
        else:
            assert entry.reason is None
    if not torch.cuda.is_available():
        assert info["cuda"].reason == "no CUDA device is available"


def test_automatic_choice_for_cpu_tensors():
    expected = "cpu" if fv.available_backends()["cpu"].available else "reference"
    assert backends.resolve(None, torch.device("cpu")).name == expected


def test_environment_variable_overrides_automatic_choice(monkeypatch):
    monkeypatch.setenv("FUSED_VAE_BACKEND", "reference")
    assert backends.resolve(None, torch.device("cpu")).name == "reference"
    monkeypatch.setenv("FUSED_VAE_BACKEND", "auto")
    assert backends.resolve(None, torch.device("cpu")).name != "triton"
    monkeypatch.setenv("FUSED_VAE_BACKEND", "reference")
    if fv.available_backends()["cpu"].available:
        assert backends.resolve("cpu", torch.device("cpu")).name == "cpu", "the argument wins"


def test_environment_variable_errors(monkeypatch):
    monkeypatch.setenv("FUSED_VAE_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"the FUSED_VAE_BACKEND environment variable must be one of"):
        fv.reparameterize(torch.randn(2, 2), torch.randn(2, 2))
    monkeypatch.setenv("FUSED_VAE_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"FUSED_VAE_BACKEND=cuda: backend 'cuda' is not available for cpu tensors"):
        fv.reparameterize(torch.randn(2, 2), torch.randn(2, 2))


def test_meta_tensors_use_reference_shapes():
    mu = torch.empty(3, 4, device="meta")
    z, kl = fv.reparameterize_kl(mu, mu, reduction="per_sample", backend="reference")
    assert z.shape == (3, 4) and kl.shape == (3,)



def test_fallback_to_reference_warns_once_when_extension_unavailable():
    proc = run_python(
        """
        import warnings, torch, fused_vae as fv
        info = fv.available_backends()
        assert not info["cpu"].available
        assert "FUSED_VAE_DISABLE_EXTENSION" in info["cpu"].reason, info["cpu"].reason
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            z, kl = fv.reparameterize_kl(torch.randn(4, 3), torch.randn(4, 3), seed=1)
            fv.reparameterize_kl(torch.randn(4, 3), torch.randn(4, 3), seed=1)
        msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]
        assert len(msgs) == 1 and "reference backend" in msgs[0] and "'cpu' is unavailable" in msgs[0], msgs
        try:
            fv.reparameterize(torch.randn(2), torch.randn(2), backend="cpu")
        except ValueError as e:
            assert "not available" in str(e) and "FUSED_VAE_DISABLE_EXTENSION" in str(e)
        else:
            raise AssertionError("expected ValueError")
        print("ok")
        """,
        FUSED_VAE_DISABLE_EXTENSION="1",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_import_without_triton():
    """The package imports and runs when triton cannot be imported."""
    proc = run_python(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch, fused_vae as fv
        info = fv.available_backends()["triton"]
        assert not info.available and "triton" in info.reason.lower(), info
        print(fv.reparameterize(torch.zeros(3), torch.zeros(3), seed=0, backend="reference").shape)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "torch.Size([3])" in proc.stdout

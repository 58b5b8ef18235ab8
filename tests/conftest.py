"""Fixtures and hooks: the test devices, the (backend, device) pairs to test, hypothesis's
profile. The helpers the test modules import are in tests/helpers.py."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# The value FUSED_VAE_CUDA_EMULATE takes in the tests that ask for the emulated device:
# the run's own value (default "1"; "0" turns the emulated device off).
_EMULATE = pytest.StashKey[str]()


def pytest_configure(config):
    """Chooses the test devices before any test module is imported."""
    from fused_vae.backends import cuda_emulation

    # Triton kernels run on CPU tensors only through its interpreter, which must be
    # chosen before triton decorates a kernel (test modules import triton when collected).
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # The emulated CUDA device (fused_vae/backends/cuda_emulation.py) is a test device:
    # only tests that ask for the `cuda_emulation` fixture see it; the others see the
    # package's default (no "cuda" backend for CPU tensors).
    config.stash[_EMULATE] = os.environ.pop(cuda_emulation.ENV_VAR, "1")
    # The `backend` fixture is a constant (name, device) pair, safe to share across examples.
    settings.register_profile(
        "fused_vae", deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], print_blob=True
    )
    settings.load_profile("fused_vae")


def pytest_collection_finish(session):
    """Lets each selected test module start its slow preparation (a module function
    ``start_in_background``, e.g. test_cuda_build.py's nvcc compiles) before the first
    test runs, so that it overlaps the tests before that module's."""
    if session.config.option.collectonly:
        return
    for module in {item.module for item in session.items if getattr(item, "module", None) is not None}:
        start = getattr(module, "start_in_background", None)
        if start is not None:
            start()


@pytest.fixture
def cuda_emulation(request, monkeypatch):
    """Turns the emulated CUDA device on for one test: the CUDA kernels, compiled as host
    C++, run on CPU tensors as the ("cuda", "cpu") backend case and the
    ``fused_vae::cuda_emu_reparam_kl_*`` ops. Returns whether it is on (a run with
    FUSED_VAE_CUDA_EMULATE=0 turns it off)."""
    from fused_vae.backends import cuda_emulation as emu

    monkeypatch.setenv(emu.ENV_VAR, request.config.stash[_EMULATE])
    return emu.enabled()


def _backend_cases(config):
    """Every (backend, device) pair usable here, with the emulated CUDA device on."""
    import fused_vae as fv
    from fused_vae.backends import cuda_emulation as emu

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(emu.ENV_VAR, config.stash[_EMULATE])
        backends = fv.available_backends()
    cases = []
    for name, info in backends.items():
        for device in info.devices:
            marks = [pytest.mark.slow] if (name in ("triton", "cuda") and device == "cpu") else []
            cases.append(pytest.param((name, device), id=f"{name}-{device}", marks=marks))
    return cases


def pytest_generate_tests(metafunc):
    """Parametrises the `backend` fixture over :func:`_backend_cases` (computed at
    collection, after pytest_configure has chosen the devices)."""
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", _backend_cases(metafunc.config), indirect=True)
    if "op_backend" in metafunc.fixturenames:
        cases = [c for c in _backend_cases(metafunc.config) if c.values[0][0] != "reference"]
        metafunc.parametrize("op_backend", cases, indirect=True)


@pytest.fixture
def backend(request, cuda_emulation):
    """(backend name, device string) for every backend usable on this machine, the
    emulated CUDA device ("cuda", "cpu") included."""
    return request.param


@pytest.fixture
def op_backend(request, cuda_emulation):
    """Like `backend`, for the backends with a torch.library op pair (all but the reference)."""
    return request.param

"""What a newcomer sees of the C++ extension: build messages, failure causes, the fallback warning."""

from __future__ import annotations

from pathlib import Path

import pytest

import fused_vae as fv
from helpers import run_python
from fused_vae.backends import build



def test_failure_cause_keeps_the_reason_not_the_command_line():
    log = (
        "Error building extension 'fused_vae_ext_cpu': [1/3] c++ -MMD -MF ops.o.d -DTORCH_EXTENSION_NAME="
        + "x" * 500
        + "\n/bin/sh: 1: c++: not found\nninja: build stopped: subcommand failed.\n"
    )
    cause = build.failure_cause(RuntimeError(log))
    assert "c++: not found" in cause
    assert "-DTORCH_EXTENSION_NAME" not in cause
    assert len(cause) < 400


def test_warm_cache_prints_no_build_message():
    if not fv.available_backends()["cpu"].available:
        pytest.skip("the C++ extension is not available here")
    proc = run_python("import fused_vae as fv; print(fv.available_backends()['cpu'].available)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"
    assert "building the C++ extension" not in proc.stderr


def test_failed_build_reports_the_compiler_error(tmp_path):
    """A build with a missing compiler says so, and how to see the whole log."""
    proc = run_python(
        """
        import fused_vae as fv
        print(fv.available_backends()["cpu"].reason)
        """,
        TORCH_EXTENSIONS_DIR=str(tmp_path),
        CXX=str(tmp_path / "no-such-compiler"),
    )
    assert proc.returncode == 0, proc.stderr
    reason = proc.stdout.strip()
    assert "could not be built or loaded" in reason
    assert "FUSED_VAE_VERBOSE_BUILD=1" in reason
    assert "no-such-compiler" in reason or "not found" in reason.lower() or "No such file" in reason, reason
    assert len(reason) < 800


def test_fallback_warning_points_at_the_callers_line():
    proc = run_python(
        """
        import warnings, torch, fused_vae as fv
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            fv.reparameterize_kl(torch.randn(4, 3), torch.randn(4, 3), seed=1)  # line 5 (the code starts with a newline)
        [msg] = [x for x in w if issubclass(x.category, RuntimeWarning)]
        print(msg.filename, msg.lineno)
        """,
        FUSED_VAE_DISABLE_EXTENSION="1",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["<string>", "5"]


SETUP = Path(build.__file__).resolve().parents[2] / "setup.py"
# setup.py up to its setup() call, then what it would build: [[sources of each extension]].
SETUP_EXTENSIONS = f"""
src = open({str(SETUP)!r}).read().split("ext_modules, cmdclass = extension_modules()")[0]
ns = {{"__file__": {str(SETUP)!r}, "__name__": "setup"}}
exec(src, ns)
print([ext.sources for ext in ns["extension_modules"]()[0]])
"""


def test_setup_builds_from_build_py_and_nothing_without_torch():
    proc = run_python(SETUP_EXTENSIONS)
    assert proc.returncode == 0, proc.stderr
    [sources] = eval(proc.stdout)
    root = SETUP.parent
    cpu_sources = [str(p.relative_to(root)) for p in build.sources(False, root / "csrc")]
    assert sources[: len(cpu_sources)] == cpu_sources
    # An isolated build environment has no torch: setup.py reads build.py without it.
    proc = run_python("import sys; sys.modules['torch'] = None\n" + SETUP_EXTENSIONS)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_one_switch_skips_building_and_loading_the_old_name_warns():
    proc = run_python(SETUP_EXTENSIONS, FUSED_VAE_DISABLE_EXTENSION="1")
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr
    proc = run_python(SETUP_EXTENSIONS, FUSED_VAE_NO_EXTENSION="1")
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr
    assert "FutureWarning: FUSED_VAE_NO_EXTENSION=1 is deprecated; set FUSED_VAE_DISABLE_EXTENSION=1" in proc.stderr

"""The training process's allocator settings: freed memory reused, the user's settings kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fused_vae.training.allocator import glibc_malloc, user_chose_allocator

REPO = Path(__file__).resolve().parents[1]

# A step's worth of activations: 96 tensors of 1 MiB allocated, used and freed together; prints
# the page faults per step after the first 3 steps. Without keep_freed_memory() glibc returns them
# to the system after most such steps (about 24,500 faults a step on the 2-core VM, 9x the step's
# time), but not after all: whether a small block was placed above them, which keeps the heap's top
# in use, varies from run to run.
STEPS = """
import resource, sys, torch
from fused_vae.training import keep_freed_memory
assert keep_freed_memory()
def step():
    activations = [torch.ones(1 << 18) for _ in range(96)]
    del activations
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8)
"""


def _faults_per_step() -> float:
    clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    done = subprocess.run([sys.executable, "-c", STEPS], capture_output=True, text=True, cwd=REPO,
                          env={**clean, "PYTHONPATH": str(REPO)}, timeout=300)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not glibc_malloc(), reason="glibc's malloc only")
def test_training_steps_reuse_freed_memory():
    assert _faults_per_step() < 1


def test_the_users_allocator_settings_are_left_alone():
    assert user_chose_allocator({}) is None
    assert user_chose_allocator({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"}) is None
    assert user_chose_allocator({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}) == "GLIBC_TUNABLES sets malloc"
    assert user_chose_allocator({"MALLOC_TRIM_THRESHOLD_": "1"}) == "MALLOC_* variables set malloc"
    assert user_chose_allocator({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) == "LD_PRELOAD loads another allocator"
    code = "from fused_vae.training import keep_freed_memory; print(keep_freed_memory())"
    for env in ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=100000"}, {"MALLOC_MMAP_THRESHOLD_": "65536"}):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO), **env}, timeout=120)
        assert done.returncode == 0 and done.stdout.strip() == "False", (env, done.stdout, done.stderr)

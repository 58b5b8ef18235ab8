"""Compiles every CUDA source with nvcc for sm_80 and sm_90 (no GPU needed).

The kernels (csrc/cuda/*.cu that include no torch header) are compiled with only the
CUDA toolkit and csrc/include, with warnings as errors: this is the real device-code
compile of every kernel instance. Sources that include torch headers (the ATen glue)
are compiled against the installed torch's headers; a CPU-only torch wheel lacks
c10/cuda/impl/cuda_cmake_macros.h (a generated header of export macros), which
-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE skips. The objects are then linked into one shared
object to catch duplicate symbols (e.g. a second TORCH_LIBRARY_IMPL or a kernel
instantiated twice). Each source is compiled once, for both architectures (one host
compile, one device compile per architecture); the compiles run in parallel.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CUDA_DIR = CSRC / "cuda"
ARCHS = ("80", "90")
GENCODES = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
TORCH_INCLUDE = re.compile(r"^\s*#\s*include\s*[<\"](torch|ATen|c10)/", re.M)
# The defines torch's extension builds pass to nvcc (torch.utils.cpp_extension).
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]
COMMON = ["-std=c++17", "-DNDEBUG", "-lineinfo", *TORCH_NVCC_DEFINES, f"-I{CSRC / 'include'}"]
TIMEOUT_S = 600


def find_nvcc() -> str | None:
    for candidate in (
        shutil.which("nvcc"),
        os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc") if os.environ.get("CUDA_HOME") else None,
        "/usr/local/cuda/bin/nvcc",
    ):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


NVCC = find_nvcc()
SOURCES = sorted(CUDA_DIR.glob("*.cu"))
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")


def uses_torch(src: Path) -> bool:
    return bool(TORCH_INCLUDE.search(src.read_text()))


def torch_flags() -> list[str]:
    """Include paths and defines for sources that include torch headers."""
    import torch
    from torch.utils import cpp_extension

    flags = [f"-I{p}" for p in cpp_extension.include_paths()]
    flags.append(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
    torch_inc = Path(cpp_extension.include_paths()[0])
    if not (torch_inc / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file():
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")  # CPU-only wheel
    # Warnings of torch's own headers (e.g. C++20 features under -std=c++17) are not ours.
    flags += ["--expt-relaxed-constexpr", "-Xcudafe", "--diag_suppress=3306", "-w"]
    return flags


def compile_command(src: Path, out: Path) -> list[str]:
    cmd = [NVCC, *COMMON, *GENCODES, "-Xcompiler", "-fPIC"]
    if uses_torch(src):
        # Host glue without kernels: -O0 halves the host compile of torch's headers.
        cmd += ["-O0", *torch_flags()]
    else:
        cmd += ["-O3", "-Werror", "all-warnings"]  # the kernels as built, warning-free
    return [*cmd, "-c", str(src), "-o", str(out)]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Runs every source's compile in parallel; maps its name to (cmd, rc, log, obj)."""
    outdir = tmp_path_factory.mktemp("nvcc")
    jobs = {}
    for src in SOURCES:
        obj = outdir / f"{src.stem}.o"
        jobs[src.name] = (compile_command(src, obj), obj)

    def run(item):
        key, (cmd, obj) = item
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT)
        return key, (cmd, proc.returncode, proc.stdout + proc.stderr, obj)

    workers = max(2, min(len(jobs), os.cpu_count() or 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = dict(pool.map(run, jobs.items()))
    return results


def test_sources_present():
    names = {s.name for s in SOURCES}
    assert "kernels_instantiate.cu" in names and "reparam_kl_cuda.cu" in names, names
    # The kernels compile without torch: the nvcc check must never depend on torch headers.
    assert not uses_torch(CUDA_DIR / "kernels_instantiate.cu")
    assert not TORCH_INCLUDE.search((CUDA_DIR / "reparam_kl_kernels.cuh").read_text())
    assert not TORCH_INCLUDE.search((CUDA_DIR / "reparam_kl_launch.h").read_text())


def test_emulated_build_compiles_these_sources():
    # tests/test_cuda.py runs these files on the emulated device (as host C++), not copies of them.
    emulate = CSRC / "emulate"
    assert '#include "../cuda/kernels_instantiate.cu"' in (emulate / "emulated_kernels.cpp").read_text()
    assert '#include "../cuda/reparam_kl_cuda.cu"' in (emulate / "emulated_ops.cpp").read_text()
    assert not list(emulate.glob("*.cu*")), "the emulated build must not hold kernel code of its own"


def test_one_cuda_registration():
    impls = [s.name for s in SOURCES if re.search(r"TORCH_LIBRARY_IMPL\s*\(\s*fused_vae\s*,\s*CUDA", s.read_text())]
    assert impls == ["reparam_kl_cuda.cu"], impls


@pytest.mark.parametrize("source", [s.name for s in SOURCES])
def test_nvcc_compiles(compiled, source):
    cmd, rc, log, obj = compiled[source]
    assert rc == 0, f"nvcc failed ({rc}) for {source}:\n{' '.join(cmd)}\n{log[-6000:]}"
    assert obj.is_file() and obj.stat().st_size > 0


def test_objects_link_without_duplicates(compiled, tmp_path):
    objs = [compiled[s.name][3] for s in SOURCES]
    if not all(o.is_file() for o in objs):
        pytest.fail("a CUDA source failed to compile (see test_nvcc_compiles)")
    # Undefined torch symbols are fine in a shared object; duplicate definitions are not.
    out = tmp_path / "fused_vae_cuda.so"
    proc = subprocess.run(
        [NVCC, "-shared", *GENCODES, *map(str, objs), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

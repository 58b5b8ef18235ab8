"""Compiles every CUDA source with nvcc for sm_80 and sm_90 (no GPU needed).

The kernels (csrc/cuda/*.cu that include no torch header) are compiled with only the
CUDA toolkit and csrc/include, with warnings as errors: this is the real device-code
compile of every kernel instance. Sources that include torch headers (the ATen glue)
are compiled against the installed torch's headers; a CPU-only torch wheel lacks
c10/cuda/impl/cuda_cmake_macros.h (a generated header of export macros), which
-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE skips. The objects are then linked into one shared
object to catch duplicate symbols (e.g. a second TORCH_LIBRARY_IMPL or a kernel
instantiated twice). Each source is compiled once, for both architectures (one host
compile, one device compile per architecture); the compiles run in parallel, in the
background from the end of collection on (see start_in_background).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import tempfile
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


# source name -> (command, process, log file, object), once started.
_JOBS: dict[str, tuple[list[str], subprocess.Popen, object, Path]] = {}


def start_in_background() -> None:
    """Starts every source's compile (once) without waiting for it. conftest's
    pytest_collection_finish calls this when a test of this module is selected, so the
    compiles (over a minute of host compile of torch's headers) run on the core that
    pytest leaves idle while the tests before these run."""
    if _JOBS or NVCC is None:
        return
    outdir = Path(tempfile.mkdtemp(prefix="fused_vae_nvcc_"))
    atexit.register(_stop, outdir)
    for src in SOURCES:
        obj = outdir / f"{src.stem}.o"
        cmd = compile_command(src, obj)
        log = open(outdir / f"{src.stem}.log", "w+")  # noqa: SIM115 (closed by _stop)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        _JOBS[src.name] = (cmd, proc, log, obj)


def _stop(outdir: Path) -> None:
    """Ends compiles still running at exit (nvcc and its children) and removes their files."""
    for _, proc, log, _ in _JOBS.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    shutil.rmtree(outdir, ignore_errors=True)


@pytest.fixture(scope="module")
def compiled():
    """Waits for every source's compile; maps its name to (cmd, rc, log, obj)."""
    start_in_background()
    results = {}
    for name, (cmd, proc, log, obj) in _JOBS.items():
        try:
            rc = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        log.seek(0)
        results[name] = (cmd, rc, log.read(), obj)
    return results


# The ATen glue of each op family (one TORCH_LIBRARY_IMPL each); the kernels are in the
# torch-free headers below, instantiated in kernels_instantiate.cu.
GLUE = ("log_prob_cuda.cu", "reparam_kl_cuda.cu")
KERNEL_HEADERS = ("kernel_common.cuh", "launch_common.h", "log_prob_kernels.cuh", "log_prob_launch.h",
                  "reparam_kl_kernels.cuh", "reparam_kl_launch.h")


def test_sources_present():
    names = {s.name for s in SOURCES}
    assert {"kernels_instantiate.cu", *GLUE} <= names, names
    # The kernels compile without torch: the nvcc check must never depend on torch headers.
    assert not uses_torch(CUDA_DIR / "kernels_instantiate.cu")
    for header in KERNEL_HEADERS:
        assert not TORCH_INCLUDE.search((CUDA_DIR / header).read_text()), header


def test_emulated_build_compiles_these_sources():
    # tests/test_cuda.py runs these files on the emulated device (as host C++), not copies of them.
    emulate = CSRC / "emulate"
    assert '#include "../cuda/kernels_instantiate.cu"' in (emulate / "emulated_kernels.cpp").read_text()
    ops = (emulate / "emulated_ops.cpp").read_text()
    for glue in GLUE:
        assert f'#include "../cuda/{glue}"' in ops, glue
    assert not list(emulate.glob("*.cu*")), "the emulated build must not hold kernel code of its own"


def test_one_cuda_registration_per_op_family():
    # Each family's glue registers its pair once (FV_CUDA_IMPL, cuda_glue.h, over the shared
    # FV_IMPL_OP_PAIR: for CUDA tensors, or on the emulated device as cuda_emu_*); nothing
    # else registers for CUDA.
    impls = [s.name for s in SOURCES if re.search(r"TORCH_LIBRARY_IMPL\s*\(\s*fused_vae\s*,\s*CUDA", s.read_text())]
    assert impls == [], impls
    glue_header = (CUDA_DIR / "cuda_glue.h").read_text()
    assert len(re.findall(r"FV_IMPL_OP_PAIR\(\s*CUDA\s*,", glue_header)) == 1
    assert len(re.findall(r"FV_IMPL_OP_PAIR\(\s*CPU\s*,\s*\"cuda_emu_\"", glue_header)) == 1
    registered = {g: re.findall(r"^FV_CUDA_IMPL\((\w+),", (CUDA_DIR / g).read_text(), re.M) for g in GLUE}
    assert registered == {"log_prob_cuda.cu": ["gaussian_log_prob"], "reparam_kl_cuda.cu": ["reparam_kl"]}, registered
    assert not [s.name for s in SOURCES if s.name not in GLUE and "FV_CUDA_IMPL(" in s.read_text()]


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

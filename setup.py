"""Builds the fused_vae C++ (and, where CUDA is present, CUDA) extension ahead of time.

torch is not a build requirement (an isolated build would download a CUDA wheel), so:
- ``pip install -e .`` (isolated build, no torch): pure-Python install; the extension is
  JIT-built with ninja on first use and cached.
- ``pip install --no-build-isolation -e .`` on a machine with torch: builds
  ``fused_vae._C`` now, with CUDA kernels when a CUDA toolkit is found
  (``TORCH_CUDA_ARCH_LIST`` defaults to "8.0;9.0+PTX"; ``MAX_JOBS`` limits parallelism).
  ``FUSED_VAE_NO_EXTENSION=1`` skips the build.
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package (fused_vae/_csrc) so a wheel can JIT-build too."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "fused_vae" / "_csrc"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(CSRC, target)


def extension_modules():
    if os.environ.get("FUSED_VAE_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError:
        return [], {}
    sources = [str(p.relative_to(ROOT)) for p in [CSRC / "ops.cpp", CSRC / "autograd.cpp", *sorted((CSRC / "cpu").glob("*.cpp"))]]
    cuda_sources = [str(p.relative_to(ROOT)) for p in sorted((CSRC / "cuda").glob("*.cu"))]
    with_cuda = torch.version.cuda is not None and ce.CUDA_HOME is not None and bool(cuda_sources)
    args = {"cxx": ["-O3", "-DNDEBUG", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]}
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        args["nvcc"] = ["-O3", "-DNDEBUG", "-lineinfo"]  # no --use_fast_math: see fused_vae/backends/build.py
        ext = ce.CUDAExtension(
            "fused_vae._C", sources + cuda_sources, include_dirs=[str(CSRC / "include")], extra_compile_args=args,
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = ce.CppExtension(
            "fused_vae._C", sources, include_dirs=[str(CSRC / "include")], extra_compile_args=args,
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": ce.BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = extension_modules()
cmdclass["build_py"] = BuildPyWithSources
setup(ext_modules=ext_modules, cmdclass=cmdclass)

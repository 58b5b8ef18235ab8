"""Builds the fused_vae C++ (and, where CUDA is present, CUDA) extension ahead of time.

torch is not a build requirement (an isolated build would download a CUDA wheel), so:
- ``pip install -e .`` (isolated build, no torch): pure-Python install; the extension is
  JIT-built with ninja on first use and cached.
- ``pip install --no-build-isolation -e .`` on a machine with torch: builds
  ``fused_vae._C`` now, with CUDA kernels when a CUDA toolkit is found
  (``TORCH_CUDA_ARCH_LIST`` defaults to "8.0;9.0+PTX"; ``MAX_JOBS`` limits parallelism).
  ``FUSED_VAE_DISABLE_EXTENSION=1`` skips the build.

Sources, flags and switches are those of the JIT build: fused_vae/backends/build.py,
loaded here by path so that neither the package nor torch is imported to read them.
"""

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _load_build_settings():
    path = ROOT / "fused_vae" / "backends" / "build.py"
    spec = importlib.util.spec_from_file_location("fused_vae_build_settings", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package (fused_vae/_csrc) so a wheel can JIT-build too."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "fused_vae" / "_csrc"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(CSRC, target)


def extension_modules():
    build = _load_build_settings()
    if build.disabled(building=True):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError:
        return [], {}
    with_cuda = torch.version.cuda is not None and ce.CUDA_HOME is not None
    sources = [str(p.relative_to(ROOT)) for p in build.sources(with_cuda, CSRC)]
    args = {"cxx": build.CXX_FLAGS}
    kind = ce.CppExtension
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        args["nvcc"] = build.NVCC_FLAGS
        kind = ce.CUDAExtension
    ext = kind(
        "fused_vae._C", sources, include_dirs=[str(build.include_dir(CSRC))], extra_compile_args=args,
        extra_link_args=build.LD_FLAGS,
    )
    return [ext], {"build_ext": ce.BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = extension_modules()
cmdclass["build_py"] = BuildPyWithSources
setup(ext_modules=ext_modules, cmdclass=cmdclass)

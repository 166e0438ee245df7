"""Build `moca._C` from csrc/: the C++ host ops always, the CUDA ops when torch has CUDA.

`pip install --no-build-isolation .` (torch already installed) so the extension is
compiled against the torch that will load it. MOCA_SKIP_CUDA=1 skips the CUDA sources.
"""

import glob
import os
import shutil

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _with_cuda() -> bool:
    if os.environ.get("MOCA_SKIP_CUDA", "0") == "1":
        return False
    return torch.version.cuda is not None and (shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME"))


def extension():
    cpp = sorted(glob.glob("csrc/*.cpp"))
    cxx_flags = ["-O3", "-std=c++20"]
    if _with_cuda():
        cu = sorted(glob.glob("csrc/cuda/*.cu"))
        return CUDAExtension(
            "moca._C",
            cpp + cu,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("MOCA_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]},
        )
    return CppExtension(
        "moca._C", cpp, include_dirs=[os.path.join(ROOT, "csrc")], extra_compile_args={"cxx": cxx_flags}
    )


setup(
    packages=find_packages(include=["kernels", "kernels.*", "moca", "moca.*", "engine", "engine.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

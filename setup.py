"""Build dinocxr_fast and its extension dinocxr_fast._C (pybind11 through torch.utils.cpp_extension).
The package's metadata and dependencies are in pyproject.toml; this file only builds.

    pip install -e . --no-build-isolation        # CPU ops always; CUDA ops when torch has CUDA and nvcc exists
    DINOCXR_CUDA=1 pip install ...                # require the CUDA build (fails clearly if impossible)
    DINOCXR_CUDA=0 pip install ...                # never build CUDA
    DINOCXR_CUDA_ARCHS="80;90a"                   # GPU architectures (default: 80 and 90a)

Build with --no-build-isolation: an isolated build would download another torch.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def fail(message: str) -> None:
    sys.stderr.write(f"\ndinocxr_fast build error: {message}\n\n")
    raise SystemExit(1)


try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    fail(
        "PyTorch is not importable. Install it first (e.g. `pip install torch`), then build with "
        "`pip install -e . --no-build-isolation` so the build sees that torch."
    )


def find_cxx() -> str | None:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate.split()[0]):
            return candidate
    return None


def want_cuda() -> bool:
    flag = os.environ.get("DINOCXR_CUDA", "").strip()
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    if flag == "0":
        return False
    if flag == "1":
        if torch.version.cuda is None:
            fail(f"DINOCXR_CUDA=1 but this torch ({torch.__version__}) is a CPU build; install a CUDA build of torch.")
        if not nvcc:
            fail("DINOCXR_CUDA=1 but nvcc was not found; put the CUDA toolkit's bin on PATH or set CUDA_HOME.")
        return True
    if flag:
        fail(f"DINOCXR_CUDA must be 0 or 1, got {flag!r}")
    return torch.version.cuda is not None and bool(nvcc)


def cuda_arch_flags() -> list[str]:
    archs = os.environ.get("DINOCXR_CUDA_ARCHS", "80;90a").replace(",", ";").split(";")
    flags = []
    for arch in filter(None, (a.strip() for a in archs)):
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def extension():
    if find_cxx() is None:
        fail("no C++ compiler found (tried $CXX, c++, g++, clang++); install one, e.g. `apt-get install g++`.")
    # csrc/*.cpp: bindings and what the CPU and CUDA ops share; csrc/cpu: the CPU ops and kernels;
    # csrc/cuda: the CUDA ops (host code); kernels/cuda: the CUDA kernels and their launchers.
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # Headers are included by name from these folders (scripts/cuda_compile_check.sh uses the same).
    include_dirs = [os.path.join(ROOT, "csrc")]
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("kernels/cuda/*.cu"))
        include_dirs.append(os.path.join(ROOT, "kernels", "cuda"))
        nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"] + cuda_arch_flags()
        return CUDAExtension(
            "dinocxr_fast._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("DINOCXR_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    return CppExtension("dinocxr_fast._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags},
                        extra_link_args=link_flags)


# The wheel is the dinocxr_fast package (its Triton kernels in dinocxr_fast/ops/triton included) and
# _C. The CUDA sources in kernels/cuda are compiled into _C and not shipped: nothing reads them at run time.
setup(
    packages=find_packages(include=["dinocxr_fast", "dinocxr_fast.*"]),
    package_data={"dinocxr_fast": ["configs/*.yaml"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
    zip_safe=False,
)

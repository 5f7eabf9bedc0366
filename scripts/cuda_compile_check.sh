#!/usr/bin/env bash
# Compile checks of the CUDA build, with no GPU and no CUDA build of torch:
#  1. device code: every kernels/cuda/*.cu with nvcc for sm_80 and sm_90a (compile only), the same
#     check as the CMake target cuda_compile_check;
#  2. host code: every csrc/**/*.cpp with the host compiler as the CUDA build compiles it
#     (-DDINOCXR_WITH_CUDA, torch's and the toolkit's headers); a CPU build of torch never compiles
#     the CUDA half of csrc, this does;
#  3. the project's own symbols: every dinocxr:: function the host objects call is defined in one of
#     the objects of 1 and 2 (the link step itself needs torch's CUDA libraries, absent here).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "cuda_compile_check: nvcc not found; skipped" >&2
  exit 0
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
archs=${DINOCXR_CUDA_ARCHS:-"80;90a"}
gencode=()
for arch in ${archs//;/ }; do gencode+=(-gencode "arch=compute_${arch},code=sm_${arch}"); done
n=0
for src in kernels/cuda/*.cu; do
  echo "nvcc -c $src (${archs})"
  "$NVCC" -O3 -std=c++17 --expt-relaxed-constexpr -Werror all-warnings "${gencode[@]}" -c "$src" -o "$out/$(basename "$src").o"
  n=$((n + 1))
done
echo "cuda_compile_check: $n file(s) compiled for ${archs}"

# ---- 2. host code of the CUDA build ----------------------------------------------------------------
# The project's venv when there is one (CI makes it first), else the python on PATH.
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! torch_flag_lines=$("$PYTHON" - <<'EOF'
import sysconfig

import torch
from torch.utils.cpp_extension import include_paths

# What torch.utils.cpp_extension gives the host compiler for a CUDAExtension (setup.py).
flags = [f"-isystem{p}" for p in include_paths()] + [f"-isystem{sysconfig.get_paths()['include']}"]
flags += ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
          f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
print("\n".join(flags))
EOF
); then
  echo "cuda_compile_check: torch is not importable by $PYTHON; host code not checked" >&2
  exit 0
fi
# The toolkit's root as nvcc itself resolves it (nvcc may be a wrapper script outside the toolkit).
cuda_home=${CUDA_HOME:-$("$NVCC" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p')}
if [[ ! -f $cuda_home/include/cuda_runtime.h ]]; then
  echo "cuda_compile_check: no cuda_runtime.h under '$cuda_home/include' (set CUDA_HOME)" >&2
  exit 1
fi
CXX=${CXX:-c++}
# A CPU wheel of torch ships the c10/cuda headers but not the generated c10/cuda/impl/cuda_cmake_macros.h,
# whose one macro (C10_CUDA_BUILD_SHARED_LIBS) only matters on Windows: skip its include.
mapfile -t torch_flags <<<"$torch_flag_lines"
# -I: the include folders of setup.py's CUDA build.
host_flags=(-c -O0 -std=c++17 -fopenmp -Wall -Werror -DDINOCXR_WITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE
            -Icsrc -Ikernels/cuda "${torch_flags[@]}" "-isystem$cuda_home/include")
mkdir -p "$out/host"
n=0
while IFS= read -r -d '' src; do
  echo "$CXX -c -DDINOCXR_WITH_CUDA $src"
  "$CXX" "${host_flags[@]}" "$src" -o "$out/host/$(echo "${src%.cpp}" | tr / _).o"
  n=$((n + 1))
done < <(find csrc -name '*.cpp' -print0 | sort -z)
echo "cuda_compile_check: $n host file(s) of the CUDA build compiled"

# ---- 3. symbols of namespace dinocxr used by the host objects and defined nowhere ------------------
undefined=$(comm -23 <(nm --undefined-only --format=just-symbols "$out"/host/*.o | grep '7dinocxr' | sort -u) \
                     <(nm --defined-only --format=just-symbols "$out"/*.o "$out"/host/*.o | sort -u))
if [[ -n $undefined ]]; then
  echo "cuda_compile_check: used by csrc but defined in no object of the CUDA build:" >&2
  echo "$undefined" | c++filt | sed 's/^/  /' >&2
  exit 1
fi
echo "cuda_compile_check: every dinocxr:: symbol the host objects use is defined"

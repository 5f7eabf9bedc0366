#!/usr/bin/env bash
# Compile every kernels/cuda/*.cu with nvcc for sm_80 and sm_90a (compile only: no GPU needed).
# Same check as the CMake target cuda_compile_check, without needing cmake.
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

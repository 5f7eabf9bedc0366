// Device-side pieces shared by the convolution kernels (direct, tensor-core, fused chain) and the
// BatchNorm helpers: activations and their derivatives, the prologue, the epilogue value, vector
// access of a runtime number of elements. Internal to kernels/cuda.
#pragma once

#include "common.cuh"
#include "conv3x3.cuh"

namespace dinocxr {
namespace cuda {
namespace detail {

__device__ __forceinline__ float sigmoid(float z) { return 1.f / (1.f + __expf(-z)); }
__device__ __forceinline__ float silu(float z) { return z * sigmoid(z); }
// d/dz z * sigmoid(z) = s + z s (1 - s)
__device__ __forceinline__ float silu_grad(float z) {
  const float s = sigmoid(z);
  return s * (1.f + z * (1.f - s));
}

// torch's default (erf) GELU.
__device__ __forceinline__ float gelu(float z) { return 0.5f * z * (1.f + erff(z * 0.70710678118654752f)); }
__device__ __forceinline__ float gelu_grad(float z) {
  const float cdf = 0.5f * (1.f + erff(z * 0.70710678118654752f));
  const float pdf = 0.39894228040143268f * __expf(-0.5f * z * z);
  return cdf + z * pdf;
}

__device__ __forceinline__ float activate(float z, Act act) {
  switch (act) {
    case Act::kSilu: return silu(z);
    case Act::kGelu: return gelu(z);
    case Act::kRelu: return fmaxf(z, 0.f);
    default: return z;
  }
}

__device__ __forceinline__ float activate_grad(float z, Act act) {
  switch (act) {
    case Act::kSilu: return silu_grad(z);
    case Act::kGelu: return gelu_grad(z);
    case Act::kRelu: return z > 0.f ? 1.f : 0.f;
    default: return 1.f;
  }
}

__device__ __forceinline__ float ld_or(const float* __restrict__ p, int i, float fallback) {
  return p == nullptr ? fallback : __ldg(p + i);
}

// The prologue for input channel c: silu(x * scale + shift), identity when there is none.
__device__ __forceinline__ float prologue_value(const Prologue& pro, int c, float x) {
  return pro.scale == nullptr ? x : silu(x * __ldg(pro.scale + c) + __ldg(pro.shift + c));
}

// ---- runtime-width vector access of T elements (width 1, 2, 4 or 8; host-checked alignment) --
// Loads n (1, 2, 4 or 8; 8 only for 2-byte types) elements into out[0..n); out stays in registers
// because every index is a compile-time constant after unrolling.
template <typename T>
__device__ __forceinline__ void load_n(const T* __restrict__ p, int n, float (&out)[8]) {
  if constexpr (sizeof(T) == 2) {
    if (n == 8) {
      float v[8];
      load_vec<T, 8>(p, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) out[i] = v[i];
      return;
    }
  }
  if (n == 4) {
    float v[4];
    load_vec<T, 4>(p, v);
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = v[i];
  } else if (n == 2) {
    float v[2];
    load_vec<T, 2>(p, v);
    out[0] = v[0], out[1] = v[1];
  } else {
    out[0] = to_float(p[0]);
  }
}

// Stores N consecutive elements; N * sizeof(T) <= 16 is one access, larger spans are 16-byte
// pieces. The caller guarantees alignment to min(16, N * sizeof(T)) bytes.
template <typename T, int N>
__device__ __forceinline__ void store_span(T* __restrict__ p, const float (&v)[N]) {
  constexpr int kPiece = (N * sizeof(T) <= 16) ? N : 16 / sizeof(T);
#pragma unroll
  for (int i = 0; i < N; i += kPiece) {
    float piece[kPiece];
#pragma unroll
    for (int j = 0; j < kPiece; ++j) piece[j] = v[i + j];
    store_vec<T, kPiece>(p + i, piece);
  }
}

template <typename T, int N>
__device__ __forceinline__ void load_span(const T* __restrict__ p, float (&v)[N]) {
  constexpr int kPiece = (N * sizeof(T) <= 16) ? N : 16 / sizeof(T);
#pragma unroll
  for (int i = 0; i < N; i += kPiece) {
    float piece[kPiece];
    load_vec<T, kPiece>(p + i, piece);
#pragma unroll
    for (int j = 0; j < kPiece; ++j) v[i + j] = piece[j];
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace dinocxr

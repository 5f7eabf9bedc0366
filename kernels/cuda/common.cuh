// Device helpers shared by the kernels in kernels/cuda: element conversions, vector loads and
// stores of VEC consecutive elements as one 4/8/16-byte access, warp reductions. Header-only,
// device code only; no torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dinocxr {
namespace cuda {
namespace detail {

// ---- element conversions --------------------------------------------------------------------
template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }

// Round a float to T and back: what a value looks like after it was stored as T.
template <typename T> __device__ __forceinline__ float round_to(float x) { return to_float(from_float<T>(x)); }

// ---- vector access: VEC consecutive elements of T as one access ------------------------------
// The caller guarantees alignment to sizeof(T) * VEC bytes (checked on the host).
template <int BYTES> struct RawVec;
template <> struct RawVec<2> { using type = uint16_t; };
template <> struct RawVec<4> { using type = uint32_t; };
template <> struct RawVec<8> { using type = uint2; };
template <> struct RawVec<16> { using type = uint4; };

template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&out)[VEC]) {
  using Raw = typename RawVec<sizeof(T) * VEC>::type;
  Pack<T, VEC> pack;
  *reinterpret_cast<Raw*>(&pack) = *reinterpret_cast<const Raw*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float(pack.v[i]);
}

// Streaming (evict-first) variant for data read once and never again through L2.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec_stream(const T* __restrict__ p, float (&out)[VEC]) {
  using Raw = typename RawVec<sizeof(T) * VEC>::type;
  Pack<T, VEC> pack;
  *reinterpret_cast<Raw*>(&pack) = __ldcs(reinterpret_cast<const Raw*>(p));
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float(pack.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const float (&in)[VEC]) {
  using Raw = typename RawVec<sizeof(T) * VEC>::type;
  Pack<T, VEC> pack;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pack.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Raw*>(p) = *reinterpret_cast<const Raw*>(&pack);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec_stream(T* __restrict__ p, const float (&in)[VEC]) {
  using Raw = typename RawVec<sizeof(T) * VEC>::type;
  Pack<T, VEC> pack;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pack.v[i] = from_float<T>(in[i]);
  __stcs(reinterpret_cast<Raw*>(p), *reinterpret_cast<const Raw*>(&pack));
}

// ---- reductions ------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ double warp_sum(double x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace detail
}  // namespace cuda
}  // namespace dinocxr

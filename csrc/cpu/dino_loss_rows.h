// Row kernels of the CPU DINO loss, shared by the portable and the AVX2 / AVX-512 implementations.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "dino_loss.h"

namespace dinocxr {
namespace cpu {

// Rows are processed in tiles small enough to stay in L1 between the max and the exp loop.
constexpr int64_t kTile = 1024;

inline float load(float x) { return x; }
inline double load(double x) { return x; }
inline float load(BFloat16Bits x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline void store(float* dst, float v) { *dst = v; }
inline void store(double* dst, double v) { *dst = v; }
inline void store(BFloat16Bits* dst, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even
  dst->bits = static_cast<uint16_t>(u >> 16);
}

// exp(x) = 2^n * exp(r), n = round(x / ln 2); Cephes' polynomial for exp(r), relative error
// below 2e-7; exp(x) = 0 below -87 (fp32 underflow). The AVX2 version mirrors it lane by lane.
inline float exp_fast(float x) {
  if (x < -87.0f) return 0.0f;
  const float xc = std::min(x, 88.0f);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}
inline double exp_fast(double x) { return std::exp(x); }

template <typename A> constexpr A neg_inf() { return -std::numeric_limits<A>::infinity(); }

// Rescale factor exp((old_max - new_max) * inv_temp) for an online softmax sum.
template <typename A>
inline A rescale(A old_max, A new_max, A inv_temp) {
  return old_max == neg_inf<A>() ? A(0) : exp_fast((old_max - new_max) * inv_temp);
}

struct StudentRowOut {
  double loss;   // sum_k -T_k * log_softmax(s / tau_s)_k
  double probe;  // 0, or NaN when the row holds a non-finite value
};

// Teacher row -> q = softmax((t - c) / tau_t), written to q. Adds the row to tsum when non-null.
// Returns the finiteness probe (0 or NaN). tile_max: scratch of ceil(k / kTile) entries.
template <typename T, typename A>
A teacher_row_portable(const T* t, const A* c, int64_t k, A inv_temp, A* q, A* tile_max, float* tsum);

// Student row against target T: the loss term and, when g is non-null, the gradient times grad_scale.
template <typename T, typename A>
StudentRowOut student_row_portable(const T* s, const A* target, int64_t k, A inv_temp, A* expo, A* tile_max,
                                   T* g, A grad_scale);

// AVX2+FMA and AVX-512 versions for fp32 and bf16 rows (dino_loss_avx2.cpp, dino_loss_avx512.cpp,
// both from dino_loss_simd.h); call only when avx2_available() / avx512_available().
bool avx2_available();
bool avx512_available();
template <typename T>
float teacher_row_avx2(const T* t, const float* c, int64_t k, float inv_temp, float* q, float* tile_max, float* tsum);
template <typename T>
StudentRowOut student_row_avx2(const T* s, const float* target, int64_t k, float inv_temp, float* expo,
                               float* tile_max, T* g, float grad_scale);
template <typename T>
float teacher_row_avx512(const T* t, const float* c, int64_t k, float inv_temp, float* q, float* tile_max,
                         float* tsum);
template <typename T>
StudentRowOut student_row_avx512(const T* s, const float* target, int64_t k, float inv_temp, float* expo,
                                 float* tile_max, T* g, float grad_scale);

}  // namespace cpu
}  // namespace dinocxr

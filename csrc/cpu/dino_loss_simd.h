// The AVX2 and AVX-512 row kernels of the CPU DINO loss, written once over a vector type V.
// Included by dino_loss_avx2.cpp and dino_loss_avx512.cpp after their target pragma and their V,
// which provides: R (the register), kWidth (fp32 lanes), zero, set1, load/store (fp32 and bf16),
// stream (fp32, aligned to 4 * kWidth bytes), fence, add, sub, mul, max (NaN from the second
// operand, as _mm*_max_ps), fmadd, fmsub, exp (exp_fast lane by lane), hsum, hmax.
#pragma once

#include <cstdint>
#include <type_traits>

#include "dino_loss_rows.h"

namespace dinocxr {
namespace cpu {
namespace {

template <typename V, typename T>
float teacher_row_simd(const T* t, const float* c, int64_t k, float inv_temp, float* q,
                       float* tile_max, float* tsum) {
  using R = typename V::R;
  float probe = 0.f, run_max = neg_inf<float>(), run_sum = 0.f;
  R vprobe = V::zero();
  const R vinv = V::set1(inv_temp);
  for (int64_t lo = 0, j = 0; lo < k; lo += kTile, ++j) {
    const int64_t hi = std::min(k, lo + kTile), vend = lo + ((hi - lo) / V::kWidth) * V::kWidth;
    R vmax = V::set1(neg_inf<float>());
    for (int64_t i = lo; i < vend; i += V::kWidth) {
      const R x = V::load(t + i);
      const R z = V::sub(x, V::load(c + i));
      vprobe = V::add(vprobe, V::sub(z, z));  // NaN if t or c is NaN or +-inf
      vmax = V::max(vmax, z);
      if (tsum != nullptr) V::store(tsum + i, V::add(V::load(tsum + i), x));
    }
    float tmax = V::hmax(vmax);
    for (int64_t i = vend; i < hi; ++i) {
      const float x = load(t[i]);
      const float z = x - c[i];
      probe += z - z;
      tmax = std::max(tmax, z);
      if (tsum != nullptr) tsum[i] += x;
    }
    const float new_max = std::max(run_max, tmax);
    run_sum *= rescale(run_max, new_max, inv_temp);
    const float shift = new_max * inv_temp;
    const R vshift = V::set1(shift);
    R vsum = V::zero();
    for (int64_t i = lo; i < vend; i += V::kWidth) {
      const R z = V::sub(V::load(t + i), V::load(c + i));
      const R e = V::exp(V::fmsub(z, vinv, vshift));
      V::store(q + i, e);
      vsum = V::add(vsum, e);
    }
    float tile_sum = V::hsum(vsum);
    for (int64_t i = vend; i < hi; ++i) {
      const float e = exp_fast((load(t[i]) - c[i]) * inv_temp - shift);
      q[i] = e;
      tile_sum += e;
    }
    run_sum += tile_sum;
    run_max = new_max;
    tile_max[j] = new_max;
  }
  for (int64_t lo = 0, j = 0; lo < k; lo += kTile, ++j) {
    const int64_t hi = std::min(k, lo + kTile), vend = lo + ((hi - lo) / V::kWidth) * V::kWidth;
    const float f = rescale(tile_max[j], run_max, inv_temp) / run_sum;
    const R vf = V::set1(f);
    for (int64_t i = lo; i < vend; i += V::kWidth) V::store(q + i, V::mul(V::load(q + i), vf));
    for (int64_t i = vend; i < hi; ++i) q[i] *= f;
  }
  return probe + V::hsum(vprobe);
}

template <typename V, typename T>
StudentRowOut student_row_simd(const T* s, const float* target, int64_t k, float inv_temp,
                               float* expo, float* tile_max, T* g, float grad_scale) {
  using R = typename V::R;
  float probe = 0.f, run_max = neg_inf<float>(), run_sum = 0.f;
  R vprobe = V::zero();
  double shifted_dot = 0.0, weight = 0.0;  // sum T (s - running max), sum T
  const R vinv = V::set1(inv_temp);
  for (int64_t lo = 0, j = 0; lo < k; lo += kTile, ++j) {
    const int64_t hi = std::min(k, lo + kTile), vend = lo + ((hi - lo) / V::kWidth) * V::kWidth;
    R vmax = V::set1(neg_inf<float>());
    for (int64_t i = lo; i < vend; i += V::kWidth) {
      const R x = V::load(s + i);
      vprobe = V::add(vprobe, V::sub(x, x));
      vmax = V::max(vmax, x);
    }
    float tmax = V::hmax(vmax);
    for (int64_t i = vend; i < hi; ++i) {
      const float x = load(s[i]);
      probe += x - x;
      tmax = std::max(tmax, x);
    }
    const float new_max = std::max(run_max, tmax);
    if (run_max != neg_inf<float>()) shifted_dot += weight * static_cast<double>(run_max - new_max);
    run_sum *= rescale(run_max, new_max, inv_temp);
    const float shift = new_max * inv_temp;
    const R vshift = V::set1(shift), vmax_new = V::set1(new_max);
    R vsum = V::zero(), vdot = V::zero(), vw = V::zero();
    for (int64_t i = lo; i < vend; i += V::kWidth) {
      const R x = V::load(s + i);
      const R e = V::exp(V::fmsub(x, vinv, vshift));
      V::store(expo + i, e);
      vsum = V::add(vsum, e);
      const R tg = V::load(target + i);
      vdot = V::fmadd(tg, V::sub(x, vmax_new), vdot);
      vw = V::add(vw, tg);
    }
    float tile_sum = V::hsum(vsum), tile_dot = V::hsum(vdot), tile_w = V::hsum(vw);
    for (int64_t i = vend; i < hi; ++i) {
      const float x = load(s[i]);
      const float e = exp_fast(x * inv_temp - shift);
      expo[i] = e;
      tile_sum += e;
      tile_dot += target[i] * (x - new_max);
      tile_w += target[i];
    }
    run_sum += tile_sum;
    shifted_dot += tile_dot;
    weight += tile_w;
    run_max = new_max;
    tile_max[j] = new_max;
  }
  const double log_sum = std::log(static_cast<double>(run_sum));
  StudentRowOut out{weight * log_sum - shifted_dot * static_cast<double>(inv_temp),
                    static_cast<double>(probe + V::hsum(vprobe))};
  if (g != nullptr) {
    const float w = static_cast<float>(weight);
    const R vscale = V::set1(grad_scale);
    for (int64_t lo = 0, j = 0; lo < k; lo += kTile, ++j) {
      const int64_t hi = std::min(k, lo + kTile), vend = lo + ((hi - lo) / V::kWidth) * V::kWidth;
      const float wp = w * rescale(tile_max[j], run_max, inv_temp) / run_sum;  // W * p = wp * expo
      const R vwp = V::set1(wp);
      if constexpr (std::is_same_v<T, float>) {
        // The gradient is written once and not read back here: streaming stores skip the
        // read-for-ownership of every destination line (a third less memory traffic).
        if (reinterpret_cast<uintptr_t>(g + lo) % (4 * V::kWidth) == 0) {
          for (int64_t i = lo; i < vend; i += V::kWidth) {
            const R d = V::fmsub(vwp, V::load(expo + i), V::load(target + i));
            V::stream(g + i, V::mul(vscale, d));
          }
          for (int64_t i = vend; i < hi; ++i) store(&g[i], grad_scale * (wp * expo[i] - target[i]));
          continue;
        }
      }
      for (int64_t i = lo; i < vend; i += V::kWidth) {
        // grad = scale * (W p - T)
        const R d = V::fmsub(vwp, V::load(expo + i), V::load(target + i));
        V::store(g + i, V::mul(vscale, d));
      }
      for (int64_t i = vend; i < hi; ++i) store(&g[i], grad_scale * (wp * expo[i] - target[i]));
    }
  }
  V::fence();  // order the streaming stores before the caller reads the gradient
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace dinocxr

// The entry points dino_loss_rows.h declares, for one vector type: teacher_row_<isa> and
// student_row_<isa> for fp32 and bf16 rows (one definition here rather than one per ISA file).
#define DINOCXR_DEFINE_ROW_KERNELS(isa, V)                                                                  \
  template <typename T>                                                                                    \
  float teacher_row_##isa(const T* t, const float* c, int64_t k, float inv_temp, float* q, float* tile_max, \
                          float* tsum) {                                                                   \
    return teacher_row_simd<V, T>(t, c, k, inv_temp, q, tile_max, tsum);                                   \
  }                                                                                                        \
  template <typename T>                                                                                    \
  StudentRowOut student_row_##isa(const T* s, const float* target, int64_t k, float inv_temp, float* expo, \
                                  float* tile_max, T* g, float grad_scale) {                               \
    return student_row_simd<V, T>(s, target, k, inv_temp, expo, tile_max, g, grad_scale);                  \
  }                                                                                                        \
  template float teacher_row_##isa<float>(const float*, const float*, int64_t, float, float*, float*, float*); \
  template float teacher_row_##isa<BFloat16Bits>(const BFloat16Bits*, const float*, int64_t, float, float*,  \
                                                 float*, float*);                                          \
  template StudentRowOut student_row_##isa<float>(const float*, const float*, int64_t, float, float*, float*, \
                                                  float*, float);                                          \
  template StudentRowOut student_row_##isa<BFloat16Bits>(const BFloat16Bits*, const float*, int64_t, float,  \
                                                         float*, float*, BFloat16Bits*, float);

// AVX2+FMA row kernels of the CPU DINO loss (fp32 and bf16 rows, fp32 math). The target pragma
// below (after the shared header, whose inline helpers must stay portable) compiles only this
// file's functions for AVX2, so the extension still loads on CPUs without it: dino_loss.cpp
// checks avx2_available() before calling in here.
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "dino_loss_rows.h"

#pragma GCC target("avx2,fma")

namespace dinocxr {
namespace cpu {
namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const BFloat16Bits* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(BFloat16Bits* p, __m256 v) {
  // Round to nearest even, keep the high half, pack 8 x u32 -> 8 x u16.
  __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  u = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  u = _mm256_srli_epi32(u, 16);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(u, u), 0b1000);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

// Lane-wise exp_fast (dino_loss_rows.h). min/max put the constant first so a NaN lane stays NaN.
inline __m256 exp8(__m256 x) {
  const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  __m256 xc = _mm256_min_ps(_mm256_set1_ps(88.0f), x);
  xc = _mm256_max_ps(_mm256_set1_ps(-87.0f), xc);
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int64_t vec_end(int64_t lo, int64_t hi) { return lo + ((hi - lo) / 8) * 8; }

}  // namespace

template <typename T>
float teacher_row_avx2(const T* t, const float* c, int64_t k, float inv_temp, float* q,
                                    float* tile_max, float* tsum) {
  float probe = 0.f, run_max = neg_inf<float>(), run_sum = 0.f;
  __m256 vprobe = _mm256_setzero_ps();
  const __m256 vinv = _mm256_set1_ps(inv_temp);
  for (int64_t lo = 0, j = 0; lo < k; lo += kTile, ++j) {
    const int64_t hi = std::min(k, lo + kTile), vend = vec_end(lo, hi);
    __m256 vmax = _mm256_set1_ps(neg_inf<float>());
    for (int64_t i = lo; i < vend; i += 8) {
      const __m256 x = load8(t + i);
      const __m256 z = _mm256_sub_ps(x, _mm256_loadu_ps(c + i));
      vprobe = _mm256_add_ps(vprobe, _mm256_sub_ps(z, z));  // NaN if t or c is NaN or +-inf
      vmax = _mm256_max_ps(vmax, z);
      if (tsum != nullptr) _mm256_storeu_ps(tsum + i, _mm256_add_ps(_mm256_loadu_ps(tsum + i), x));
    }
    float tmax = hmax(vmax);
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
    const __m256 vshift = _mm256_set1_ps(shift);
    __m256 vsum = _mm256_setzero_ps();
    for (int64_t i = lo; i < vend; i += 8) {
      const __m256 z = _mm256_sub_ps(load8(t + i), _mm256_loadu_ps(c + i));
      const __m256 e = exp8(_mm256_fmsub_ps(z, vinv, vshift));
      _mm256_storeu_ps(q + i, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    float tile_sum = hsum(vsum);
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
    const int64_t hi = std::min(k, lo + kTile), vend = vec_end(lo, hi);
    const float f = rescale(tile_max[j], run_max, inv_temp) / run_sum;
    const __m256 vf = _mm256_set1_ps(f);
    for (int64_t i = lo; i < vend; i += 8) _mm256_storeu_ps(q + i, _mm256_mul_ps(_mm256_loadu_ps(q + i), vf));
    for (int64_t i = vend; i < hi; ++i) q[i] *= f;
  }
  return probe + hsum(vprobe);
}

template <typename T>
StudentRowOut student_row_avx2(const T* s, const float* target, int64_t k, float inv_temp,
                                            float* expo, float* tile_max, T* g, float grad_scale) {
  float probe = 0.f, run_max = neg_inf<float>(), run_sum = 0.f;
  __m256 vprobe = _mm256_setzero_ps();
  double shifted_dot = 0.0, weight = 0.0;  // sum T (s - running max), sum T
  const __m256 vinv = _mm256_set1_ps(inv_temp);
  for (int64_t lo = 0, j = 0; lo < k; lo += kTile, ++j) {
    const int64_t hi = std::min(k, lo + kTile), vend = vec_end(lo, hi);
    __m256 vmax = _mm256_set1_ps(neg_inf<float>());
    for (int64_t i = lo; i < vend; i += 8) {
      const __m256 x = load8(s + i);
      vprobe = _mm256_add_ps(vprobe, _mm256_sub_ps(x, x));
      vmax = _mm256_max_ps(vmax, x);
    }
    float tmax = hmax(vmax);
    for (int64_t i = vend; i < hi; ++i) {
      const float x = load(s[i]);
      probe += x - x;
      tmax = std::max(tmax, x);
    }
    const float new_max = std::max(run_max, tmax);
    if (run_max != neg_inf<float>()) shifted_dot += weight * static_cast<double>(run_max - new_max);
    run_sum *= rescale(run_max, new_max, inv_temp);
    const float shift = new_max * inv_temp;
    const __m256 vshift = _mm256_set1_ps(shift), vmax_new = _mm256_set1_ps(new_max);
    __m256 vsum = _mm256_setzero_ps(), vdot = _mm256_setzero_ps(), vw = _mm256_setzero_ps();
    for (int64_t i = lo; i < vend; i += 8) {
      const __m256 x = load8(s + i);
      const __m256 e = exp8(_mm256_fmsub_ps(x, vinv, vshift));
      _mm256_storeu_ps(expo + i, e);
      vsum = _mm256_add_ps(vsum, e);
      const __m256 tg = _mm256_loadu_ps(target + i);
      vdot = _mm256_fmadd_ps(tg, _mm256_sub_ps(x, vmax_new), vdot);
      vw = _mm256_add_ps(vw, tg);
    }
    float tile_sum = hsum(vsum), tile_dot = hsum(vdot), tile_w = hsum(vw);
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
                    static_cast<double>(probe + hsum(vprobe))};
  if (g != nullptr) {
    const float w = static_cast<float>(weight);
    const __m256 vscale = _mm256_set1_ps(grad_scale);
    for (int64_t lo = 0, j = 0; lo < k; lo += kTile, ++j) {
      const int64_t hi = std::min(k, lo + kTile), vend = vec_end(lo, hi);
      const float wp = w * rescale(tile_max[j], run_max, inv_temp) / run_sum;  // W * p = wp * expo
      const __m256 vwp = _mm256_set1_ps(wp);
      if constexpr (std::is_same_v<T, float>) {
        // The gradient is written once and not read back here: streaming stores skip the
        // read-for-ownership of every destination line (a third less memory traffic).
        if (reinterpret_cast<uintptr_t>(g + lo) % 32 == 0) {
          for (int64_t i = lo; i < vend; i += 8) {
            const __m256 d = _mm256_fmsub_ps(vwp, _mm256_loadu_ps(expo + i), _mm256_loadu_ps(target + i));
            _mm256_stream_ps(g + i, _mm256_mul_ps(vscale, d));
          }
          for (int64_t i = vend; i < hi; ++i) store(&g[i], grad_scale * (wp * expo[i] - target[i]));
          continue;
        }
      }
      for (int64_t i = lo; i < vend; i += 8) {
        // grad = scale * (W p - T)
        const __m256 d = _mm256_fmsub_ps(vwp, _mm256_loadu_ps(expo + i), _mm256_loadu_ps(target + i));
        store8(g + i, _mm256_mul_ps(vscale, d));
      }
      for (int64_t i = vend; i < hi; ++i) store(&g[i], grad_scale * (wp * expo[i] - target[i]));
    }
  }
  _mm_sfence();  // order the streaming stores before the caller reads the gradient
  return out;
}

template float teacher_row_avx2<float>(const float*, const float*, int64_t, float, float*, float*, float*);
template float teacher_row_avx2<BFloat16Bits>(const BFloat16Bits*, const float*, int64_t, float, float*, float*,
                                              float*);
template StudentRowOut student_row_avx2<float>(const float*, const float*, int64_t, float, float*, float*, float*,
                                               float);
template StudentRowOut student_row_avx2<BFloat16Bits>(const BFloat16Bits*, const float*, int64_t, float, float*,
                                                      float*, BFloat16Bits*, float);

}  // namespace cpu
}  // namespace dinocxr

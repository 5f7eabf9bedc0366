// AVX2 + FMA row kernels of the CPU BatchNorm + activation (bn_act.h). The target pragma below
// (after the includes, whose inline functions must stay portable) compiles only this file's
// functions for AVX2, so the extension still loads on CPUs without it: bn_act.cpp checks the CPU
// before calling in here. A row's last C % 8 channels go through masked loads and stores, so every
// element sees the same arithmetic.
#include <immintrin.h>

#include <cstdint>

#include "bn_act.h"

#pragma GCC target("avx2,fma")

namespace dinocxr {
namespace cpu {
namespace {

// exp(x) = 2^n exp(r), n = round(x / ln 2), r by Cody & Waite's two-step reduction, Cephes'
// polynomial for exp(r) (relative error below 2e-7, as dino_loss_avx2.cpp's exp8) evaluated by
// Estrin's scheme, and 2^n added to the exponent bits: the dependency chain is what bounds these
// loops, so it is kept short. x is clamped to [-86.5, 88]: below, the result is ~3e-38 instead of
// 0 (harmless in 1 + exp(-z) and in erfc, the only uses), above, ~1.65e38. min/max put the
// constant first so a NaN lane stays NaN.
inline __m256 exp8(__m256 x) {
  __m256 xc = _mm256_min_ps(_mm256_set1_ps(88.0f), x);
  xc = _mm256_max_ps(_mm256_set1_ps(-86.5f), xc);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  const __m256 r2 = _mm256_mul_ps(r, r);
  const __m256 r4 = _mm256_mul_ps(r2, r2);
  const __m256 a = _mm256_fmadd_ps(_mm256_set1_ps(1.6666665459e-1f), r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 b = _mm256_fmadd_ps(_mm256_set1_ps(8.3334519073e-3f), r, _mm256_set1_ps(4.1665795894e-2f));
  const __m256 c = _mm256_fmadd_ps(_mm256_set1_ps(1.9875691500e-4f), r, _mm256_set1_ps(1.3981999507e-3f));
  const __m256 poly = _mm256_fmadd_ps(c, r4, _mm256_fmadd_ps(b, r2, a));
  const __m256 y = _mm256_fmadd_ps(poly, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));  // exp(r) in [0.7, 1.42]
  const __m256i scale = _mm256_slli_epi32(_mm256_cvttps_epi32(n), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(y), scale));
}

// 1 / x for x >= 1: the hardware estimate (12 bits) and one Newton step, relative error ~1e-7 at
// a third of a division's cost. Huge x gives 0, NaN stays NaN.
inline __m256 recip8(__m256 x) {
  const __m256 r = _mm256_rcp_ps(x);
  return _mm256_mul_ps(r, _mm256_fnmadd_ps(x, r, _mm256_set1_ps(2.0f)));
}

// Phi(z) = 0.5 (1 + erf(z / sqrt 2)) and exp(-z^2 / 2). erfc(u) for u = |z| / sqrt 2 >= 0 by
// Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7, the approximation ATen's vectorised
// erf uses); Phi = 1 - erfc / 2 for z >= 0, erfc / 2 otherwise, so neither tail cancels.
inline __m256 normal_cdf8(__m256 z, __m256* gauss) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 u = _mm256_mul_ps(_mm256_andnot_ps(sign, z), _mm256_set1_ps(0.70710678118654752440f));
  const __m256 t = recip8(_mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), u, one));
  __m256 poly = _mm256_set1_ps(1.061405429f);
  poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(-1.453152027f));
  poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(1.421413741f));
  poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(-0.284496736f));
  poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(0.254829592f));
  const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(u, u)));  // exp(-z^2 / 2)
  *gauss = e;
  const __m256 half_erfc = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), t), _mm256_mul_ps(poly, e));
  const __m256 upper = _mm256_sub_ps(one, half_erfc);
  const __m256 positive = _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GE_OQ);
  return _mm256_blendv_ps(half_erfc, upper, positive);
}

// act(z); nz = -z, computed beside z rather than from it (one step less on the dependency chain).
template <int A>
inline __m256 act8(__m256 z, __m256 nz) {
  if constexpr (A == kActSilu) {
    return _mm256_mul_ps(z, recip8(_mm256_add_ps(_mm256_set1_ps(1.0f), exp8(nz))));
  }
  if constexpr (A == kActGelu) {
    __m256 gauss;
    return _mm256_mul_ps(z, normal_cdf8(z, &gauss));
  }
  if constexpr (A == kActRelu) return _mm256_max_ps(_mm256_setzero_ps(), z);  // max(0, NaN) = NaN
  return z;
}

// dz = g * act'(z)
template <int A>
inline __m256 act_grad8(__m256 g, __m256 z, __m256 nz) {
  if constexpr (A == kActSilu) {
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 s = recip8(_mm256_add_ps(one, exp8(nz)));
    // s (1 + z (1 - s))
    const __m256 d = _mm256_mul_ps(s, _mm256_fmadd_ps(z, _mm256_sub_ps(one, s), one));
    return _mm256_mul_ps(g, d);
  }
  if constexpr (A == kActGelu) {
    __m256 gauss;
    const __m256 cdf = normal_cdf8(z, &gauss);
    const __m256 d = _mm256_fmadd_ps(_mm256_mul_ps(z, _mm256_set1_ps(0.39894228040143267794f)), gauss, cdf);
    return _mm256_mul_ps(g, d);
  }
  if constexpr (A == kActRelu) return _mm256_and_ps(g, _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GT_OQ));
  return g;
}

// Lane mask of the last c % 8 channels.
inline __m256i tail_mask(int64_t rem) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(rem)), lanes);
}

// Loads and stores of lanes j..j+7: full, or masked to the last c % 8 channels (a compile-time
// choice, so the full-vector loop carries no test).
template <bool Masked>
struct Lanes {
  __m256i mask;
  inline __m256 load(const float* p) const {
    if constexpr (Masked) {
      return _mm256_maskload_ps(p, mask);
    } else {
      return _mm256_loadu_ps(p);
    }
  }
  inline void store(float* p, __m256 v) const {
    if constexpr (Masked) {
      _mm256_maskstore_ps(p, mask, v);
    } else {
      _mm256_storeu_ps(p, v);
    }
  }
};

// Calls body(j, lanes) over the channels of a row: full vectors, then one masked vector.
// body is a generic lambda, instantiated for both kinds of lanes.
template <typename F>
inline void for_channels(int64_t c, __m256i tail, F&& body) {
  const int64_t vend = c - c % 8;
  for (int64_t j = 0; j < vend; j += 8) body(j, Lanes<false>{tail});
  if (vend < c) body(vend, Lanes<true>{tail});
}

// z = (y - hi) * gs + shift and -z, for lanes j..j+7 of a row; d = y - hi.
struct Z {
  __m256 d, z, nz;
};

template <typename L>
inline Z affine(const L& l, const float* yr, const BnActChannels& ch, int64_t j) {
  const __m256 d = _mm256_sub_ps(l.load(yr + j), l.load(ch.hi + j));
  const __m256 gs = l.load(ch.gs + j), shift = l.load(ch.shift + j);
  const __m256 nshift = _mm256_xor_ps(shift, _mm256_set1_ps(-0.0f));
  return {d, _mm256_fmadd_ps(d, gs, shift), _mm256_fnmadd_ps(d, gs, nshift)};
}

template <int A>
void apply_t(const float* y, int64_t n, int64_t c, const BnActChannels& ch, float* out) {
  const __m256i tail = tail_mask(c % 8);
  for (int64_t r = 0; r < n; ++r) {
    const float* yr = y + r * c;
    float* o = out + r * c;
    for_channels(c, tail, [&](int64_t j, const auto& l) {
      const Z v = affine(l, yr, ch, j);
      l.store(o + j, act8<A>(v.z, v.nz));
    });
  }
}

template <int A>
void bwd_stats_t(const float* g, const float* y, int64_t n, int64_t c, const BnActChannels& ch, float* s1, float* s2,
                 const float* a, float* dy) {
  const __m256i tail = tail_mask(c % 8);
  for (int64_t r = 0; r < n; ++r) {
    const float* yr = y + r * c;
    const float* gr = g + r * c;
    for_channels(c, tail, [&](int64_t j, const auto& l) {
      const Z v = affine(l, yr, ch, j);
      const __m256 dz = act_grad8<A>(l.load(gr + j), v.z, v.nz);
      l.store(s1 + j, _mm256_add_ps(l.load(s1 + j), dz));
      l.store(s2 + j, _mm256_fmadd_ps(dz, v.d, l.load(s2 + j)));
      if (dy != nullptr) l.store(dy + r * c + j, _mm256_mul_ps(l.load(a + j), dz));
    });
  }
}

}  // namespace

namespace rows {

void stats_avx2(const float* y, int64_t n, int64_t c, const float* ref, float* s1, float* s2) {
  const __m256i tail = tail_mask(c % 8);
  for (int64_t r = 0; r < n; ++r) {
    const float* yr = y + r * c;
    for_channels(c, tail, [&](int64_t j, const auto& l) {
      const __m256 d = _mm256_sub_ps(l.load(yr + j), l.load(ref + j));
      l.store(s1 + j, _mm256_add_ps(l.load(s1 + j), d));
      l.store(s2 + j, _mm256_fmadd_ps(d, d, l.load(s2 + j)));
    });
  }
}

void apply_avx2(const float* y, int64_t n, int64_t c, const BnActChannels& ch, int act, float* out) {
#define CALL(A) apply_t<A>(y, n, c, ch, out)
  DINOCXR_BN_ACT_SWITCH(act, CALL)
#undef CALL
}

void bwd_stats_avx2(const float* g, const float* y, int64_t n, int64_t c, const BnActChannels& ch, int act, float* s1,
                    float* s2, const float* a, float* dy) {
#define CALL(A) bwd_stats_t<A>(g, y, n, c, ch, s1, s2, a, dy)
  DINOCXR_BN_ACT_SWITCH(act, CALL)
#undef CALL
}

void bwd_apply_avx2(float* dy, const float* y, int64_t n, int64_t c, const float* hi, const float* a,
                    const float* b, const float* k) {
  const __m256i tail = tail_mask(c % 8);
  for (int64_t r = 0; r < n; ++r) {
    const float* yr = y + r * c;
    float* o = dy + r * c;
    for_channels(c, tail, [&](int64_t j, const auto& l) {
      const __m256 d = _mm256_sub_ps(l.load(yr + j), l.load(hi + j));
      l.store(o + j, _mm256_fmadd_ps(l.load(a + j), l.load(o + j), _mm256_fmadd_ps(l.load(b + j), d, l.load(k + j))));
    });
  }
}

}  // namespace rows
}  // namespace cpu
}  // namespace dinocxr

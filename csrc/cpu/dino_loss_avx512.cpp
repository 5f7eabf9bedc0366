// AVX-512 row kernels of the CPU DINO loss (fp32 and bf16 rows, fp32 math): the 16-lane vector
// type for dino_loss_simd.h, the same arithmetic as the AVX2 one lane by lane (exp via scalef).
// Half the instructions of AVX2 per element: exp throughput is what bounds the fused loss. Only
// this file is compiled for AVX-512; dino_loss.cpp checks avx512_available() before calling in.
#include <immintrin.h>

#include <cstdint>

#include "dino_loss_rows.h"

#pragma GCC target("avx512f,avx512bw,avx512dq,fma")
// GCC 12's own AVX-512 intrinsics (max, min, roundscale, extract) pass an undefined register as
// the unused merge source and then warn about it (GCC bug 105593): not ours, silenced here only.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace dinocxr {
namespace cpu {
namespace {

struct Avx512 {
  using R = __m512;
  static constexpr int64_t kWidth = 16;
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(float x) { return _mm512_set1_ps(x); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static R load(const BFloat16Bits* p) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  }
  static void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static void store(BFloat16Bits* p, R v) {
    // Round to nearest even and keep the high half, as the AVX2 and scalar stores.
    __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(u));
  }
  static void stream(float* p, R v) { _mm512_stream_ps(p, v); }
  static void fence() { _mm_sfence(); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R max(R a, R b) { return _mm512_max_ps(a, b); }
  static R fmadd(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R fmsub(R a, R b, R c) { return _mm512_fmsub_ps(a, b, c); }
  // exp_fast (dino_loss_rows.h) lane by lane; scalef multiplies by 2^n, the mask zeroes x < -87
  // (a NaN lane is not masked and stays NaN). min/max put the constant first, as in exp8.
  static R exp(R x) {
    const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ);
    R xc = _mm512_min_ps(_mm512_set1_ps(88.0f), x);
    xc = _mm512_max_ps(_mm512_set1_ps(-87.0f), xc);
    const R n = _mm512_roundscale_ps(_mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                     _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    R r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
    R y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_scalef_ps(keep, y, n);
  }
  static float hsum(R v) { return _mm512_reduce_add_ps(v); }
  static float hmax(R v) { return _mm512_reduce_max_ps(v); }
};

}  // namespace
}  // namespace cpu
}  // namespace dinocxr

#include "dino_loss_simd.h"

namespace dinocxr {
namespace cpu {

DINOCXR_DEFINE_ROW_KERNELS(avx512, Avx512)

}  // namespace cpu
}  // namespace dinocxr

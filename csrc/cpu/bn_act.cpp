// Fused BatchNorm + activation on the CPU (see bn_act.h). Each pass runs over contiguous ranges of
// rows, one per OpenMP thread; per-channel sums go to per-thread partials (fp32 within a block of
// kBlock rows, fp64 across blocks) that are reduced in thread order, so a result depends on the
// thread count only, never on scheduling. The row kernels are portable C++ here and AVX2 + FMA in
// bn_act_avx2.cpp, chosen at run time.
#include "bn_act.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace dinocxr {
namespace cpu {
namespace {

constexpr int64_t kBlock = 64;        // rows summed in fp32 before the fp64 partial takes them
constexpr int64_t kMinWork = 16384;   // elements per thread below which fewer threads are used

bool g_force_portable = false;

bool avx2_ok() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

bool use_avx2() { return !g_force_portable && avx2_ok(); }

int pick_threads(int64_t rows, int64_t channels) {
  const int64_t by_work = std::max<int64_t>(1, rows * channels / kMinWork);
  const int64_t t = std::min<int64_t>({static_cast<int64_t>(omp_get_max_threads()), by_work, rows});
  return static_cast<int>(std::max<int64_t>(1, t));
}

inline void row_range(int64_t rows, int t, int nt, int64_t* r0, int64_t* r1) {
  *r0 = rows * t / nt;
  *r1 = rows * (t + 1) / nt;
}

// ---- dispatch to the row kernels --------------------------------------------------------------
void stats_rows(const float* y, int64_t n, int64_t c, const float* ref, float* s1, float* s2) {
  if (use_avx2()) return rows::stats_avx2(y, n, c, ref, s1, s2);
  rows::stats_portable(y, n, c, ref, s1, s2);
}

void apply_rows(const float* y, int64_t n, int64_t c, const BnActChannels& ch, int act, float* out) {
  if (use_avx2()) return rows::apply_avx2(y, n, c, ch, act, out);
  rows::apply_portable(y, n, c, ch, act, out);
}

void bwd_stats_rows(const float* g, const float* y, int64_t n, int64_t c, const BnActChannels& ch, int act,
                    float* s1, float* s2, const float* a, float* dy) {
  if (use_avx2()) return rows::bwd_stats_avx2(g, y, n, c, ch, act, s1, s2, a, dy);
  rows::bwd_stats_portable(g, y, n, c, ch, act, s1, s2, a, dy);
}

void bwd_apply_rows(float* dy, const float* y, int64_t n, int64_t c, const float* hi, const float* a, const float* b,
                    const float* k) {
  if (use_avx2()) return rows::bwd_apply_avx2(dy, y, n, c, hi, a, b, k);
  rows::bwd_apply_portable(dy, y, n, c, hi, a, b, k);
}

// Sums over this thread's rows of two per-channel quantities, blockwise fp32 -> fp64.
// `sum_block(r, n, s1, s2)` adds rows [r, r + n) into the zeroed fp32 arrays s1, s2.
template <typename F>
void thread_sums(int64_t r0, int64_t r1, int64_t c, double* d1, double* d2, F sum_block) {
  std::vector<float> s(static_cast<size_t>(2 * c));
  float* s1 = s.data();
  float* s2 = s.data() + c;
  for (int64_t r = r0; r < r1; r += kBlock) {
    std::fill(s.begin(), s.end(), 0.0f);
    sum_block(r, std::min(kBlock, r1 - r), s1, s2);
    for (int64_t j = 0; j < c; ++j) {
      d1[j] += s1[j];
      d2[j] += s2[j];
    }
  }
}

// Inside a parallel region: this thread's rows [*r0, *r1) and their two per-channel sums, into the
// thread's slice of `partial` (n_threads x 2 x c doubles).
template <typename F>
void sum_own_rows(int64_t m, int64_t c, std::vector<double>& partial, int64_t* r0, int64_t* r1, F sum_block) {
  const int t = omp_get_thread_num();
  row_range(m, t, omp_get_num_threads(), r0, r1);
  double* d = partial.data() + static_cast<size_t>(t) * 2 * c;
  thread_sums(*r0, *r1, c, d, d + c, sum_block);
}

// Channel j's two sums over all threads, added in thread order: deterministic for a thread count.
inline void channel_sums(const std::vector<double>& partial, int n_threads, int64_t c, int64_t j, double* s1,
                         double* s2) {
  *s1 = 0.0;
  *s2 = 0.0;
  for (int i = 0; i < n_threads; ++i) {
    *s1 += partial[static_cast<size_t>(i) * 2 * c + j];
    *s2 += partial[static_cast<size_t>(i) * 2 * c + c + j];
  }
}

// ---- scalar activations (portable kernels) -------------------------------------------------------
constexpr float kInvSqrt2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;

template <int A>
inline float act_fwd(float z) {
  if constexpr (A == kActSilu) return z / (1.0f + std::exp(-z));
  if constexpr (A == kActGelu) return 0.5f * z * (1.0f + std::erf(z * kInvSqrt2));
  if constexpr (A == kActRelu) return (z > 0.0f || z != z) ? z : 0.0f;  // NaN stays NaN, as torch.relu
  return z;
}

// d act / d z
template <int A>
inline float act_grad(float z) {
  if constexpr (A == kActSilu) {
    const float s = 1.0f / (1.0f + std::exp(-z));
    return s * (1.0f + z * (1.0f - s));
  }
  if constexpr (A == kActGelu) {
    return 0.5f * (1.0f + std::erf(z * kInvSqrt2)) + z * kInvSqrt2Pi * std::exp(-0.5f * z * z);
  }
  if constexpr (A == kActRelu) return z > 0.0f ? 1.0f : 0.0f;
  return 1.0f;
}

template <int A>
void apply_portable_t(const float* y, int64_t n, int64_t c, const BnActChannels& ch, float* out) {
  for (int64_t r = 0; r < n; ++r) {
    const float* yr = y + r * c;
    float* o = out + r * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) o[j] = act_fwd<A>((yr[j] - ch.hi[j]) * ch.gs[j] + ch.shift[j]);
  }
}

template <int A>
void bwd_stats_portable_t(const float* g, const float* y, int64_t n, int64_t c, const BnActChannels& ch, float* s1,
                          float* s2, const float* a, float* dy) {
  for (int64_t r = 0; r < n; ++r) {
    const float* yr = y + r * c;
    const float* gr = g + r * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) {
      const float d = yr[j] - ch.hi[j];
      const float dz = gr[j] * act_grad<A>(d * ch.gs[j] + ch.shift[j]);
      s1[j] += dz;
      s2[j] += dz * d;
      if (dy != nullptr) dy[r * c + j] = a[j] * dz;
    }
  }
}

}  // namespace

// ---- portable row kernels ------------------------------------------------------------------------
namespace rows {

void stats_portable(const float* y, int64_t n, int64_t c, const float* ref, float* s1, float* s2) {
  for (int64_t r = 0; r < n; ++r) {
    const float* yr = y + r * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) {
      const float d = yr[j] - ref[j];
      s1[j] += d;
      s2[j] += d * d;
    }
  }
}

void apply_portable(const float* y, int64_t n, int64_t c, const BnActChannels& ch, int act, float* out) {
#define CALL(A) apply_portable_t<A>(y, n, c, ch, out)
  DINOCXR_BN_ACT_SWITCH(act, CALL)
#undef CALL
}

void bwd_stats_portable(const float* g, const float* y, int64_t n, int64_t c, const BnActChannels& ch, int act,
                        float* s1, float* s2, const float* a, float* dy) {
#define CALL(A) bwd_stats_portable_t<A>(g, y, n, c, ch, s1, s2, a, dy)
  DINOCXR_BN_ACT_SWITCH(act, CALL)
#undef CALL
}

void bwd_apply_portable(float* dy, const float* y, int64_t n, int64_t c, const float* hi, const float* a,
                        const float* b, const float* k) {
  for (int64_t r = 0; r < n; ++r) {
    const float* yr = y + r * c;
    float* o = dy + r * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) o[j] = a[j] * o[j] + b[j] * (yr[j] - hi[j]) + k[j];
  }
}

}  // namespace rows

// ---- drivers ---------------------------------------------------------------------------------------
void set_bn_act_force_portable(bool portable) { g_force_portable = portable; }
const char* bn_act_isa() { return use_avx2() ? "avx2" : "portable"; }

void bn_act_forward_train(const BnActProblem& p, const float* y, const float* gamma, const float* beta, double eps,
                          double momentum, const float* running_mean, const float* running_var, float* out,
                          float* stats, float* new_running) {
  const int64_t m = p.rows, c = p.channels;
  const int n_threads = pick_threads(m, c);
  std::vector<double> partial(static_cast<size_t>(n_threads) * 2 * c, 0.0);
  std::vector<float> gs(static_cast<size_t>(c)), shift(static_cast<size_t>(c));
  float* hi = stats;
  float* lo = stats + c;
  float* invstd = stats + 2 * c;
  const float* ref = y;  // row 0: a sample of each channel, so y - ref is small however large the mean
  const BnActChannels ch{hi, gs.data(), shift.data()};
#pragma omp parallel num_threads(n_threads)
  {
    int64_t r0, r1;
    sum_own_rows(m, c, partial, &r0, &r1, [&](int64_t r, int64_t n, float* s1, float* s2) {
      stats_rows(y + r * c, n, c, ref, s1, s2);
    });
#pragma omp barrier
#pragma omp single
    {
      const double inv_m = 1.0 / static_cast<double>(m);
      for (int64_t j = 0; j < c; ++j) {
        double s1, s2;
        channel_sums(partial, n_threads, c, j, &s1, &s2);
        const double offset = s1 * inv_m;  // mean - ref
        const double mean = static_cast<double>(ref[j]) + offset;
        const double var = std::max(0.0, s2 * inv_m - offset * offset);  // biased
        const double is = 1.0 / std::sqrt(var + eps);
        hi[j] = static_cast<float>(mean);
        lo[j] = static_cast<float>(mean - static_cast<double>(hi[j]));
        invstd[j] = static_cast<float>(is);
        const double g_s = static_cast<double>(gamma[j]) * is;
        gs[j] = static_cast<float>(g_s);
        shift[j] = static_cast<float>(static_cast<double>(beta[j]) - static_cast<double>(lo[j]) * g_s);
        if (new_running != nullptr) {
          const double unbiased = var * static_cast<double>(m) / static_cast<double>(m - 1);
          new_running[j] = static_cast<float>(momentum * mean + (1.0 - momentum) * running_mean[j]);
          new_running[c + j] = static_cast<float>(momentum * unbiased + (1.0 - momentum) * running_var[j]);
        }
      }
    }  // implicit barrier
    apply_rows(y + r0 * c, r1 - r0, c, ch, p.act, out + r0 * c);
  }
}

void bn_act_forward_eval(const BnActProblem& p, const float* y, const float* gamma, const float* beta, double eps,
                         const float* running_mean, const float* running_var, float* out, float* stats) {
  const int64_t m = p.rows, c = p.channels;
  std::vector<float> gs(static_cast<size_t>(c));
  float* hi = stats;
  float* lo = stats + c;
  float* invstd = stats + 2 * c;
  for (int64_t j = 0; j < c; ++j) {
    const double is = 1.0 / std::sqrt(static_cast<double>(running_var[j]) + eps);
    hi[j] = running_mean[j];
    lo[j] = 0.0f;
    invstd[j] = static_cast<float>(is);
    gs[j] = static_cast<float>(static_cast<double>(gamma[j]) * is);
  }
  const BnActChannels ch{hi, gs.data(), beta};
  const int n_threads = pick_threads(m, c);
#pragma omp parallel num_threads(n_threads)
  {
    int64_t r0, r1;
    row_range(m, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1);
    apply_rows(y + r0 * c, r1 - r0, c, ch, p.act, out + r0 * c);
  }
}

void bn_act_backward(const BnActProblem& p, bool training, const float* dout, const float* y, const float* gamma,
                     const float* beta, const float* stats, float* dy, float* dgamma, float* dbeta) {
  const int64_t m = p.rows, c = p.channels;
  const float* hi = stats;
  const float* lo = stats + c;
  const float* invstd = stats + 2 * c;
  std::vector<float> gs(static_cast<size_t>(c)), shift(static_cast<size_t>(c)), a(static_cast<size_t>(c)),
      b(static_cast<size_t>(c)), k(static_cast<size_t>(c)), first(static_cast<size_t>(c));
  for (int64_t j = 0; j < c; ++j) {
    const double g_s = static_cast<double>(gamma[j]) * invstd[j];
    gs[j] = static_cast<float>(g_s);
    shift[j] = static_cast<float>(static_cast<double>(beta[j]) - static_cast<double>(lo[j]) * g_s);
    a[j] = gs[j];
    // The first pass writes first * dz into dy. Eval: that is dy already. Training: dz itself, for
    // the second pass, which then costs no activation derivative (computing act'(z) twice would be
    // slower than the extra write and read).
    first[j] = training ? 1.0f : gs[j];
  }
  const BnActChannels ch{hi, gs.data(), shift.data()};
  const int n_threads = pick_threads(m, c);
  std::vector<double> partial(static_cast<size_t>(n_threads) * 2 * c, 0.0);
#pragma omp parallel num_threads(n_threads)
  {
    int64_t r0, r1;
    sum_own_rows(m, c, partial, &r0, &r1, [&](int64_t r, int64_t n, float* s1, float* s2) {
      bwd_stats_rows(dout + r * c, y + r * c, n, c, ch, p.act, s1, s2, first.data(),
                     dy != nullptr ? dy + r * c : nullptr);
    });
#pragma omp barrier
#pragma omp single
    {
      const double inv_m = 1.0 / static_cast<double>(m);
      for (int64_t j = 0; j < c; ++j) {
        double s1, s2;  // sum dz, sum dz * (y - hi)
        channel_sums(partial, n_threads, c, j, &s1, &s2);
        s2 -= static_cast<double>(lo[j]) * s1;  // sum dz * (y - mean)
        const double is = invstd[j];
        const double dg = s2 * is;  // sum dz * xhat
        dbeta[j] = static_cast<float>(s1);
        dgamma[j] = static_cast<float>(dg);
        // dy = gs * (dz - mean(dz) - xhat * mean(dz * xhat)) = a dz + b (y - hi) + k
        const double g_s = gs[j];
        const double bj = -g_s * dg * inv_m * is;
        b[j] = static_cast<float>(bj);
        k[j] = static_cast<float>(-g_s * s1 * inv_m - bj * static_cast<double>(lo[j]));
      }
    }  // implicit barrier
    if (training && dy != nullptr) {
      bwd_apply_rows(dy + r0 * c, y + r0 * c, r1 - r0, c, hi, a.data(), b.data(), k.data());
    }
  }
}

}  // namespace cpu
}  // namespace dinocxr

// Fused DINO loss on the CPU: one pass over each teacher and student row with an online max/sum,
// one log-softmax per student crop (paired teacher targets summed first), the gradient and the
// teacher column sums from the same passes. Parallel over batch rows with OpenMP; the inner loops
// are written so that the compiler vectorises them (the hot function is cloned for AVX2).
#include "dino_loss.h"
#include "dino_loss_rows.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace dinocxr {
namespace cpu {
namespace {

// ---- per-thread scratch --------------------------------------------------------------------
template <typename A>
struct Scratch {
  // Kept per thread across calls (thread_local below): fresh pages cost first-touch faults.
  void prepare(int64_t n_global, int64_t k, bool need_sum) {
    const int64_t n_tiles = (k + kTile - 1) / kTile;
    probs.resize(static_cast<size_t>(n_global * k));
    probs_all.resize(static_cast<size_t>(k));
    target.resize(static_cast<size_t>(k));
    expo.resize(static_cast<size_t>(k));
    tile_max.resize(static_cast<size_t>(n_tiles));
    teacher_sum.assign(need_sum ? static_cast<size_t>(k) : 0, 0.0f);
  }
  std::vector<A> probs;      // q_i for every teacher view of the current row, [n_global][K]
  std::vector<A> probs_all;  // sum_i q_i, the target of crops the teacher does not see
  std::vector<A> target;     // sum_{i != v} q_i for a global crop v when n_global > 2
  std::vector<A> expo;       // exp((s - running max) / tau_s) of the current student row
  std::vector<A> tile_max;   // running max at the time each tile was exponentiated
  std::vector<float> teacher_sum;
};

}  // namespace

// ---- portable row kernels (fp64 rows, and CPUs without AVX2) ---------------------------------
template <typename T, typename A>
A teacher_row_portable(const T* __restrict t, const A* __restrict c, int64_t k, A inv_temp, A* __restrict q,
              A* __restrict tile_max, float* __restrict tsum) {
  A probe = 0, run_max = neg_inf<A>(), run_sum = 0;
  for (int64_t lo = 0, j = 0; lo < k; lo += kTile, ++j) {
    const int64_t hi = std::min(k, lo + kTile);
    A tmax = neg_inf<A>();
#pragma omp simd reduction(max : tmax) reduction(+ : probe)
    for (int64_t i = lo; i < hi; ++i) {
      const A z = static_cast<A>(load(t[i])) - c[i];
      probe += z - z;  // NaN if t or c is NaN or +-inf
      tmax = std::max(tmax, z);
    }
    if (tsum != nullptr) {
#pragma omp simd
      for (int64_t i = lo; i < hi; ++i) tsum[i] += static_cast<float>(load(t[i]));
    }
    const A new_max = std::max(run_max, tmax);
    run_sum *= rescale(run_max, new_max, inv_temp);
    A tile_sum = 0;
    const A shift = new_max * inv_temp;
#pragma omp simd reduction(+ : tile_sum)
    for (int64_t i = lo; i < hi; ++i) {
      const A e = exp_fast((static_cast<A>(load(t[i])) - c[i]) * inv_temp - shift);
      q[i] = e;
      tile_sum += e;
    }
    run_sum += tile_sum;
    run_max = new_max;
    tile_max[j] = new_max;
  }
  // Bring every tile to the final max and normalise.
  for (int64_t lo = 0, j = 0; lo < k; lo += kTile, ++j) {
    const int64_t hi = std::min(k, lo + kTile);
    const A f = rescale(tile_max[j], run_max, inv_temp) / run_sum;
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) q[i] *= f;
  }
  return probe;
}

template <typename T, typename A>
StudentRowOut student_row_portable(const T* __restrict s, const A* __restrict target, int64_t k, A inv_temp,
                          A* __restrict expo, A* __restrict tile_max, T* __restrict g, A grad_scale) {
  A probe = 0, run_max = neg_inf<A>(), run_sum = 0;
  // sum_k T_k * (s_k - m) accumulated per tile against that tile's max, fixed up at the end.
  double shifted_dot = 0, weight = 0;
  for (int64_t lo = 0, j = 0; lo < k; lo += kTile, ++j) {
    const int64_t hi = std::min(k, lo + kTile);
    A tmax = neg_inf<A>();
#pragma omp simd reduction(max : tmax) reduction(+ : probe)
    for (int64_t i = lo; i < hi; ++i) {
      const A x = static_cast<A>(load(s[i]));
      probe += x - x;
      tmax = std::max(tmax, x);
    }
    const A new_max = std::max(run_max, tmax);
    // shifted_dot was taken against run_max; move it to new_max.
    shifted_dot += weight * static_cast<double>(run_max == neg_inf<A>() ? A(0) : run_max - new_max);
    run_sum *= rescale(run_max, new_max, inv_temp);
    A tile_sum = 0, tile_dot = 0, tile_w = 0;
    const A shift = new_max * inv_temp;
#pragma omp simd reduction(+ : tile_sum, tile_dot, tile_w)
    for (int64_t i = lo; i < hi; ++i) {
      const A x = static_cast<A>(load(s[i]));
      const A e = exp_fast(x * inv_temp - shift);
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
  // log_softmax_k = (s_k - m) / tau - log(sum)  =>  loss = W log(sum) - sum_k T_k (s_k - m) / tau
  const double log_sum = std::log(static_cast<double>(run_sum));
  StudentRowOut out{weight * log_sum - shifted_dot * static_cast<double>(inv_temp), static_cast<double>(probe)};
  if (g != nullptr) {
    const A w = static_cast<A>(weight);
    for (int64_t lo = 0, j = 0; lo < k; lo += kTile, ++j) {
      const int64_t hi = std::min(k, lo + kTile);
      const A to_prob = rescale(tile_max[j], run_max, inv_temp) / run_sum;
#pragma omp simd
      for (int64_t i = lo; i < hi; ++i) store(&g[i], grad_scale * (w * expo[i] * to_prob - target[i]));
    }
  }
  return out;
}

namespace {

// The widest row kernels allowed (testing hook): 2 AVX-512, 1 AVX2, 0 portable.
int g_isa_limit = 2;

enum class Isa { kPortable, kAvx2, kAvx512 };

Isa row_isa() {
  if (g_isa_limit >= 2 && avx512_available()) return Isa::kAvx512;
  if (g_isa_limit >= 1 && avx2_available()) return Isa::kAvx2;
  return Isa::kPortable;
}

// The row kernels for element type T: AVX-512 or AVX2 for fp32/bf16 rows where the CPU has it.
template <typename T, typename A>
A teacher_row(Isa isa, const T* t, const A* c, int64_t k, A inv_temp, A* q, A* tile_max, float* tsum) {
  if constexpr (!std::is_same_v<A, double>) {
    if (isa == Isa::kAvx512) return teacher_row_avx512<T>(t, c, k, inv_temp, q, tile_max, tsum);
    if (isa == Isa::kAvx2) return teacher_row_avx2<T>(t, c, k, inv_temp, q, tile_max, tsum);
  }
  return teacher_row_portable<T, A>(t, c, k, inv_temp, q, tile_max, tsum);
}

template <typename T, typename A>
StudentRowOut student_row(Isa isa, const T* s, const A* target, int64_t k, A inv_temp, A* expo, A* tile_max, T* g,
                          A grad_scale) {
  if constexpr (!std::is_same_v<A, double>) {
    if (isa == Isa::kAvx512) return student_row_avx512<T>(s, target, k, inv_temp, expo, tile_max, g, grad_scale);
    if (isa == Isa::kAvx2) return student_row_avx2<T>(s, target, k, inv_temp, expo, tile_max, g, grad_scale);
  }
  return student_row_portable<T, A>(s, target, k, inv_temp, expo, tile_max, g, grad_scale);
}

}  // namespace

bool avx2_available() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

bool avx512_available() {
  static const bool ok = avx2_available() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512dq");
  return ok;
}

void set_force_portable(bool portable) { g_isa_limit = portable ? 0 : 2; }

bool set_isa_limit(const char* isa) {
  const std::string name(isa);
  if (name == "portable") g_isa_limit = 0;
  else if (name == "avx2") g_isa_limit = 1;
  else if (name == "avx512") g_isa_limit = 2;
  else return false;
  return true;
}

const char* active_isa() {
  switch (row_isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "portable";
  }
}

template <typename T>
DinoLossResult dino_loss_forward(const DinoLossProblem& p, const T* student, const T* teacher,
                                 const typename AccType<T>::type* center, T* grad, float* teacher_sum) {
  using A = typename AccType<T>::type;
  const int64_t B = p.batch, K = p.k, n_global = p.n_global, n_crops = p.n_crops;
  const int64_t n_pairs = n_global * (n_crops - 1);
  const A inv_tt = static_cast<A>(p.inv_teacher_temp), inv_ts = static_cast<A>(p.inv_student_temp);
  // d loss / d s = (W p - T) / (tau_s * n_pairs * B)
  const A grad_scale = inv_ts / static_cast<A>(n_pairs * B);
  const bool need_sum = teacher_sum != nullptr;
  if (need_sum) std::fill(teacher_sum, teacher_sum + K, 0.0f);

  double total = 0.0, probe = 0.0;
  const Isa isa = row_isa();
  const int n_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), B)));
#pragma omp parallel num_threads(n_threads) reduction(+ : total, probe)
  {
    thread_local Scratch<A> sc;
    sc.prepare(n_global, K, need_sum);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < n_global; ++i) {
        probe += static_cast<double>(teacher_row<T, A>(isa, teacher + (i * B + b) * K, center, K, inv_tt,
                                                       sc.probs.data() + i * K, sc.tile_max.data(),
                                                       need_sum ? sc.teacher_sum.data() : nullptr));
      }
      if (n_crops > n_global) {  // crops the teacher never sees pair with every teacher view
        std::fill(sc.probs_all.begin(), sc.probs_all.end(), A(0));
        for (int64_t i = 0; i < n_global; ++i) {
          const A* q = sc.probs.data() + i * K;
          A* acc = sc.probs_all.data();
#pragma omp simd
          for (int64_t c = 0; c < K; ++c) acc[c] += q[c];
        }
      }
      for (int64_t v = 0; v < n_crops; ++v) {
        const A* target;
        if (v >= n_global) {
          target = sc.probs_all.data();
        } else if (n_global == 1) {
          continue;  // the only teacher view is this crop: no pair
        } else if (n_global == 2) {
          target = sc.probs.data() + (1 - v) * K;
        } else {
          std::fill(sc.target.begin(), sc.target.end(), A(0));
          for (int64_t i = 0; i < n_global; ++i) {
            if (i == v) continue;
            const A* q = sc.probs.data() + i * K;
            A* acc = sc.target.data();
#pragma omp simd
            for (int64_t c = 0; c < K; ++c) acc[c] += q[c];
          }
          target = sc.target.data();
        }
        const int64_t row = (v * B + b) * K;
        const StudentRowOut r = student_row<T, A>(isa, student + row, target, K, inv_ts, sc.expo.data(),
                                                  sc.tile_max.data(), grad ? grad + row : nullptr, grad_scale);
        total += r.loss;
        probe += r.probe;
      }
      if (grad != nullptr && n_global == 1) {  // crop 0 has no pair: zero gradient
        for (int64_t c = 0; c < K; ++c) store(grad + b * K + c, A(0));
      }
    }
    if (need_sum) {
#pragma omp critical
      for (int64_t c = 0; c < K; ++c) teacher_sum[c] += sc.teacher_sum[c];
    }
  }
  DinoLossResult result;
  result.loss = total / static_cast<double>(n_pairs * B);
  result.non_finite = !(probe == 0.0);
  return result;
}

template DinoLossResult dino_loss_forward<float>(const DinoLossProblem&, const float*, const float*,
                                                 const float*, float*, float*);
template DinoLossResult dino_loss_forward<double>(const DinoLossProblem&, const double*, const double*,
                                                  const double*, double*, float*);
template DinoLossResult dino_loss_forward<BFloat16Bits>(const DinoLossProblem&, const BFloat16Bits*,
                                                        const BFloat16Bits*, const float*, BFloat16Bits*,
                                                        float*);

}  // namespace cpu
}  // namespace dinocxr

// Fused DINO loss on CUDA (math: dinocxr_fast/ops/dino_loss.py).
//
// 1. teacher_stats: one block per teacher row, online max/sum of (t - c) / tau_t.
// 2. student_rows:  one block per student row; the paired target T_v = sum_{i != v} q_i is rebuilt
//    on the fly from the teacher rows and their stats (never stored), one online max/sum pass over
//    the student row gives the loss term, a second pass writes the gradient.
// 3. finalize: deterministic sum of the per-row losses.
// 4. column_sums: teacher column sums for the centre EMA (coalesced, one thread per column).
#include "dino_loss.cuh"

#include <cuda_bf16.h>
#include <math_constants.h>

namespace dinocxr {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// Online softmax state: max m, sum s = sum exp(x - m), and for the student also
// w = sum T and d = sum T * (x - m) (kept against the running max to avoid cancellation).
struct State {
  float m, s, w, d;
};

__device__ __forceinline__ State empty_state() { return {-CUDART_INF_F, 0.f, 0.f, 0.f}; }

__device__ __forceinline__ State merge(State a, State b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -CUDART_INF_F) return {m, 0.f, a.w + b.w, a.d + b.d};
  const float fa = a.m == -CUDART_INF_F ? 0.f : __expf(a.m - m);
  const float fb = b.m == -CUDART_INF_F ? 0.f : __expf(b.m - m);
  const float da = a.m == -CUDART_INF_F ? a.d : a.d + a.w * (a.m - m);
  const float db = b.m == -CUDART_INF_F ? b.d : b.d + b.w * (b.m - m);
  return {m, a.s * fa + b.s * fb, a.w + b.w, da + db};
}

__device__ __forceinline__ State push(State st, float x, float target) {
  if (x > st.m) {
    const float f = st.m == -CUDART_INF_F ? 0.f : __expf(st.m - x);
    st.d += st.w * (st.m == -CUDART_INF_F ? 0.f : st.m - x);
    st.s = st.s * f + 1.f;
    st.m = x;
  } else {
    st.s += __expf(x - st.m);
  }
  st.w += target;
  st.d += target * (x - st.m);
  return st;
}

__device__ State block_merge(State st) {
  __shared__ State shared[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) {
    State o;
    o.m = __shfl_xor_sync(0xffffffffu, st.m, offset);
    o.s = __shfl_xor_sync(0xffffffffu, st.s, offset);
    o.w = __shfl_xor_sync(0xffffffffu, st.w, offset);
    o.d = __shfl_xor_sync(0xffffffffu, st.d, offset);
    st = merge(st, o);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kThreads / 32 ? shared[lane] : empty_state();
    for (int offset = 16; offset > 0; offset >>= 1) {
      State o;
      o.m = __shfl_xor_sync(0xffffffffu, st.m, offset);
      o.s = __shfl_xor_sync(0xffffffffu, st.s, offset);
      o.w = __shfl_xor_sync(0xffffffffu, st.w, offset);
      o.d = __shfl_xor_sync(0xffffffffu, st.d, offset);
      st = merge(st, o);
    }
    if (lane == 0) shared[0] = st;
  }
  __syncthreads();
  const State out = shared[0];
  __syncthreads();
  return out;
}

struct Workspace {
  float2* teacher_stats;  // (max, 1 / sum) per teacher row, in units of (t - c) / tau_t
  float* row_loss;        // per student row
  int* non_finite;
};

__host__ __device__ inline size_t align256(size_t n) { return (n + 255) & ~size_t(255); }

Workspace carve(const DinoLossProblem& p, void* base) {
  char* ptr = static_cast<char*>(base);
  Workspace ws;
  ws.teacher_stats = reinterpret_cast<float2*>(ptr);
  ptr += align256(sizeof(float2) * p.n_global * p.batch);
  ws.row_loss = reinterpret_cast<float*>(ptr);
  ptr += align256(sizeof(float) * p.n_crops * p.batch);
  ws.non_finite = reinterpret_cast<int*>(ptr);
  return ws;
}

template <typename T>
__global__ void teacher_stats(const T* __restrict__ teacher, const float* __restrict__ center, int64_t k,
                              float inv_tt, float2* __restrict__ stats, int* __restrict__ non_finite) {
  const T* row = teacher + blockIdx.x * k;
  State st = empty_state();
  bool bad = false;
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    const float t = to_float(row[i]);
    bad |= !isfinite(t);
    st = push(st, (t - center[i]) * inv_tt, 0.f);
  }
  if (bad) atomicOr(non_finite, 1);
  st = block_merge(st);
  if (threadIdx.x == 0) stats[blockIdx.x] = make_float2(st.m, 1.f / st.s);
}

// Target of student crop v at column i: sum of the teacher probabilities of every other view.
template <typename T>
__device__ __forceinline__ float target_at(const T* __restrict__ teacher, const float* __restrict__ center,
                                           const float2* __restrict__ stats, int64_t b, int64_t v, int64_t i,
                                           const DinoLossProblem& p) {
  float acc = 0.f;
  const float c = center[i];
  for (int64_t g = 0; g < p.n_global; ++g) {
    if (g == v) continue;
    const int64_t r = g * p.batch + b;
    const float2 st = stats[r];
    acc += __expf((to_float(teacher[r * p.k + i]) - c) * p.inv_teacher_temp - st.x) * st.y;
  }
  return acc;
}

template <typename T>
__global__ void student_rows(DinoLossProblem p, const T* __restrict__ student, const T* __restrict__ teacher,
                             const float* __restrict__ center, const float2* __restrict__ stats,
                             float* __restrict__ row_loss, T* __restrict__ grad, float grad_scale,
                             int* __restrict__ non_finite) {
  const int64_t row = blockIdx.x, v = row / p.batch, b = row % p.batch;
  const T* s = student + row * p.k;
  State st = empty_state();
  bool bad = false;
  for (int64_t i = threadIdx.x; i < p.k; i += blockDim.x) {
    const float x = to_float(s[i]);
    bad |= !isfinite(x);
    st = push(st, x * p.inv_student_temp, target_at(teacher, center, stats, b, v, i, p));
  }
  if (bad) atomicOr(non_finite, 1);
  st = block_merge(st);
  // sum_k -T_k log_softmax_k = W log(sum) - sum_k T_k (x_k - m)
  if (threadIdx.x == 0) row_loss[row] = st.w * logf(st.s) - st.d;
  if (grad == nullptr) return;
  T* g = grad + row * p.k;
  const float inv_sum = 1.f / st.s;
  for (int64_t i = threadIdx.x; i < p.k; i += blockDim.x) {
    const float x = to_float(s[i]) * p.inv_student_temp;
    const float prob = __expf(x - st.m) * inv_sum;
    g[i] = from_float<T>(grad_scale * (st.w * prob - target_at(teacher, center, stats, b, v, i, p)));
  }
}

__global__ void finalize(const float* __restrict__ row_loss, int64_t rows, float inv_count,
                         const int* __restrict__ non_finite, float* __restrict__ loss) {
  __shared__ double partial[kThreads];
  double acc = 0.0;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) acc += row_loss[r];
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) *loss = *non_finite ? CUDART_NAN_F : static_cast<float>(partial[0] * inv_count);
}

template <typename T>
__global__ void column_sums(const T* __restrict__ teacher, int64_t rows, int64_t k, float* __restrict__ out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= k) return;
  float acc = 0.f;
  for (int64_t r = 0; r < rows; ++r) acc += to_float(teacher[r * k + i]);
  out[i] = acc;
}

template <typename T>
cudaError_t launch(const DinoLossProblem& p, const T* student, const T* teacher, const float* center,
                   float* loss, T* grad, float* teacher_sum, void* workspace, cudaStream_t stream) {
  const Workspace ws = carve(p, workspace);
  cudaError_t err = cudaMemsetAsync(ws.non_finite, 0, sizeof(int), stream);
  if (err != cudaSuccess) return err;
  const int64_t teacher_rows = p.n_global * p.batch, student_rows_n = p.n_crops * p.batch;
  teacher_stats<T><<<teacher_rows, kThreads, 0, stream>>>(teacher, center, p.k, p.inv_teacher_temp,
                                                          ws.teacher_stats, ws.non_finite);
  const int64_t n_pairs = p.n_global * (p.n_crops - 1);
  const float grad_scale = p.inv_student_temp / static_cast<float>(n_pairs * p.batch);
  student_rows<T><<<student_rows_n, kThreads, 0, stream>>>(p, student, teacher, center, ws.teacher_stats,
                                                           ws.row_loss, grad, grad_scale, ws.non_finite);
  finalize<<<1, kThreads, 0, stream>>>(ws.row_loss, student_rows_n, 1.f / static_cast<float>(n_pairs * p.batch),
                                       ws.non_finite, loss);
  if (teacher_sum != nullptr) {
    const int64_t blocks = (p.k + kThreads - 1) / kThreads;
    column_sums<T><<<blocks, kThreads, 0, stream>>>(teacher, teacher_rows, p.k, teacher_sum);
  }
  return cudaGetLastError();
}

}  // namespace

size_t dino_loss_workspace_bytes(const DinoLossProblem& p) {
  return align256(sizeof(float2) * p.n_global * p.batch) + align256(sizeof(float) * p.n_crops * p.batch) +
         align256(sizeof(int));
}

cudaError_t dino_loss_forward_f32(const DinoLossProblem& p, const float* student, const float* teacher,
                                  const float* center, float* loss, float* grad, float* teacher_sum,
                                  void* workspace, cudaStream_t stream) {
  return launch<float>(p, student, teacher, center, loss, grad, teacher_sum, workspace, stream);
}

cudaError_t dino_loss_forward_bf16(const DinoLossProblem& p, const uint16_t* student, const uint16_t* teacher,
                                   const float* center, float* loss, uint16_t* grad, float* teacher_sum,
                                   void* workspace, cudaStream_t stream) {
  return launch<__nv_bfloat16>(p, reinterpret_cast<const __nv_bfloat16*>(student),
                               reinterpret_cast<const __nv_bfloat16*>(teacher), center, loss,
                               reinterpret_cast<__nv_bfloat16*>(grad), teacher_sum, workspace, stream);
}

}  // namespace cuda
}  // namespace dinocxr

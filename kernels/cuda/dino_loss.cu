// Fused DINO loss on CUDA (math: dinocxr_fast/ops/dino_loss.py).
//
// 1. teacher_pass: one block per 256-column chunk, all teacher rows. Per (row, chunk) the online
//    softmax partials (max, sum exp) of (t - c) / tau_t, and the column sums of the raw teacher for
//    the centre EMA, from one read of the teacher (coalesced vector loads, warp shuffles; the
//    column sums are reduced across warps in a fixed order, so they are deterministic).
// 2. student_pass: one block per student row, ordered so that the crops of one sample run side by
//    side and share their teacher rows in L2. The block first merges its teacher rows' partials.
//    Sweep 1 reads the row once from HBM (streaming loads), keeps it in shared memory when it fits
//    (bf16/fp16 K=65536 is 128 KB) and computes max and sum exp of s / tau_s. Sweep 2 runs on that
//    copy: the paired target T_v = sum_{g != v} q_g is rebuilt on the fly from the teacher rows
//    (never stored), and the gradient, sum T and sum T (x - m) come out of the same sweep. The
//    gradient uses W_v = sum_k T_v[k] = (number of paired teacher views) exactly, which is what
//    makes a single sweep possible; the loss uses the accumulated sum.
// 3. finalize: deterministic sum of the per-row losses.
#include "common.cuh"
#include "dino_loss.cuh"

#include <math_constants.h>

namespace dinocxr {
namespace cuda {
namespace {

using detail::load_vec;
using detail::Pack;
using detail::RawVec;
using detail::to_float;

constexpr int kChunkCols = 256;   // columns per teacher_pass block
constexpr int kTeacherWarps = 8;  // teacher_pass block = 8 warps, each a subset of the rows
constexpr int kRowUnroll = 4;     // rows in flight per warp

struct MaxSum {
  float m, s;  // running max and sum of exp(x - m)
};

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -CUDART_INF_F) return {m, 0.f};
  // exp(-inf - m) is 0 for an empty side.
  return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

__device__ __forceinline__ MaxSum warp_merge(MaxSum st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    MaxSum o;
    o.m = __shfl_xor_sync(0xffffffffu, st.m, offset);
    o.s = __shfl_xor_sync(0xffffffffu, st.s, offset);
    st = merge(st, o);
  }
  return st;
}

// Max and sum exp of n values (all finite or -inf-free); {-inf, 0} when n == 0.
template <int N>
__device__ __forceinline__ MaxSum local_max_sum(const float (&u)[N], int n) {
  float m = -CUDART_INF_F;
#pragma unroll
  for (int i = 0; i < N; ++i)
    if (i < n) m = fmaxf(m, u[i]);
  float s = 0.f;
  if (m != -CUDART_INF_F) {
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (i < n) s += __expf(u[i] - m);
  }
  return {m, s};
}

// Loads VEC floats of `center` (fp32) at an index that is a multiple of VEC.
template <int VEC>
__device__ __forceinline__ void load_center(const float* __restrict__ c, float (&out)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int q = 0; q < VEC / 4; ++q) {
      const float4 f = __ldg(reinterpret_cast<const float4*>(c) + q);
      out[4 * q] = f.x, out[4 * q + 1] = f.y, out[4 * q + 2] = f.z, out[4 * q + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = __ldg(c + i);
  }
}

// ---- 1. teacher softmax partials and column sums --------------------------------------------
// Lane `l` owns the columns c0 + j*32*VEC + l*VEC + e (j < 8/VEC, e < VEC): each j is one
// coalesced access of the warp. With VEC > 1 the host guarantees K % VEC == 0, so a vector is
// either wholly inside the row or wholly past its end.
template <typename T, int VEC>
__global__ void __launch_bounds__(kTeacherWarps * 32)
    teacher_pass(const T* __restrict__ teacher, const float* __restrict__ center, int64_t rows, int64_t k,
                 float inv_tt, float2* __restrict__ partials, int64_t n_chunks, float* __restrict__ col_sum,
                 int* __restrict__ non_finite) {
  constexpr int kPerLane = kChunkCols / 32;
  constexpr int kVecs = kPerLane / VEC;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t chunk = blockIdx.x;
  const int64_t c0 = chunk * kChunkCols;

  float cen[kPerLane], csum[kPerLane];
  int n_valid = 0;  // this lane's in-range vectors: a prefix of j
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int64_t col = c0 + j * 32 * VEC + lane * VEC;
    if (col < k) n_valid = j + 1;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      cen[j * VEC + e] = col + e < k ? __ldg(center + col + e) : 0.f;
      csum[j * VEC + e] = 0.f;
    }
  }

  bool bad = false;
  // kRowUnroll rows per warp and step: their loads are issued together (a warp-uniform loop, so
  // the shuffles inside stay convergent).
  for (int64_t r0 = warp; r0 < rows; r0 += static_cast<int64_t>(kTeacherWarps) * kRowUnroll) {
    float t[kRowUnroll][kPerLane];
#pragma unroll
    for (int q = 0; q < kRowUnroll; ++q) {
      const int64_t r = r0 + q * kTeacherWarps;
#pragma unroll
      for (int j = 0; j < kVecs; ++j) {
        float v[VEC];
        if (r < rows && j < n_valid) {
          load_vec<T, VEC>(teacher + r * k + c0 + j * 32 * VEC + lane * VEC, v);
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) v[e] = 0.f;
        }
#pragma unroll
        for (int e = 0; e < VEC; ++e) t[q][j * VEC + e] = v[e];
      }
    }
#pragma unroll
    for (int q = 0; q < kRowUnroll; ++q) {
      const int64_t r = r0 + q * kTeacherWarps;
      if (r >= rows) break;
      float u[kPerLane];
#pragma unroll
      for (int j = 0; j < kVecs; ++j) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const int i = j * VEC + e;
          if (j < n_valid) {
            bad |= !isfinite(t[q][i]);
            csum[i] += t[q][i];
            u[i] = (t[q][i] - cen[i]) * inv_tt;
          } else {
            u[i] = -CUDART_INF_F;  // never read: past n_valid
          }
        }
      }
      const MaxSum st = warp_merge(local_max_sum(u, n_valid * VEC));
      if (lane == 0) partials[r * n_chunks + chunk] = make_float2(st.m, st.s);
    }
  }
  if (bad) atomicOr(non_finite, 1);

  if (col_sum != nullptr) {
    __shared__ float sums[kTeacherWarps][kChunkCols];
#pragma unroll
    for (int j = 0; j < kVecs; ++j)
#pragma unroll
      for (int e = 0; e < VEC; ++e) sums[warp][j * 32 * VEC + lane * VEC + e] = csum[j * VEC + e];
    __syncthreads();
    for (int c = threadIdx.x; c < kChunkCols; c += blockDim.x) {
      float acc = 0.f;
#pragma unroll
      for (int w = 0; w < kTeacherWarps; ++w) acc += sums[w][c];  // fixed order: deterministic
      if (c0 + c < k) col_sum[c0 + c] = acc;
    }
  }
}

// ---- block reductions for student_pass (blockDim.x a multiple of 32, at most 1024) ----------
__device__ MaxSum block_merge(MaxSum st, float* sm, float* ss) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  st = warp_merge(st);
  if (lane == 0) sm[warp] = st.m, ss[warp] = st.s;
  __syncthreads();
  if (warp == 0) {
    MaxSum w = lane < n_warps ? MaxSum{sm[lane], ss[lane]} : MaxSum{-CUDART_INF_F, 0.f};
    w = warp_merge(w);
    if (lane == 0) sm[0] = w.m, ss[0] = w.s;
  }
  __syncthreads();
  const MaxSum out{sm[0], ss[0]};
  __syncthreads();  // the buffers are reused by the next reduction
  return out;
}

__device__ float2 block_sum2(float a, float b, float* sa, float* sb) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  a = detail::warp_sum(a);
  b = detail::warp_sum(b);
  if (lane == 0) sa[warp] = a, sb[warp] = b;
  __syncthreads();
  float2 out = make_float2(0.f, 0.f);
  if (warp == 0) {
    a = lane < n_warps ? sa[lane] : 0.f;
    b = lane < n_warps ? sb[lane] : 0.f;
    out = make_float2(detail::warp_sum(a), detail::warp_sum(b));
  }
  return out;  // valid in thread 0
}

// ---- 2. one block per student row -----------------------------------------------------------
template <typename T, int VEC, bool CACHE>
__global__ void __launch_bounds__(1024, 1)
    student_pass(DinoLossProblem p, const T* __restrict__ student, const T* __restrict__ teacher,
                 const float* __restrict__ center, const float2* __restrict__ partials, int64_t n_chunks,
                 size_t cache_bytes, float* __restrict__ row_loss, T* __restrict__ grad, float grad_scale,
                 int* __restrict__ non_finite) {
  using Raw = typename RawVec<sizeof(T) * VEC>::type;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float red_a[32], red_b[32];
  Raw* cache = reinterpret_cast<Raw*>(smem);                        // the row, when CACHE
  float2* tstats = reinterpret_cast<float2*>(smem + cache_bytes);  // per teacher view: (max, 1/sum)

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  const int64_t b = blockIdx.x / p.n_crops, v = blockIdx.x % p.n_crops;
  const int64_t row = v * p.batch + b;
  const int64_t k = p.k;

  // Teacher statistics of sample b, one warp per view.
  for (int64_t g = warp; g < p.n_global; g += n_warps) {
    const float2* part = partials + (g * p.batch + b) * n_chunks;
    MaxSum st{-CUDART_INF_F, 0.f};
    for (int64_t c = lane; c < n_chunks; c += 32) {
      const float2 q = part[c];
      st = merge(st, MaxSum{q.x, q.y});
    }
    st = warp_merge(st);
    if (lane == 0) tstats[g] = make_float2(st.m, 1.f / st.s);
  }

  // Sweep 1: max and sum exp of x / tau_s; the row is read from HBM once.
  const T* srow = student + row * k;
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;
  MaxSum st{-CUDART_INF_F, 0.f};
  bool bad = false;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * VEC; i < k; i += step) {
    Pack<T, VEC> pack;
    const Raw raw = CACHE ? __ldcs(reinterpret_cast<const Raw*>(srow + i)) : *reinterpret_cast<const Raw*>(srow + i);
    *reinterpret_cast<Raw*>(&pack) = raw;
    if (CACHE) cache[i / VEC] = raw;
    float xs[VEC];
    float m = -CUDART_INF_F;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float x = to_float(pack.v[e]);
      bad |= !isfinite(x);
      xs[e] = x * p.inv_student_temp;
      m = fmaxf(m, xs[e]);
    }
    if (m > st.m) {  // rescale the running sum once per vector, not once per element
      st.s = st.m == -CUDART_INF_F ? 0.f : st.s * __expf(st.m - m);
      st.m = m;
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) st.s += __expf(xs[e] - st.m);
  }
  if (bad) atomicOr(non_finite, 1);
  st = block_merge(st, red_a, red_b);  // its barriers also publish tstats and the cached row
  const float m = st.m, inv_sum = 1.f / st.s;

  // Sweep 2: targets, gradient and the loss terms, from the cached row.
  const float w_v = static_cast<float>(p.n_global - (v < p.n_global ? 1 : 0));
  T* grow = grad == nullptr ? nullptr : grad + row * k;
  float w_acc = 0.f, d_acc = 0.f;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * VEC; i < k; i += step) {
    Pack<T, VEC> pack;
    *reinterpret_cast<Raw*>(&pack) = CACHE ? cache[i / VEC] : *reinterpret_cast<const Raw*>(srow + i);
    float cen[VEC], tgt[VEC];
    load_center<VEC>(center + i, cen);
#pragma unroll
    for (int e = 0; e < VEC; ++e) tgt[e] = 0.f;
    for (int64_t g = 0; g < p.n_global; ++g) {
      if (g == v) continue;
      const float2 ts = tstats[g];
      float t[VEC];
      load_vec<T, VEC>(teacher + (g * p.batch + b) * k + i, t);
#pragma unroll
      for (int e = 0; e < VEC; ++e) tgt[e] += __expf((t[e] - cen[e]) * p.inv_teacher_temp - ts.x) * ts.y;
    }
    float out[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float xm = to_float(pack.v[e]) * p.inv_student_temp - m;
      w_acc += tgt[e];
      d_acc += tgt[e] * xm;
      out[e] = grad_scale * (w_v * __expf(xm) * inv_sum - tgt[e]);
    }
    if (grow != nullptr) detail::store_vec_stream<T, VEC>(grow + i, out);
  }
  const float2 wd = block_sum2(w_acc, d_acc, red_a, red_b);
  // sum_k -T_k log_softmax_k = W log(sum) - sum_k T_k (x_k - m)
  if (threadIdx.x == 0) row_loss[row] = wd.x * logf(st.s) - wd.y;
}

// ---- 3. loss ----------------------------------------------------------------------------------
__global__ void finalize(const float* __restrict__ row_loss, int64_t rows, float inv_count,
                         const int* __restrict__ non_finite, float* __restrict__ loss) {
  constexpr int kThreads = 256;
  __shared__ double partial[kThreads];
  double acc = 0.0;
  for (int64_t r = threadIdx.x; r < rows; r += kThreads) acc += row_loss[r];
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) *loss = *non_finite ? CUDART_NAN_F : static_cast<float>(partial[0] * inv_count);
}

// ---- host side -------------------------------------------------------------------------------
struct Workspace {
  float2* partials;  // [n_global * batch][n_chunks]
  float* row_loss;   // [n_crops * batch]
  int* non_finite;
};

inline size_t align256(size_t n) { return (n + 255) & ~size_t(255); }
inline size_t align16(size_t n) { return (n + 15) & ~size_t(15); }
inline int64_t n_chunks_of(const DinoLossProblem& p) { return (p.k + kChunkCols - 1) / kChunkCols; }

Workspace carve(const DinoLossProblem& p, void* base) {
  char* ptr = static_cast<char*>(base);
  Workspace ws;
  ws.partials = reinterpret_cast<float2*>(ptr);
  ptr += align256(sizeof(float2) * p.n_global * p.batch * n_chunks_of(p));
  ws.row_loss = reinterpret_cast<float*>(ptr);
  ptr += align256(sizeof(float) * p.n_crops * p.batch);
  ws.non_finite = reinterpret_cast<int*>(ptr);
  return ws;
}

bool aligned16(const void* ptr) { return ptr == nullptr || (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

template <typename T, int VEC, bool CACHE>
cudaError_t launch_student(const DinoLossProblem& p, const T* student, const T* teacher, const float* center,
                           const Workspace& ws, int64_t n_chunks, T* grad, float grad_scale, size_t cache_bytes,
                           cudaStream_t stream) {
  const size_t smem = cache_bytes + sizeof(float2) * p.n_global;
  auto kernel = student_pass<T, VEC, CACHE>;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  // One block per SM when the row is cached (its shared memory allows no second one): give it
  // 1024 threads to keep enough loads in flight. Short rows get fewer threads.
  const int64_t vectors = (p.k + VEC - 1) / VEC;
  int threads = CACHE ? 1024 : 512;
  while (threads > 32 && threads / 2 >= vectors) threads /= 2;
  kernel<<<static_cast<unsigned>(p.n_crops * p.batch), threads, smem, stream>>>(
      p, student, teacher, center, ws.partials, n_chunks, cache_bytes, ws.row_loss, grad, grad_scale,
      ws.non_finite);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t launch_vec(const DinoLossProblem& p, const T* student, const T* teacher, const float* center,
                       float* loss, T* grad, float* teacher_sum, const Workspace& ws, cudaStream_t stream) {
  const int64_t n_chunks = n_chunks_of(p);
  teacher_pass<T, VEC><<<static_cast<unsigned>(n_chunks), kTeacherWarps * 32, 0, stream>>>(
      teacher, center, p.n_global * p.batch, p.k, p.inv_teacher_temp, ws.partials, n_chunks, teacher_sum,
      ws.non_finite);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const int64_t n_pairs = p.n_global * (p.n_crops - 1);
  const float grad_scale = p.inv_student_temp / static_cast<float>(n_pairs * p.batch);
  int device = 0, max_smem = 0;
  if ((err = cudaGetDevice(&device)) != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device)) != cudaSuccess)
    return err;
  const size_t cache_bytes = align16(sizeof(T) * p.k);
  const size_t stats_bytes = sizeof(float2) * p.n_global;
  // The opt-in limit covers static shared memory too (the reductions' 256 bytes): keep a margin.
  const size_t limit = max_smem > 1024 ? static_cast<size_t>(max_smem) - 1024 : 0;
  if (cache_bytes + stats_bytes <= limit) {
    err = launch_student<T, VEC, true>(p, student, teacher, center, ws, n_chunks, grad, grad_scale, cache_bytes,
                                       stream);
  } else if (stats_bytes <= limit) {
    err = launch_student<T, VEC, false>(p, student, teacher, center, ws, n_chunks, grad, grad_scale, 0, stream);
  } else {
    return cudaErrorInvalidValue;  // n_global in the hundreds of thousands
  }
  if (err != cudaSuccess) return err;
  finalize<<<1, 256, 0, stream>>>(ws.row_loss, p.n_crops * p.batch, 1.f / static_cast<float>(n_pairs * p.batch),
                                  ws.non_finite, loss);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(const DinoLossProblem& p, const T* student, const T* teacher, const float* center, float* loss,
                   T* grad, float* teacher_sum, void* workspace, cudaStream_t stream) {
  if (p.batch < 1 || p.k < 1 || p.n_global < 1 || p.n_crops < 2 || p.n_crops < p.n_global ||
      p.n_crops * p.batch > 0x7fffffff || n_chunks_of(p) > 0x7fffffff)
    return cudaErrorInvalidValue;
  const Workspace ws = carve(p, workspace);
  cudaError_t err = cudaMemsetAsync(ws.non_finite, 0, sizeof(int), stream);
  if (err != cudaSuccess) return err;
  // 16-byte vectors need every row start aligned: K * sizeof(T) a multiple of 16, aligned bases.
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = p.k % kVec == 0 && aligned16(student) && aligned16(teacher) && aligned16(center) &&
                   aligned16(grad);
  if (vec) return launch_vec<T, kVec>(p, student, teacher, center, loss, grad, teacher_sum, ws, stream);
  return launch_vec<T, 1>(p, student, teacher, center, loss, grad, teacher_sum, ws, stream);
}

}  // namespace

size_t dino_loss_workspace_bytes(const DinoLossProblem& p) {
  return align256(sizeof(float2) * p.n_global * p.batch * n_chunks_of(p)) +
         align256(sizeof(float) * p.n_crops * p.batch) + align256(sizeof(int));
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

cudaError_t dino_loss_forward_f16(const DinoLossProblem& p, const uint16_t* student, const uint16_t* teacher,
                                  const float* center, float* loss, uint16_t* grad, float* teacher_sum,
                                  void* workspace, cudaStream_t stream) {
  return launch<__half>(p, reinterpret_cast<const __half*>(student), reinterpret_cast<const __half*>(teacher),
                        center, loss, reinterpret_cast<__half*>(grad), teacher_sum, workspace, stream);
}

}  // namespace cuda
}  // namespace dinocxr

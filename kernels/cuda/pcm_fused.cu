// The whole PCM of a grouped ViTAEv2 cell at inference in one kernel:
//   a1 = silu(conv1(x) * s1 + t1), a2 = silu(conv2(a1) * s2 + t2), out = conv3(a2) * s3 + t3
// (BatchNorm folded into the per-channel affine maps on the host). All three convs have the same
// groups, so group g of the output depends only on group g of the input: one block holds a sample's
// whole image for a few groups in shared memory (zero-padded borders, so the inner loops have no
// bounds checks), runs the three convs there and writes only the output. x is read once and out
// written once; a1 (4x wider in normal cells) and a2 never reach global memory.
#include "conv3x3.cuh"
#include "conv_common.cuh"
#include "conv_internal.cuh"

namespace dinocxr {
namespace cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;
constexpr int kCoT = 4;  // outputs per thread
constexpr int kPx = 4;   // positions per thread along x
constexpr size_t kSmemBudget = 96 * 1024;

struct Layout {
  int a0, a1, a2, a3;  // channels per group along the chain
  int h1, w1;          // output grid of every conv after the first
  int hp0, wp0, hp1, wp1;
  size_t x_off, a1_off, a2_off, w1_off, w2_off, w3_off, total;
};

__host__ __device__ inline size_t round16(size_t n) { return (n + 15) & ~size_t(15); }

__host__ __device__ inline Layout make_layout(const PcmChain& c, int gb, size_t esz) {
  Layout l;
  l.a0 = c.c0 / c.groups, l.a1 = c.c1 / c.groups, l.a2 = c.c2 / c.groups, l.a3 = c.c3 / c.groups;
  l.h1 = (c.in_h - 1) / c.stride1 + 1, l.w1 = (c.in_w - 1) / c.stride1 + 1;
  l.hp0 = c.in_h + 2, l.wp0 = c.in_w + 2, l.hp1 = l.h1 + 2, l.wp1 = l.w1 + 2;
  size_t off = 0;
  l.x_off = off;
  off = round16(off + static_cast<size_t>(l.hp0) * l.wp0 * gb * l.a0 * esz);
  l.a1_off = off;
  off = round16(off + static_cast<size_t>(l.hp1) * l.wp1 * gb * l.a1 * esz);
  l.a2_off = off;
  off = round16(off + static_cast<size_t>(l.hp1) * l.wp1 * gb * l.a2 * esz);
  l.w1_off = off;
  off = round16(off + static_cast<size_t>(gb) * l.a0 * 9 * l.a1 * sizeof(float));
  l.w2_off = off;
  off = round16(off + static_cast<size_t>(gb) * l.a1 * 9 * l.a2 * sizeof(float));
  l.w3_off = off;
  off = round16(off + static_cast<size_t>(gb) * l.a2 * 9 * l.a3 * sizeof(float));
  l.total = off;
  return l;
}

// Weights [c_out][9][cin_g] of the block's groups -> shared [g][ci][tap][co] (fp32), so a thread's
// kCoT consecutive outputs are one 16-byte load.
template <typename T>
__device__ void load_weights(const T* __restrict__ w, float* dst, int g_lo, int ng, int a_in, int a_out) {
  const int n = ng * a_in * 9 * a_out;
  for (int e = threadIdx.x; e < n; e += blockDim.x) {
    const int co = e % a_out;
    int r = e / a_out;
    const int t = r % 9;
    r /= 9;
    const int ci = r % a_in, g = r / a_in;
    dst[e] = to_float(w[(static_cast<int64_t>((g_lo + g) * a_out + co) * 9 + t) * a_in + ci]);
  }
}

// One conv of the chain from a zero-padded shared tile. Items: (row, run of kPx positions, group,
// slice of kCoT outputs), slices fastest so a warp reads one pixel's channels and writes contiguous
// output channels.
template <typename T, bool TO_GLOBAL>
__device__ void conv_phase(const T* src, int src_wp, int src_cpp, int a_in, int stride, const float* wsm, int a_out,
                           int ng, int g_lo, int out_h, int out_w, const float* __restrict__ scale,
                           const float* __restrict__ shift, bool act, T* dst, int dst_wp, int dst_cpp,
                           T* __restrict__ gout, int64_t gout_pix0, int gout_c) {
  const int slices = a_out / kCoT, runs = (out_w + kPx - 1) / kPx;
  const int n_items = out_h * runs * ng * slices;
  for (int it = threadIdx.x; it < n_items; it += blockDim.x) {
    const int cs = it % slices;
    int r = it / slices;
    const int g = r % ng;
    r /= ng;
    const int x0 = (r % runs) * kPx, y = r / runs;
    int col[kPx];  // padded source column of tap kw = 0; clamped past the row end (results unused)
#pragma unroll
    for (int px = 0; px < kPx; ++px) col[px] = (x0 + px < out_w ? x0 + px : out_w - 1) * stride;
    float acc[kPx][kCoT];
#pragma unroll
    for (int px = 0; px < kPx; ++px)
#pragma unroll
      for (int j = 0; j < kCoT; ++j) acc[px][j] = 0.f;
    const T* sp = src + g * a_in;
    const float* wp = wsm + static_cast<size_t>(g) * a_in * 9 * a_out + cs * kCoT;
    for (int ci = 0; ci < a_in; ci += 4) {
#pragma unroll
      for (int kh = 0; kh < 3; ++kh) {
        const T* row = sp + static_cast<size_t>(y * stride + kh) * src_wp * src_cpp + ci;
#pragma unroll
        for (int kw = 0; kw < 3; ++kw) {
          float xv[kPx][4];
#pragma unroll
          for (int px = 0; px < kPx; ++px) load_vec<T, 4>(row + (col[px] + kw) * src_cpp, xv[px]);
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            float wv[kCoT];
            load_vec<float, kCoT>(wp + ((ci + u) * 9 + kh * 3 + kw) * a_out, wv);
#pragma unroll
            for (int px = 0; px < kPx; ++px)
#pragma unroll
              for (int j = 0; j < kCoT; ++j) acc[px][j] = fmaf(xv[px][u], wv[j], acc[px][j]);
          }
        }
      }
    }
    const int ch = (g_lo + g) * a_out + cs * kCoT;  // channel of the conv's full output
#pragma unroll
    for (int px = 0; px < kPx; ++px) {
      const int x = x0 + px;
      if (x >= out_w) continue;
      float v[kCoT];
#pragma unroll
      for (int j = 0; j < kCoT; ++j) {
        v[j] = acc[px][j] * ld_or(scale, ch + j, 1.f) + __ldg(shift + ch + j);
        if (act) v[j] = silu(v[j]);
      }
      if constexpr (TO_GLOBAL) {
        store_vec<T, kCoT>(gout + (gout_pix0 + static_cast<int64_t>(y) * out_w + x) * gout_c + ch, v);
      } else {
        store_vec<T, kCoT>(dst + (static_cast<size_t>(y + 1) * dst_wp + (x + 1)) * dst_cpp + g * a_out + cs * kCoT, v);
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    pcm_fused_kernel(PcmChain c, int gb, const T* __restrict__ x, const T* __restrict__ w1, const T* __restrict__ w2,
                     const T* __restrict__ w3, const float* __restrict__ s1, const float* __restrict__ t1,
                     const float* __restrict__ s2, const float* __restrict__ t2, const float* __restrict__ s3,
                     const float* __restrict__ t3, T* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Layout l = make_layout(c, gb, sizeof(T));
  const int g_lo = blockIdx.x * gb, ng = min(gb, c.groups - g_lo);
  const int b = blockIdx.y;
  T* xs = reinterpret_cast<T*>(smem + l.x_off);
  T* a1s = reinterpret_cast<T*>(smem + l.a1_off);
  T* a2s = reinterpret_cast<T*>(smem + l.a2_off);
  float* w1s = reinterpret_cast<float*>(smem + l.w1_off);
  float* w2s = reinterpret_cast<float*>(smem + l.w2_off);
  float* w3s = reinterpret_cast<float*>(smem + l.w3_off);

  // Zero the activation tiles (their borders are the convolutions' padding).
  for (size_t i = threadIdx.x; i < l.w1_off / 16; i += blockDim.x) reinterpret_cast<uint4*>(smem)[i] = make_uint4(0, 0, 0, 0);
  load_weights(w1, w1s, g_lo, ng, l.a0, l.a1);
  load_weights(w2, w2s, g_lo, ng, l.a1, l.a2);
  load_weights(w3, w3s, g_lo, ng, l.a2, l.a3);
  __syncthreads();
  // x's channels of the block's groups, 4 at a time (a0 % 4 == 0, 16-byte aligned x).
  const int vecs = ng * l.a0 / 4, cpp0 = gb * l.a0;
  for (int e = threadIdx.x; e < c.in_h * c.in_w * vecs; e += blockDim.x) {
    const int p = e / vecs, cc = (e % vecs) * 4;
    const int iy = p / c.in_w, ix = p % c.in_w;
    float v[4];
    load_vec<T, 4>(x + ((static_cast<int64_t>(b) * c.in_h + iy) * c.in_w + ix) * c.c0 + g_lo * l.a0 + cc, v);
    store_vec<T, 4>(xs + (static_cast<size_t>(iy + 1) * l.wp0 + ix + 1) * cpp0 + cc, v);
  }
  __syncthreads();
  conv_phase<T, false>(xs, l.wp0, cpp0, l.a0, c.stride1, w1s, l.a1, ng, g_lo, l.h1, l.w1, s1, t1, true, a1s, l.wp1,
                       gb * l.a1, nullptr, 0, 0);
  __syncthreads();
  conv_phase<T, false>(a1s, l.wp1, gb * l.a1, l.a1, 1, w2s, l.a2, ng, g_lo, l.h1, l.w1, s2, t2, true, a2s, l.wp1,
                       gb * l.a2, nullptr, 0, 0);
  __syncthreads();
  conv_phase<T, true>(a2s, l.wp1, gb * l.a2, l.a2, 1, w3s, l.a3, ng, g_lo, l.h1, l.w1, s3, t3, false, nullptr, 0, 0,
                      out, static_cast<int64_t>(b) * l.h1 * l.w1, c.c3);
}

}  // namespace

PcmFusedPlan pcm_fused_plan(const PcmChain& c, DType dt, const void* x, const void* out) {
  PcmFusedPlan plan;
  if (c.batch < 1 || c.in_h < 1 || c.in_w < 1 || c.groups < 1 || c.batch > 65535) {
    plan.reason = "sizes must be positive (and batch <= 65535)";
    return plan;
  }
  if (c.c0 % c.groups || c.c1 % c.groups || c.c2 % c.groups || c.c3 % c.groups) {
    plan.reason = "channels must be divisible by groups";
    return plan;
  }
  const int a[4] = {c.c0 / c.groups, c.c1 / c.groups, c.c2 / c.groups, c.c3 / c.groups};
  for (int v : a) {
    if (v < 4 || v % 4 != 0) {
      plan.reason = "the fused chain needs multiples of 4 channels per group";
      return plan;
    }
  }
  if (c.stride1 != 1 && c.stride1 != 2) {
    plan.reason = "the fused chain takes stride 1 or 2 in its first conv";
    return plan;
  }
  if (!internal::aligned(x, 16) || !internal::aligned(out, 16)) {
    plan.reason = "the fused chain needs 16-byte aligned tensors";
    return plan;
  }
  const size_t esz = internal::dtype_size(dt);
  size_t budget = static_cast<size_t>(device_max_smem_optin());
  budget = budget < kSmemBudget ? budget : kSmemBudget;
  int gb = 0;
  for (int g = c.groups; g >= 1; --g) {
    if (make_layout(c, g, esz).total <= budget) {
      gb = g;
      break;
    }
  }
  if (gb == 0) {
    plan.reason = "the image does not fit in shared memory for one group";
    return plan;
  }
  // Enough blocks to fill the GPU: fewer groups per block when the batch alone does not.
  const int sms = device_sm_count();
  while (gb > 1 && static_cast<int64_t>(c.batch) * ((c.groups + gb - 1) / gb) < 2LL * sms) gb = (gb + 1) / 2;
  plan.supported = true;
  plan.groups_per_block = gb;
  plan.smem_bytes = make_layout(c, gb, esz).total;
  return plan;
}

cudaError_t pcm_fused_inference(const PcmFusedPlan& plan, const PcmChain& c, DType dt, const void* x, const void* w1,
                                const void* w2, const void* w3, const float* s1, const float* t1, const float* s2,
                                const float* t2, const float* s3, const float* t3, void* out, cudaStream_t stream) {
  if (!plan.supported || plan.groups_per_block < 1 || t1 == nullptr || t2 == nullptr || t3 == nullptr ||
      s1 == nullptr || s2 == nullptr)
    return cudaErrorInvalidValue;
  const PcmFusedPlan check = pcm_fused_plan(c, dt, x, out);
  if (!check.supported || make_layout(c, plan.groups_per_block, internal::dtype_size(dt)).total != plan.smem_bytes)
    return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>((c.groups + plan.groups_per_block - 1) / plan.groups_per_block),
                  static_cast<unsigned>(c.batch));
  cudaError_t err;
#define DINOCXR_PCM(T)                                                                                          \
  do {                                                                                                          \
    auto kernel = pcm_fused_kernel<T>;                                                                          \
    if ((err = internal::allow_smem(kernel, plan.smem_bytes)) != cudaSuccess) return err;                      \
    kernel<<<grid, kThreads, plan.smem_bytes, stream>>>(                                                        \
        c, plan.groups_per_block, static_cast<const T*>(x), static_cast<const T*>(w1), static_cast<const T*>(w2), \
        static_cast<const T*>(w3), s1, t1, s2, t2, s3, t3, static_cast<T*>(out));                               \
  } while (0)
  if (dt == DType::kF32) DINOCXR_PCM(float);
  else if (dt == DType::kF16) DINOCXR_PCM(__half);
  else DINOCXR_PCM(__nv_bfloat16);
#undef DINOCXR_PCM
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dinocxr

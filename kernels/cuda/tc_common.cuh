// Pieces shared by the tensor-core convolution kernels (mma.sync in conv3x3_tc.cu, wgmma in
// conv3x3_wgmma.cu): cp.async, the in-shared-memory prologue, and the epilogue that turns a block's
// fp32 accumulators into the output tile (bias / folded BatchNorm + activation, BatchNorm
// statistics, or the SiLU backward), staged through shared memory for 16-byte coalesced stores.
// Internal to kernels/cuda.
#pragma once

#include "conv_common.cuh"

namespace dinocxr {
namespace cuda {
namespace detail {

// ---- PTX wrappers ---------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; valid == false writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#if defined(DINOCXR_CUDA_EMULATION)  // kernels/cuda/emulation: the CPU test harness
  emu::cp_async16(dst, src, valid);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(DINOCXR_CUDA_EMULATION)
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(DINOCXR_CUDA_EMULATION)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Applies the prologue to 8 consecutive channels (c0..c0+7) held in shared memory.
template <typename T>
__device__ __forceinline__ void prologue8(T* p, const Prologue& pro, int c0) {
  float v[8];
  load_vec<T, 8>(p, v);
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = silu(v[e] * __ldg(pro.scale + c0 + e) + __ldg(pro.shift + c0 + e));
  store_vec<T, 8>(p, v);
}

constexpr int kTcThreads = 256;

// acc[mi][ni][e] of this thread holds the block tile element
//   row = warp_m * MI * 16 + mi * 16 + gid + (e >= 2 ? 8 : 0),  col = col0 + ni * 8 + 2 * tig + (e & 1)
// (the mma.m16n8 accumulator layout; wgmma's m64nN layout is the same with one warp per 16 rows).
// Every thread of the block calls this (it synchronises); smem holds at least BM x (BN + 8) of T.
template <typename T, int BM, int BN, int MI, int NI, int WARPS_M>
__device__ __forceinline__ void tc_epilogue(const float (&acc)[MI][NI][4], int warp_m, int col0, const TapConv& c,
                                            T* __restrict__ out, const Epilogue& epi, int64_t m0, int n0, T* Cs,
                                            float2 (*red)[BN]) {
  constexpr int kThreads = kTcThreads;
  constexpr int kLdc = BN + 8;
  const int tid = threadIdx.x, lane = tid & 31;
  const int64_t grid_hw = static_cast<int64_t>(c.grid_h) * c.grid_w;
  const int64_t M = c.batch * grid_hw;
  const int gid = lane >> 2, tig = lane & 3;
  const bool stats = epi.kind != EpiKind::kAffineAct;
  float s1[NI][2], s2[NI][2];
#pragma unroll
  for (int ni = 0; ni < NI; ++ni) s1[ni][0] = s1[ni][1] = s2[ni][0] = s2[ni][1] = 0.f;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = warp_m * MI * 16 + mi * 16 + half * 8 + gid;
      const int64_t m = m0 + row;
      const bool row_ok = m < M;
      int64_t o = 0;  // output element offset of channel 0 at this position
      if (row_ok) {
        const int b = static_cast<int>(m / grid_hw), r = static_cast<int>(m % grid_hw);
        const int oy = (r / c.grid_w) * c.out_stride + c.out_y0, ox = (r % c.grid_w) * c.out_stride + c.out_x0;
        o = ((static_cast<int64_t>(b) * c.out_h + oy) * c.out_w + ox) * c.out_c;
      }
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
#pragma unroll
        for (int e2 = 0; e2 < 2; ++e2) {
          const int col = col0 + ni * 8 + tig * 2 + e2;
          const int n = n0 + col;
          const bool ok = row_ok && n < c.out_c;
          const int ch = n < c.out_c ? n : c.out_c - 1;
          const float a = acc[mi][ni][half * 2 + e2];
          float v;
          if (epi.kind == EpiKind::kSiluBackward) {
            const float y = ok ? to_float(static_cast<const T*>(epi.aux)[o + n]) : 0.f;
            const float z = y * __ldg(epi.z_scale + ch) + __ldg(epi.z_shift + ch);
            v = a * silu_grad(z);
            if (ok) {
              const float d = round_to<T>(v);
              s1[ni][e2] += d;
              s2[ni][e2] += d * (y * __ldg(epi.xh_scale + ch) + __ldg(epi.xh_shift + ch));
            }
          } else {
            v = a * ld_or(epi.scale, ch, 1.f) + ld_or(epi.shift, ch, 0.f);
            if (epi.kind == EpiKind::kStats) {
              if (ok) {
                const float r = round_to<T>(v) - ld_or(epi.ref, ch, 0.f);
                s1[ni][e2] += r;
                s2[ni][e2] += r * r;
              }
            } else {
              v = activate(v, epi.act);
            }
          }
          Cs[row * kLdc + col] = from_float<T>(v);
        }
      }
    }
  }
  if (stats) {
    // Reduce over the 8 row groups of the warp (lanes with equal tig), then over WARPS_M in order.
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int e2 = 0; e2 < 2; ++e2) {
        float a = s1[ni][e2], b = s2[ni][e2];
#pragma unroll
        for (int off = 4; off < 32; off <<= 1) {
          a += __shfl_xor_sync(0xffffffffu, a, off);
          b += __shfl_xor_sync(0xffffffffu, b, off);
        }
        if (gid == 0) red[warp_m][col0 + ni * 8 + tig * 2 + e2] = make_float2(a, b);
      }
  }
  __syncthreads();
  if (stats) {
    for (int col = tid; col < BN; col += kThreads) {
      float2 sum = make_float2(0.f, 0.f);
#pragma unroll
      for (int wm = 0; wm < WARPS_M; ++wm) sum.x += red[wm][col].x, sum.y += red[wm][col].y;
      if (n0 + col < c.out_c) epi.partials[static_cast<int64_t>(blockIdx.x) * c.out_c + n0 + col] = sum;
    }
  }
  // Phase 2: 16-byte coalesced stores of the tile.
  constexpr int kRowChunks = BN / 8;
  for (int q = tid; q < BM * kRowChunks; q += kThreads) {
    const int row = q / kRowChunks, part = q % kRowChunks;
    const int64_t m = m0 + row;
    const int n = n0 + part * 8;
    if (m >= M || n >= c.out_c) continue;
    const int b = static_cast<int>(m / grid_hw), r = static_cast<int>(m % grid_hw);
    const int oy = (r / c.grid_w) * c.out_stride + c.out_y0, ox = (r % c.grid_w) * c.out_stride + c.out_x0;
    const int64_t o = ((static_cast<int64_t>(b) * c.out_h + oy) * c.out_w + ox) * c.out_c + n;
    *reinterpret_cast<uint4*>(out + o) = *reinterpret_cast<const uint4*>(Cs + row * kLdc + part * 8);
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace dinocxr

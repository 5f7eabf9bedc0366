// Tensor-core 3x3 convolutions for the dense PCM convs of ViTAEv2 stage 1 (64 -> 256 -> 64 -> 64
// channels at 56 x 56): implicit GEMMs on mma.sync.m16n8k16 (bf16 / fp16 in, fp32 accumulate),
// which sm_80 and sm_90 both run. Operands are staged through a 3-stage cp.async pipeline in
// shared memory (rows padded to 80 bytes so ldmatrix is conflict-free); zero padding comes from
// cp.async's zero-fill, and the prologue (BatchNorm + SiLU of the previous conv) is applied in
// shared memory by the thread that loaded each chunk, before the barrier that publishes it, so
// padding stays zero and the normalised activation never exists in global memory.
//
// tc_tap_conv: M = grid positions, N = output channels, K = taps x input channels (32 per stage).
//   128 x 128 or 128 x 64 block tiles, 8 warps. The epilogue (bias / folded BatchNorm +
//   activation, or BatchNorm statistics, or the SiLU backward) runs on the accumulators; the tile
//   is staged through shared memory so the global stores are 16-byte and coalesced.
// tc_wgrad: dW[co][tap][ci] = sum over positions of dy[pos][co] * x'[pos + tap][ci]. A block owns
//   64 output x 32 input channels x all 9 taps (so dy is read once per input-channel tile) and a
//   range of positions (split-K); both operands are loaded K-major and read with ldmatrix.trans.
//   The bias gradient comes from the dy fragments already in registers.
//
// Everything is inside #if __CUDA_ARCH__ >= 800: the planner only picks these kernels on sm_80+.
#include "conv_common.cuh"
#include "conv_internal.cuh"
#include "tc_common.cuh"

namespace dinocxr {
namespace cuda {
namespace {

using namespace detail;

// ---- PTX wrappers (cp.async and the prologue helper are in tc_common.cuh) ---------------------
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
#if defined(DINOCXR_CUDA_EMULATION)
  emu::ldmatrix(r, 4, p, false);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
#if defined(DINOCXR_CUDA_EMULATION)
  emu::ldmatrix(r, 4, p, true);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
#endif
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) {
#if defined(DINOCXR_CUDA_EMULATION)
  emu::ldmatrix(r, 2, p, true);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(p)));
#endif
}

// D += A (16 x 16, row) * B (16 x 8, col), fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(DINOCXR_CUDA_EMULATION)
  emu::mma16816(d, a, b, true);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(DINOCXR_CUDA_EMULATION)
  emu::mma16816(d, a, b, false);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// Sum of the two 16-bit elements packed in a fragment register.
template <typename T>
__device__ __forceinline__ float pair_sum(uint32_t r) {
  Pack<T, 2> p;
  *reinterpret_cast<uint32_t*>(&p) = r;
  return to_float(p.v[0]) + to_float(p.v[1]);
}

// ---- forward / data-gradient tap convolution --------------------------------------------------
constexpr int kBK = 32;        // K elements (input channels of one tap) per stage
constexpr int kLds = kBK + 8;  // shared row stride in elements: 80 bytes
constexpr int kStages = 3;
constexpr int kThreads = 256;

template <int BM, int BN>
constexpr size_t tc_conv_smem() {
  constexpr size_t pipe = static_cast<size_t>(kStages) * (BM + BN) * kLds * 2;
  constexpr size_t epi = static_cast<size_t>(BM) * (BN + 8) * 2;
  return pipe > epi ? pipe : epi;
}

template <typename T, int BM, int BN, int WARPS_M, int WARPS_N>
__global__ void __launch_bounds__(kThreads)
    tc_tap_conv(TapConv c, const T* __restrict__ in, const T* __restrict__ w, T* __restrict__ out, Prologue pro,
                Epilogue epi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  static_assert(WARPS_M * WARPS_N * 32 == kThreads, "8 warps");
  constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  constexpr int MI = WM / 16, NI = WN / 8;
  static_assert(NI % 2 == 0, "B fragments are loaded two n8 tiles at a time");
  constexpr int A_CHUNKS = BM * (kBK / 8) / kThreads;
  constexpr int B_CHUNKS = BN * (kBK / 8) / kThreads;
  static_assert(A_CHUNKS * kThreads == BM * (kBK / 8) && B_CHUNKS * kThreads == BN * (kBK / 8), "chunking");

  extern __shared__ __align__(128) unsigned char smem[];
  T* As = reinterpret_cast<T*>(smem);                   // [stage][BM][kLds]
  T* Bs = As + static_cast<size_t>(kStages) * BM * kLds;  // [stage][BN][kLds]
  __shared__ int tap_dy[kMaxTaps], tap_dx[kMaxTaps];
  __shared__ float2 red[WARPS_M][BN];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
  const int64_t grid_hw = static_cast<int64_t>(c.grid_h) * c.grid_w;
  const int64_t M = c.batch * grid_hw;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int n0 = blockIdx.y * BN;
  const int kc = c.in_c / kBK;
  const int KT = c.n_taps * kc;
  if (tid == 0) {
#pragma unroll
    for (int t = 0; t < kMaxTaps; ++t) tap_dy[t] = c.tap_dy[t], tap_dx[t] = c.tap_dx[t];
  }

  // The A rows this thread loads are fixed for the whole K loop.
  int a_row[A_CHUNKS], a_part[A_CHUNKS], a_b[A_CHUNKS], a_y[A_CHUNKS], a_x[A_CHUNKS];
#pragma unroll
  for (int i = 0; i < A_CHUNKS; ++i) {
    const int q = tid + i * kThreads;
    a_row[i] = q / (kBK / 8);
    a_part[i] = q % (kBK / 8);
    const int64_t m = m0 + a_row[i];
    if (m < M) {
      a_b[i] = static_cast<int>(m / grid_hw);
      const int r = static_cast<int>(m % grid_hw);
      a_y[i] = (r / c.grid_w) * c.in_stride;
      a_x[i] = (r % c.grid_w) * c.in_stride;
    } else {
      a_b[i] = -1, a_y[i] = 0, a_x[i] = 0;
    }
  }
  __syncthreads();  // tap tables

  auto a_src = [&](int i, int kt, bool& valid) -> const T* {
    const int tap = kt / kc, ci = (kt % kc) * kBK + a_part[i] * 8;
    const int iy = a_y[i] + tap_dy[tap], ix = a_x[i] + tap_dx[tap];
    valid = a_b[i] >= 0 && iy >= 0 && iy < c.in_h && ix >= 0 && ix < c.in_w;
    return valid ? in + ((static_cast<int64_t>(a_b[i]) * c.in_h + iy) * c.in_w + ix) * c.in_c + ci : in;
  };
  auto load_stage = [&](int kt, int stage) {
#pragma unroll
    for (int i = 0; i < A_CHUNKS; ++i) {
      bool valid;
      const T* src = a_src(i, kt, valid);
      cp_async16(As + (static_cast<size_t>(stage) * BM + a_row[i]) * kLds + a_part[i] * 8, src, valid);
    }
    const int tap = kt / kc, ci0 = (kt % kc) * kBK;
#pragma unroll
    for (int i = 0; i < B_CHUNKS; ++i) {
      const int q = tid + i * kThreads, r = q / (kBK / 8), part = q % (kBK / 8);
      const int co = n0 + r;
      const bool valid = co < c.out_c;
      const T* src = valid ? w + (static_cast<int64_t>(co) * c.n_taps + tap) * c.in_c + ci0 + part * 8 : w;
      cp_async16(Bs + (static_cast<size_t>(stage) * BN + r) * kLds + part * 8, src, valid);
    }
  };
  // BatchNorm + SiLU of the previous conv on this thread's own (landed, in-bounds) A chunks.
  auto transform_stage = [&](int kt, int stage) {
    if (pro.scale == nullptr) return;
#pragma unroll
    for (int i = 0; i < A_CHUNKS; ++i) {
      bool valid;
      a_src(i, kt, valid);
      if (valid)
        prologue8(As + (static_cast<size_t>(stage) * BM + a_row[i]) * kLds + a_part[i] * 8, pro,
                  (kt % kc) * kBK + a_part[i] * 8);
    }
  };

  float acc[MI][NI][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < KT; ++kt) {
    const int stage = kt % kStages;
    cp_async_wait<kStages - 2>();
    transform_stage(kt, stage);
    __syncthreads();  // stage kt visible to all; stage (kt - 1) no longer read
    {
      const int nk = kt + kStages - 1;
      if (nk < KT) load_stage(nk, nk % kStages);
      cp_async_commit();
    }
    const T* a_base = As + static_cast<size_t>(stage) * BM * kLds;
    const T* b_base = Bs + static_cast<size_t>(stage) * BN * kLds;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t af[MI][4], bf[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
        ldmatrix_x4(af[mi], a_base + (warp_m * WM + mi * 16 + (lane & 15)) * kLds + kk + (lane >> 4) * 8);
#pragma unroll
      for (int nj = 0; nj < NI / 2; ++nj) {
        uint32_t r[4];
        ldmatrix_x4(r, b_base + (warp_n * WN + nj * 16 + (lane >> 4) * 8 + (lane & 7)) * kLds + kk +
                           ((lane >> 3) & 1) * 8);
        bf[2 * nj][0] = r[0], bf[2 * nj][1] = r[1], bf[2 * nj + 1][0] = r[2], bf[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) mma16816<T>(acc[mi][ni], af[mi], bf[ni]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline buffers become the epilogue tile

  tc_epilogue<T, BM, BN, MI, NI, WARPS_M>(acc, warp_m, warp_n * WN, c, out, epi, m0, n0, reinterpret_cast<T*>(smem),
                                         red);
#endif
}

// ---- weight gradient ----------------------------------------------------------------------------
constexpr int kWM = 64;          // output channels per block
constexpr int kWN = 32;          // input channels per block (x 9 taps)
constexpr int kWK = 32;          // positions per stage
constexpr int kLda = kWM + 8;    // 144-byte rows: ldmatrix.trans conflict-free
constexpr int kLdb = kWN + 8;    // 80-byte rows
constexpr int kXChunks = 9 * kWK * (kWN / 8);
constexpr size_t kWgradStage = (static_cast<size_t>(kWK) * kLda + static_cast<size_t>(9) * kWK * kLdb) * 2;
constexpr size_t kWgradSmem = kStages * kWgradStage;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    tc_wgrad(WgradConv c, const T* __restrict__ x, const T* __restrict__ dy, Prologue pro, float* __restrict__ part_w,
             float* __restrict__ part_b, int64_t chunks_per_split) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / 4, warp_n = warp % 4;  // 2 x 4 warps: 32 outputs x 8 inputs (x 9 taps) each
  const int co0 = blockIdx.x * kWM, ci0 = blockIdx.y * kWN;
  const int64_t split = blockIdx.z;
  const int64_t out_hw = static_cast<int64_t>(c.out_h) * c.out_w;
  const int64_t M = c.batch * out_hw;
  const int64_t n_chunks = (M + kWK - 1) / kWK;
  const int64_t kc_begin = split * chunks_per_split;
  const int64_t kc_end = kc_begin + chunks_per_split < n_chunks ? kc_begin + chunks_per_split : n_chunks;
  const int KT = kc_end > kc_begin ? static_cast<int>(kc_end - kc_begin) : 0;

  auto a_stage = [&](int s) { return reinterpret_cast<T*>(smem + s * kWgradStage); };  // dy: [pos][co]
  auto b_stage = [&](int s) { return a_stage(s) + kWK * kLda; };                     // x: [tap][pos][ci]

  // x chunk q of a stage: tap, row (position), 8-channel part; valid when inside the image.
  auto x_src = [&](int q, int64_t pos0, bool& valid) -> const T* {
    const int t = q / (kWK * (kWN / 8)), r = (q / (kWN / 8)) % kWK, part = q % (kWN / 8);
    const int64_t m = pos0 + r;
    valid = false;
    if (m < M) {
      const int b = static_cast<int>(m / out_hw), rem = static_cast<int>(m % out_hw);
      const int iy = (rem / c.out_w) * c.stride + t / 3 - 1, ix = (rem % c.out_w) * c.stride + t % 3 - 1;
      if (iy >= 0 && iy < c.in_h && ix >= 0 && ix < c.in_w) {
        valid = true;
        return x + ((static_cast<int64_t>(b) * c.in_h + iy) * c.in_w + ix) * c.in_c + ci0 + part * 8;
      }
    }
    return x;
  };
  auto load_stage = [&](int kt, int stage) {
    const int64_t pos0 = (kc_begin + kt) * kWK;
    {
      const int r = tid / (kWM / 8), part = tid % (kWM / 8);  // 32 rows x 8 parts = 256 chunks
      const int64_t m = pos0 + r;
      const int co = co0 + part * 8;
      const bool valid = m < M && co < c.out_c;
      cp_async16(a_stage(stage) + r * kLda + part * 8, valid ? dy + m * c.out_c + co : dy, valid);
    }
    T* bs = b_stage(stage);
    for (int q = tid; q < kXChunks; q += kThreads) {
      bool valid;
      const T* src = x_src(q, pos0, valid);
      const int t = q / (kWK * (kWN / 8)), r = (q / (kWN / 8)) % kWK, part = q % (kWN / 8);
      cp_async16(bs + (t * kWK + r) * kLdb + part * 8, src, valid);
    }
  };
  auto transform_stage = [&](int kt, int stage) {
    if (pro.scale == nullptr) return;
    const int64_t pos0 = (kc_begin + kt) * kWK;
    T* bs = b_stage(stage);
    for (int q = tid; q < kXChunks; q += kThreads) {
      bool valid;
      x_src(q, pos0, valid);
      if (!valid) continue;
      const int t = q / (kWK * (kWN / 8)), r = (q / (kWN / 8)) % kWK, part = q % (kWN / 8);
      prologue8(bs + (t * kWK + r) * kLdb + part * 8, pro, ci0 + part * 8);
    }
  };

  float acc[9][2][4];
#pragma unroll
  for (int t = 0; t < 9; ++t)
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[t][mi][e] = 0.f;
  const bool bias_warp = part_b != nullptr && blockIdx.y == 0 && warp_n == 0;
  float db[2][2] = {{0.f, 0.f}, {0.f, 0.f}};  // [mi][rows gid / gid + 8]

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < KT; ++kt) {
    const int stage = kt % kStages;
    cp_async_wait<kStages - 2>();
    transform_stage(kt, stage);
    __syncthreads();
    {
      const int nk = kt + kStages - 1;
      if (nk < KT) load_stage(nk, nk % kStages);
      cp_async_commit();
    }
    const T* as = a_stage(stage);
    const T* bs = b_stage(stage);
#pragma unroll
    for (int kk = 0; kk < kWK; kk += 16) {
      uint32_t af[2][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
        ldmatrix_x4_trans(af[mi], as + (kk + (lane >> 4) * 8 + (lane & 7)) * kLda + warp_m * 32 + mi * 16 +
                                      ((lane >> 3) & 1) * 8);
      if (bias_warp) {
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          db[mi][0] += pair_sum<T>(af[mi][0]) + pair_sum<T>(af[mi][2]);
          db[mi][1] += pair_sum<T>(af[mi][1]) + pair_sum<T>(af[mi][3]);
        }
      }
#pragma unroll
      for (int t = 0; t < 9; ++t) {
        uint32_t bf[2];
        ldmatrix_x2_trans(bf, bs + (t * kWK + kk + (lane & 15)) * kLdb + warp_n * 8);
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) mma16816<T>(acc[t][mi], af[mi], bf);
      }
    }
  }
  cp_async_wait<0>();

  const int gid = lane >> 2, tig = lane & 3;
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int co = co0 + warp_m * 32 + mi * 16 + half * 8 + gid;
      if (co >= c.out_c) continue;
      const int ci = ci0 + warp_n * 8 + tig * 2;
#pragma unroll
      for (int t = 0; t < 9; ++t)
        *reinterpret_cast<float2*>(part_w + ((split * c.out_c + co) * 9 + t) * c.in_c + ci) =
            make_float2(acc[t][mi][half * 2], acc[t][mi][half * 2 + 1]);
    }
  }
  if (bias_warp) {
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float v = db[mi][half];
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        v += __shfl_xor_sync(0xffffffffu, v, 2);
        const int co = co0 + warp_m * 32 + mi * 16 + half * 8 + gid;
        if (tig == 0 && co < c.out_c) part_b[split * c.out_c + co] = v;
      }
  }
#endif
}

template <typename T, int BM, int BN, int WARPS_M, int WARPS_N>
cudaError_t launch_conv(const internal::TcConvCfg& k, const TapConv& c, const void* in, const void* w, void* out,
                        const Prologue& pro, const Epilogue& epi, cudaStream_t stream) {
  auto kernel = tc_tap_conv<T, BM, BN, WARPS_M, WARPS_N>;
  const cudaError_t err = internal::allow_smem(kernel, k.smem_bytes);
  if (err != cudaSuccess) return err;
  kernel<<<k.grid, k.block, k.smem_bytes, stream>>>(c, static_cast<const T*>(in), static_cast<const T*>(w),
                                                    static_cast<T*>(out), pro, epi);
  return cudaGetLastError();
}

bool tensor_core_device() {
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  return major >= 8;
}

}  // namespace

namespace internal {

bool tc_conv_config(const TapConv& c, DType dt, const void* in, const void* w, const void* out, const void* aux,
                    TcConvCfg* cfg, const char** reason) {
  if (dt == DType::kF32) return *reason = "tensor-core path is bf16 / fp16 only", false;
  if (c.groups != 1) return *reason = "tensor-core path is for dense convolutions", false;
  if (c.in_c % kBK != 0) return *reason = "tensor-core path needs Cin % 32 == 0", false;
  if (c.out_c % 8 != 0) return *reason = "tensor-core path needs Cout % 8 == 0", false;
  if (!aligned(in, 16) || !aligned(w, 16) || !aligned(out, 16) || !aligned(aux, 16))
    return *reason = "tensor-core path needs 16-byte aligned tensors", false;
  if (!tensor_core_device()) return *reason = "tensor-core path needs sm_80 or newer", false;
  TcConvCfg k{};
  k.bn = c.out_c % 128 == 0 ? 128 : 64;
  k.smem_bytes = k.bn == 128 ? tc_conv_smem<128, 128>() : tc_conv_smem<128, 64>();
  if (k.smem_bytes > static_cast<size_t>(device_max_smem_optin()))
    return *reason = "not enough shared memory for the tensor-core tiles", false;
  const int64_t M = static_cast<int64_t>(c.batch) * c.grid_h * c.grid_w;
  const int64_t gx = (M + 127) / 128;
  if (gx > 0x7fffffff) return *reason = "too many positions", false;
  k.grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>((c.out_c + k.bn - 1) / k.bn));
  k.block = dim3(kThreads);
  *cfg = k;
  return true;
}

cudaError_t tc_conv_launch(const TcConvCfg& k, const TapConv& c, DType dt, const void* in, const void* w, void* out,
                           const Prologue& pro, const Epilogue& epi, cudaStream_t stream) {
  if (dt == DType::kBF16) {
    return k.bn == 128 ? launch_conv<__nv_bfloat16, 128, 128, 2, 4>(k, c, in, w, out, pro, epi, stream)
                       : launch_conv<__nv_bfloat16, 128, 64, 4, 2>(k, c, in, w, out, pro, epi, stream);
  }
  return k.bn == 128 ? launch_conv<__half, 128, 128, 2, 4>(k, c, in, w, out, pro, epi, stream)
                     : launch_conv<__half, 128, 64, 4, 2>(k, c, in, w, out, pro, epi, stream);
}

bool tc_wgrad_config(const WgradConv& c, DType dt, const void* x, const void* dy, TcWgradCfg* cfg,
                     const char** reason) {
  if (dt == DType::kF32) return *reason = "tensor-core path is bf16 / fp16 only", false;
  if (c.groups != 1) return *reason = "tensor-core path is for dense convolutions", false;
  if (c.in_c % kWN != 0) return *reason = "tensor-core path needs Cin % 32 == 0", false;
  if (c.out_c % 8 != 0) return *reason = "tensor-core path needs Cout % 8 == 0", false;
  if (!aligned(x, 16) || !aligned(dy, 16)) return *reason = "tensor-core path needs 16-byte aligned tensors", false;
  if (!tensor_core_device()) return *reason = "tensor-core path needs sm_80 or newer", false;
  if (kWgradSmem > static_cast<size_t>(device_max_smem_optin()))
    return *reason = "not enough shared memory for the tensor-core tiles", false;
  TcWgradCfg k{};
  const int64_t M = static_cast<int64_t>(c.batch) * c.out_h * c.out_w;
  const int64_t n_chunks = (M + kWK - 1) / kWK;
  const int64_t gx = (c.out_c + kWM - 1) / kWM, gy = c.in_c / kWN;
  const int64_t target = 4LL * device_sm_count();
  int64_t splits = (target + gx * gy - 1) / (gx * gy);
  splits = splits < 1 ? 1 : splits;
  splits = splits > n_chunks ? n_chunks : splits;
  splits = splits > 1024 ? 1024 : splits;
  k.chunks_per_split = (n_chunks + splits - 1) / splits;
  splits = (n_chunks + k.chunks_per_split - 1) / k.chunks_per_split;  // no empty split
  k.smem_bytes = kWgradSmem;
  k.grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(splits));
  *cfg = k;
  return true;
}

cudaError_t tc_wgrad_launch(const TcWgradCfg& k, const WgradConv& c, DType dt, const void* x, const Prologue& pro,
                            const void* dy, float* part_w, float* part_b, cudaStream_t stream) {
  cudaError_t err;
  if (dt == DType::kBF16) {
    auto kernel = tc_wgrad<__nv_bfloat16>;
    if ((err = allow_smem(kernel, k.smem_bytes)) != cudaSuccess) return err;
    kernel<<<k.grid, kThreads, k.smem_bytes, stream>>>(c, static_cast<const __nv_bfloat16*>(x),
                                                       static_cast<const __nv_bfloat16*>(dy), pro, part_w, part_b,
                                                       k.chunks_per_split);
  } else {
    auto kernel = tc_wgrad<__half>;
    if ((err = allow_smem(kernel, k.smem_bytes)) != cudaSuccess) return err;
    kernel<<<k.grid, kThreads, k.smem_bytes, stream>>>(c, static_cast<const __half*>(x),
                                                       static_cast<const __half*>(dy), pro, part_w, part_b,
                                                       k.chunks_per_split);
  }
  return cudaGetLastError();
}

}  // namespace internal
}  // namespace cuda
}  // namespace dinocxr

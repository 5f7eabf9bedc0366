// Hopper (sm_90a) tensor-core path for the dense forward / data-gradient tap convolutions: the
// implicit GEMM of conv3x3_tc.cu on warpgroup MMAs (wgmma.mma_async m64nNk16, both operands read
// from shared memory through matrix descriptors) instead of mma.sync.
//
// Block: 128 positions x 64 or 128 output channels, two warpgroups of 64 rows each; K advances by
// 64 input channels of one tap per stage (Cin % 64 == 0), 3 cp.async stages. Both tiles are K-major
// with 128-byte rows in the 128-byte swizzle (16-byte chunk c of row r stored at chunk c ^ (r % 8),
// the layout TMA's SWIZZLE_128B produces), so one descriptor per operand and k16 step covers the
// tile (leading byte offset 16, stride byte offset 1024 = 8 rows). The prologue (BatchNorm + SiLU
// of the previous conv) is applied in shared memory by the loading thread, then
// fence.proxy.async makes those generic-proxy writes visible to wgmma's async proxy before the
// barrier. The epilogue is tc_common.cuh's, shared with the mma.sync kernel.
//
// Off by default (conv_use_wgmma in the bindings turns it on): it has not run on a GPU yet, and
// the dispatcher only takes it when a probe kernel's attributes confirm the binary holds sm_90a code.
#include "conv_common.cuh"
#include "conv_internal.cuh"
#include "tc_common.cuh"

#include <atomic>

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DINOCXR_WGMMA 1
#else
#define DINOCXR_WGMMA 0
#endif
// kernels/cuda/emulation (the CPU test harness) replaces the instructions with their emulation.
#if defined(DINOCXR_CUDA_EMULATION)
#define DINOCXR_WGMMA_ASM(...)
#else
#define DINOCXR_WGMMA_ASM(...) asm volatile(__VA_ARGS__)
#endif

namespace dinocxr {
namespace cuda {
namespace {

using namespace detail;

constexpr int kWgBM = 128;     // positions per block (two warpgroups x 64)
constexpr int kWgBK = 64;      // input channels per stage: 128-byte rows
constexpr int kWgStages = 3;
constexpr int kRowBytes = kWgBK * 2;

template <int BN>
constexpr size_t stage_bytes() {
  return static_cast<size_t>(kWgBM + BN) * kRowBytes;  // multiple of 1024
}

template <int BN>
constexpr size_t smem_bytes() {
  constexpr size_t pipe = kWgStages * stage_bytes<BN>();
  constexpr size_t epi = static_cast<size_t>(kWgBM) * (BN + 8) * 2;
  return (pipe > epi ? pipe : epi) + 1024;  // + slack to align the base to 1024 bytes
}

// Device helpers, compiled only where the kernel body is (sm_90a device passes).
#if DINOCXR_WGMMA
// Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups 1024 bytes apart.
__device__ __forceinline__ uint64_t make_desc(uint32_t smem_addr) {
  auto enc = [](uint32_t x) { return static_cast<uint64_t>((x & 0x3FFFF) >> 4); };
  return enc(smem_addr) | (enc(16) << 16) | (enc(1024) << 32) | (1ull << 62);
}

// Byte offset of the 16-byte chunk `c` of row `r` in a 128-byte-swizzled tile.
__device__ __forceinline__ uint32_t swizzled(int r, int c) {
  return static_cast<uint32_t>(r * kRowBytes + ((c ^ (r & 7)) << 4));
}

__device__ __forceinline__ void wgmma_fence() {
  DINOCXR_WGMMA_ASM("wgmma.fence.sync.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_commit() {
  DINOCXR_WGMMA_ASM("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_wait_all() {
  DINOCXR_WGMMA_ASM("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}

// Generic-proxy writes to shared memory (cp.async, the prologue) -> visible to wgmma.
__device__ __forceinline__ void fence_proxy_async() {
  DINOCXR_WGMMA_ASM("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Keeps the compiler from moving accumulator reads / writes across the asynchronous MMAs.
template <int NI>
__device__ __forceinline__ void fence_operands(float (&d)[1][NI][4]) {
#pragma unroll
  for (int i = 0; i < NI; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) DINOCXR_WGMMA_ASM("" : "+f"(d[0][i][e])::"memory");
}

// D (64 x N, fp32, registers) += A (64 x 16, shared) * B (N x 16, shared)^T.
template <typename T, int N>
__device__ __forceinline__ void wgmma_k16(float (&d)[1][N / 8][4], uint64_t desc_a, uint64_t desc_b);

template <>
__device__ __forceinline__ void wgmma_k16<__nv_bfloat16, 128>(float (&d)[1][16][4], uint64_t desc_a, uint64_t desc_b) {
#if defined(DINOCXR_CUDA_EMULATION)
  emu::wgmma(&d[0][0][0], 128, desc_a, desc_b, true);
#else
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0][0][0]), "+f"(d[0][0][1]), "+f"(d[0][0][2]), "+f"(d[0][0][3]),
        "+f"(d[0][1][0]), "+f"(d[0][1][1]), "+f"(d[0][1][2]), "+f"(d[0][1][3]),
        "+f"(d[0][2][0]), "+f"(d[0][2][1]), "+f"(d[0][2][2]), "+f"(d[0][2][3]),
        "+f"(d[0][3][0]), "+f"(d[0][3][1]), "+f"(d[0][3][2]), "+f"(d[0][3][3]),
        "+f"(d[0][4][0]), "+f"(d[0][4][1]), "+f"(d[0][4][2]), "+f"(d[0][4][3]),
        "+f"(d[0][5][0]), "+f"(d[0][5][1]), "+f"(d[0][5][2]), "+f"(d[0][5][3]),
        "+f"(d[0][6][0]), "+f"(d[0][6][1]), "+f"(d[0][6][2]), "+f"(d[0][6][3]),
        "+f"(d[0][7][0]), "+f"(d[0][7][1]), "+f"(d[0][7][2]), "+f"(d[0][7][3]),
        "+f"(d[0][8][0]), "+f"(d[0][8][1]), "+f"(d[0][8][2]), "+f"(d[0][8][3]),
        "+f"(d[0][9][0]), "+f"(d[0][9][1]), "+f"(d[0][9][2]), "+f"(d[0][9][3]),
        "+f"(d[0][10][0]), "+f"(d[0][10][1]), "+f"(d[0][10][2]), "+f"(d[0][10][3]),
        "+f"(d[0][11][0]), "+f"(d[0][11][1]), "+f"(d[0][11][2]), "+f"(d[0][11][3]),
        "+f"(d[0][12][0]), "+f"(d[0][12][1]), "+f"(d[0][12][2]), "+f"(d[0][12][3]),
        "+f"(d[0][13][0]), "+f"(d[0][13][1]), "+f"(d[0][13][2]), "+f"(d[0][13][3]),
        "+f"(d[0][14][0]), "+f"(d[0][14][1]), "+f"(d[0][14][2]), "+f"(d[0][14][3]),
        "+f"(d[0][15][0]), "+f"(d[0][15][1]), "+f"(d[0][15][2]), "+f"(d[0][15][3])
      : "l"(desc_a), "l"(desc_b), "r"(1));
#endif
}
template <>
__device__ __forceinline__ void wgmma_k16<__nv_bfloat16, 64>(float (&d)[1][8][4], uint64_t desc_a, uint64_t desc_b) {
#if defined(DINOCXR_CUDA_EMULATION)
  emu::wgmma(&d[0][0][0], 64, desc_a, desc_b, true);
#else
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, p, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0][0][0]), "+f"(d[0][0][1]), "+f"(d[0][0][2]), "+f"(d[0][0][3]),
        "+f"(d[0][1][0]), "+f"(d[0][1][1]), "+f"(d[0][1][2]), "+f"(d[0][1][3]),
        "+f"(d[0][2][0]), "+f"(d[0][2][1]), "+f"(d[0][2][2]), "+f"(d[0][2][3]),
        "+f"(d[0][3][0]), "+f"(d[0][3][1]), "+f"(d[0][3][2]), "+f"(d[0][3][3]),
        "+f"(d[0][4][0]), "+f"(d[0][4][1]), "+f"(d[0][4][2]), "+f"(d[0][4][3]),
        "+f"(d[0][5][0]), "+f"(d[0][5][1]), "+f"(d[0][5][2]), "+f"(d[0][5][3]),
        "+f"(d[0][6][0]), "+f"(d[0][6][1]), "+f"(d[0][6][2]), "+f"(d[0][6][3]),
        "+f"(d[0][7][0]), "+f"(d[0][7][1]), "+f"(d[0][7][2]), "+f"(d[0][7][3])
      : "l"(desc_a), "l"(desc_b), "r"(1));
#endif
}
template <>
__device__ __forceinline__ void wgmma_k16<__half, 128>(float (&d)[1][16][4], uint64_t desc_a, uint64_t desc_b) {
#if defined(DINOCXR_CUDA_EMULATION)
  emu::wgmma(&d[0][0][0], 128, desc_a, desc_b, false);
#else
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0][0][0]), "+f"(d[0][0][1]), "+f"(d[0][0][2]), "+f"(d[0][0][3]),
        "+f"(d[0][1][0]), "+f"(d[0][1][1]), "+f"(d[0][1][2]), "+f"(d[0][1][3]),
        "+f"(d[0][2][0]), "+f"(d[0][2][1]), "+f"(d[0][2][2]), "+f"(d[0][2][3]),
        "+f"(d[0][3][0]), "+f"(d[0][3][1]), "+f"(d[0][3][2]), "+f"(d[0][3][3]),
        "+f"(d[0][4][0]), "+f"(d[0][4][1]), "+f"(d[0][4][2]), "+f"(d[0][4][3]),
        "+f"(d[0][5][0]), "+f"(d[0][5][1]), "+f"(d[0][5][2]), "+f"(d[0][5][3]),
        "+f"(d[0][6][0]), "+f"(d[0][6][1]), "+f"(d[0][6][2]), "+f"(d[0][6][3]),
        "+f"(d[0][7][0]), "+f"(d[0][7][1]), "+f"(d[0][7][2]), "+f"(d[0][7][3]),
        "+f"(d[0][8][0]), "+f"(d[0][8][1]), "+f"(d[0][8][2]), "+f"(d[0][8][3]),
        "+f"(d[0][9][0]), "+f"(d[0][9][1]), "+f"(d[0][9][2]), "+f"(d[0][9][3]),
        "+f"(d[0][10][0]), "+f"(d[0][10][1]), "+f"(d[0][10][2]), "+f"(d[0][10][3]),
        "+f"(d[0][11][0]), "+f"(d[0][11][1]), "+f"(d[0][11][2]), "+f"(d[0][11][3]),
        "+f"(d[0][12][0]), "+f"(d[0][12][1]), "+f"(d[0][12][2]), "+f"(d[0][12][3]),
        "+f"(d[0][13][0]), "+f"(d[0][13][1]), "+f"(d[0][13][2]), "+f"(d[0][13][3]),
        "+f"(d[0][14][0]), "+f"(d[0][14][1]), "+f"(d[0][14][2]), "+f"(d[0][14][3]),
        "+f"(d[0][15][0]), "+f"(d[0][15][1]), "+f"(d[0][15][2]), "+f"(d[0][15][3])
      : "l"(desc_a), "l"(desc_b), "r"(1));
#endif
}
template <>
__device__ __forceinline__ void wgmma_k16<__half, 64>(float (&d)[1][8][4], uint64_t desc_a, uint64_t desc_b) {
#if defined(DINOCXR_CUDA_EMULATION)
  emu::wgmma(&d[0][0][0], 64, desc_a, desc_b, false);
#else
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, p, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0][0][0]), "+f"(d[0][0][1]), "+f"(d[0][0][2]), "+f"(d[0][0][3]),
        "+f"(d[0][1][0]), "+f"(d[0][1][1]), "+f"(d[0][1][2]), "+f"(d[0][1][3]),
        "+f"(d[0][2][0]), "+f"(d[0][2][1]), "+f"(d[0][2][2]), "+f"(d[0][2][3]),
        "+f"(d[0][3][0]), "+f"(d[0][3][1]), "+f"(d[0][3][2]), "+f"(d[0][3][3]),
        "+f"(d[0][4][0]), "+f"(d[0][4][1]), "+f"(d[0][4][2]), "+f"(d[0][4][3]),
        "+f"(d[0][5][0]), "+f"(d[0][5][1]), "+f"(d[0][5][2]), "+f"(d[0][5][3]),
        "+f"(d[0][6][0]), "+f"(d[0][6][1]), "+f"(d[0][6][2]), "+f"(d[0][6][3]),
        "+f"(d[0][7][0]), "+f"(d[0][7][1]), "+f"(d[0][7][2]), "+f"(d[0][7][3])
      : "l"(desc_a), "l"(desc_b), "r"(1));
#endif
}

#endif  // DINOCXR_WGMMA

template <typename T, int BN>
__global__ void __launch_bounds__(kTcThreads, 1)
    wgmma_tap_conv(TapConv c, const T* __restrict__ in, const T* __restrict__ w, T* __restrict__ out, Prologue pro,
                   Epilogue epi) {
#if DINOCXR_WGMMA
  constexpr int NI = BN / 8;
  constexpr int A_CHUNKS = kWgBM * 8 / kTcThreads;  // 16-byte chunks per thread per stage
  constexpr int B_CHUNKS = BN * 8 / kTcThreads;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  __shared__ int tap_dy[kMaxTaps], tap_dx[kMaxTaps];
  __shared__ float2 red[8][BN];
  // The swizzle is a function of the shared address: start the tiles on a 1024-byte boundary.
  const uint32_t raw = smem_u32(smem_raw);
  unsigned char* smem = smem_raw + (((raw + 1023u) & ~1023u) - raw);
  const uint32_t base = smem_u32(smem);

  const int tid = threadIdx.x, warp = tid >> 5, wg = warp >> 2;
  const int64_t grid_hw = static_cast<int64_t>(c.grid_h) * c.grid_w;
  const int64_t M = c.batch * grid_hw;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kWgBM;
  const int n0 = blockIdx.y * BN;
  const int kc = c.in_c / kWgBK;
  const int KT = c.n_taps * kc;
  if (tid == 0) {
#pragma unroll
    for (int t = 0; t < kMaxTaps; ++t) tap_dy[t] = c.tap_dy[t], tap_dx[t] = c.tap_dx[t];
  }
  int a_row[A_CHUNKS], a_ch[A_CHUNKS], a_b[A_CHUNKS], a_y[A_CHUNKS], a_x[A_CHUNKS];
#pragma unroll
  for (int i = 0; i < A_CHUNKS; ++i) {
    const int q = tid + i * kTcThreads;
    a_row[i] = q >> 3;
    a_ch[i] = q & 7;
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
    const int tap = kt / kc, ci = (kt % kc) * kWgBK + a_ch[i] * 8;
    const int iy = a_y[i] + tap_dy[tap], ix = a_x[i] + tap_dx[tap];
    valid = a_b[i] >= 0 && iy >= 0 && iy < c.in_h && ix >= 0 && ix < c.in_w;
    return valid ? in + ((static_cast<int64_t>(a_b[i]) * c.in_h + iy) * c.in_w + ix) * c.in_c + ci : in;
  };
  auto load_stage = [&](int kt, int stage) {
    unsigned char* a_tile = smem + stage * stage_bytes<BN>();
    unsigned char* b_tile = a_tile + kWgBM * kRowBytes;
#pragma unroll
    for (int i = 0; i < A_CHUNKS; ++i) {
      bool valid;
      const T* src = a_src(i, kt, valid);
      cp_async16(a_tile + swizzled(a_row[i], a_ch[i]), src, valid);
    }
    const int tap = kt / kc, ci0 = (kt % kc) * kWgBK;
#pragma unroll
    for (int i = 0; i < B_CHUNKS; ++i) {
      const int q = tid + i * kTcThreads, r = q >> 3, ch = q & 7;
      const int co = n0 + r;
      const bool valid = co < c.out_c;
      const T* src = valid ? w + (static_cast<int64_t>(co) * c.n_taps + tap) * c.in_c + ci0 + ch * 8 : w;
      cp_async16(b_tile + swizzled(r, ch), src, valid);
    }
  };
  auto transform_stage = [&](int kt, int stage) {
    if (pro.scale == nullptr) return;
    unsigned char* a_tile = smem + stage * stage_bytes<BN>();
#pragma unroll
    for (int i = 0; i < A_CHUNKS; ++i) {
      bool valid;
      a_src(i, kt, valid);
      if (valid)
        prologue8(reinterpret_cast<T*>(a_tile + swizzled(a_row[i], a_ch[i])), pro, (kt % kc) * kWgBK + a_ch[i] * 8);
    }
  };

  float acc[1][NI][4];
#pragma unroll
  for (int i = 0; i < NI; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[0][i][e] = 0.f;
  fence_operands(acc);

#pragma unroll
  for (int s = 0; s < kWgStages - 1; ++s) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < KT; ++kt) {
    const int stage = kt % kWgStages;
    cp_async_wait<kWgStages - 2>();
    transform_stage(kt, stage);
    fence_proxy_async();  // this thread's tile writes -> the async proxy
    __syncthreads();      // stage kt complete for everyone; stage kt - 1 no longer read (waited below)
    {
      const int nk = kt + kWgStages - 1;
      if (nk < KT) load_stage(nk, nk % kWgStages);
      cp_async_commit();
    }
    const uint32_t a_addr = base + static_cast<uint32_t>(stage * stage_bytes<BN>()) + wg * 64 * kRowBytes;
    const uint32_t b_addr = base + static_cast<uint32_t>(stage * stage_bytes<BN>()) + kWgBM * kRowBytes;
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < kWgBK / 16; ++k) wgmma_k16<T, BN>(acc, make_desc(a_addr + k * 32), make_desc(b_addr + k * 32));
    wgmma_commit();
    wgmma_wait_all();
    fence_operands(acc);
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline buffers become the epilogue tile
  // Warp `warp` holds rows 16 * warp .. 16 * warp + 15 of the block (warpgroup wg, its warp % 4).
  tc_epilogue<T, kWgBM, BN, 1, NI, 8>(acc, warp, 0, c, out, epi, m0, n0, reinterpret_cast<T*>(smem), red);
#else
  __trap();  // never selected: wgmma_compiled() is false for this binary
#endif
}

// Never launched: its launch bound records, per compiled variant, whether that variant holds the
// wgmma code (sm_90a: 128 threads, anything else: 64), and cudaFuncGetAttributes reads it from the
// variant the driver picked for the device.
constexpr int kProbeThreadsWgmma = 128;
__global__ void __launch_bounds__(DINOCXR_WGMMA ? kProbeThreadsWgmma : 64) wgmma_probe() {}

std::atomic<bool> g_use_wgmma{false};

template <typename T, int BN>
cudaError_t launch(const internal::WgmmaConvCfg& k, const TapConv& c, const void* in, const void* w, void* out,
                   const Prologue& pro, const Epilogue& epi, cudaStream_t stream) {
  auto kernel = wgmma_tap_conv<T, BN>;
  const cudaError_t err = internal::allow_smem(kernel, k.smem_bytes);
  if (err != cudaSuccess) return err;
  kernel<<<k.grid, kTcThreads, k.smem_bytes, stream>>>(c, static_cast<const T*>(in), static_cast<const T*>(w),
                                                       static_cast<T*>(out), pro, epi);
  return cudaGetLastError();
}

}  // namespace

void set_use_wgmma(bool use) { g_use_wgmma.store(use); }

bool wgmma_compiled() {
  // Per device: does this binary hold sm_90a code for it? (A compute_80 PTX JIT-compiled on an
  // H100 would run, without wgmma.) Asked once, of the binary's attributes: no allocation, launch
  // or synchronisation, so it is safe inside a CUDA graph capture.
  static std::atomic<int> cache[64];  // 0 unknown, 1 no, 2 yes
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return false;
  int known = cache[device].load();
  if (known) return known == 2;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess || major != 9) {
    cache[device].store(1);
    return false;
  }
  cudaFuncAttributes attr{};
  const bool ok = cudaFuncGetAttributes(&attr, wgmma_probe) == cudaSuccess &&
                  attr.maxThreadsPerBlock == kProbeThreadsWgmma;
  cache[device].store(ok ? 2 : 1);
  return ok;
}

namespace internal {

bool wgmma_conv_config(const TapConv& c, DType dt, const void* in, const void* w, const void* out, const void* aux,
                       WgmmaConvCfg* cfg, const char** reason) {
  if (!g_use_wgmma.load()) return *reason = "the wgmma path is off", false;
  if (dt == DType::kF32) return *reason = "wgmma path is bf16 / fp16 only", false;
  if (c.groups != 1) return *reason = "wgmma path is for dense convolutions", false;
  if (c.in_c % kWgBK != 0) return *reason = "wgmma path needs Cin % 64 == 0", false;
  if (c.out_c % 8 != 0) return *reason = "wgmma path needs Cout % 8 == 0", false;
  if (!aligned(in, 16) || !aligned(w, 16) || !aligned(out, 16) || !aligned(aux, 16))
    return *reason = "wgmma path needs 16-byte aligned tensors", false;
  if (!wgmma_compiled()) return *reason = "wgmma path needs an sm_90 GPU and sm_90a code in the build", false;
  WgmmaConvCfg k{};
  k.bn = c.out_c % 128 == 0 ? 128 : 64;
  k.smem_bytes = k.bn == 128 ? smem_bytes<128>() : smem_bytes<64>();
  if (k.smem_bytes > static_cast<size_t>(device_max_smem_optin()))
    return *reason = "not enough shared memory for the wgmma tiles", false;
  const int64_t M = static_cast<int64_t>(c.batch) * c.grid_h * c.grid_w;
  const int64_t gx = (M + kWgBM - 1) / kWgBM;
  if (gx > 0x7fffffff) return *reason = "too many positions", false;
  k.grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>((c.out_c + k.bn - 1) / k.bn));
  *cfg = k;
  return true;
}

cudaError_t wgmma_conv_launch(const WgmmaConvCfg& k, const TapConv& c, DType dt, const void* in, const void* w,
                              void* out, const Prologue& pro, const Epilogue& epi, cudaStream_t stream) {
  if (dt == DType::kBF16) {
    return k.bn == 128 ? launch<__nv_bfloat16, 128>(k, c, in, w, out, pro, epi, stream)
                       : launch<__nv_bfloat16, 64>(k, c, in, w, out, pro, epi, stream);
  }
  return k.bn == 128 ? launch<__half, 128>(k, c, in, w, out, pro, epi, stream)
                     : launch<__half, 64>(k, c, in, w, out, pro, epi, stream);
}

}  // namespace internal
}  // namespace cuda
}  // namespace dinocxr

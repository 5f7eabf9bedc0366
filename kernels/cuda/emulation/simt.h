// A CPU stand-in for the CUDA execution model, for testing the kernels of kernels/cuda without a
// GPU (tests/kernels/test_cuda_emulated_kernels.py). Not part of the extension or the wheel.
//
// Every CUDA thread of a block is a std::thread; __syncthreads is a std::barrier over the block,
// warp-collective instructions rendezvous on a per-warp barrier. Blocks run one after another.
// The warp-level matrix instructions the tensor-core kernels use are emulated from their PTX ISA
// definitions (fragment layouts of ldmatrix and mma.m16n8k16, wgmma's shared-memory matrix
// descriptors with the 128-byte swizzle), independently of how the kernels address them, so a
// kernel that feeds them the wrong rows computes wrong numbers here too. cp.async copies at once.
// Build with -fsanitize=address,undefined to catch out-of-bounds and misaligned accesses.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- qualifiers ---------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) alignas(n)

using std::isfinite;

// ---- vector types ---------------------------------------------------------------------------------
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline float2 make_float2(float a, float b) { return {a, b}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }

// ---- 16-bit floats ------------------------------------------------------------------------------
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {  // round to nearest even, as the device does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7FFFu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}
inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.bits, 2);
  return static_cast<float>(v);
}
inline __half __float2half(float f) {
  const _Float16 v = static_cast<_Float16>(f);
  __half h;
  std::memcpy(&h.bits, &v, 2);
  return h;
}

// ---- math -------------------------------------------------------------------------------------
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }

// ---- runtime API ------------------------------------------------------------------------------
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMisalignedAddress = 74, cudaErrorLaunchFailure = 719 };
using cudaStream_t = void*;
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2 };

namespace emu {
// The emulated GPU: an sm_90 with few SMs, so the kernels' grids stay small.
inline int sm_count = 4;
inline int smem_optin = 227 * 1024;
inline int last_error = 0;
}  // namespace emu

inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated CUDA error"; }
inline cudaError_t cudaGetLastError() {
  const int e = emu::last_error;
  emu::last_error = 0;
  return static_cast<cudaError_t>(e);
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  switch (a) {
    case cudaDevAttrMultiProcessorCount: *v = emu::sm_count; break;
    case cudaDevAttrComputeCapabilityMajor: *v = 9; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = emu::smem_optin; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int value) {
  return value <= emu::smem_optin ? cudaSuccess : cudaErrorInvalidValue;
}
struct cudaFuncAttributes {
  int maxThreadsPerBlock;
};
// Launch bounds are erased here, and the emulated binary is sm_90a code (DINOCXR_WGMMA is on):
// report the bound conv3x3_wgmma.cu's probe kernel carries in such a variant.
template <typename F>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, F) {
  attr->maxThreadsPerBlock = 128;
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaMalloc(void* p, size_t n) {
  *static_cast<void**>(p) = std::malloc(n);
  return cudaSuccess;
}
template <typename T>
inline cudaError_t cudaMalloc(T** p, size_t n) {
  *p = static_cast<T*>(std::malloc(n));
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) {
  std::memcpy(d, s, n);
  return cudaSuccess;
}
inline cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}

// ---- execution model --------------------------------------------------------------------------
inline thread_local dim3 threadIdx;
inline dim3 blockIdx, blockDim, gridDim;

namespace emu {

struct Warp {
  std::unique_ptr<std::barrier<>> bar;
  const void* ptr[32];
  uint32_t reg[32][8];
  float f[32];
  double d[32];
};

struct Block {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<Warp> warps;
  unsigned char* smem = nullptr;  // dynamic shared memory
  uintptr_t window = 0;           // shared-window address of smem[0] (not 1024-aligned on purpose)
};

inline Block* block = nullptr;

inline Warp& warp() { return block->warps[threadIdx.x / 32]; }
inline int lane() { return static_cast<int>(threadIdx.x % 32); }
inline void warp_sync() { warp().bar->arrive_and_wait(); }

inline unsigned char* dynamic_smem() { return block->smem; }

// Runs kernel(args...) over grid x block, one block at a time, one std::thread per CUDA thread.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 threads, size_t smem_bytes, cudaStream_t, Args&&... args) {
  if (threads.y != 1 || threads.z != 1 || threads.x == 0 || threads.x > 1024 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || smem_bytes > static_cast<size_t>(smem_optin)) {
    last_error = cudaErrorInvalidValue;
    return;
  }
  std::tuple<std::decay_t<KArgs>...> params(static_cast<KArgs>(args)...);
  gridDim = grid;
  blockDim = threads;
  const unsigned n = threads.x;
  // The window offset mimics static shared memory placed before the dynamic buffer.
  constexpr size_t kWindowOffset = 272;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b;
        b.bar = std::make_unique<std::barrier<>>(static_cast<std::ptrdiff_t>(n));
        b.warps.resize((n + 31) / 32);
        for (unsigned w = 0; w < b.warps.size(); ++w)
          b.warps[w].bar = std::make_unique<std::barrier<>>(static_cast<std::ptrdiff_t>(std::min(32u, n - 32 * w)));
        std::unique_ptr<unsigned char[]> storage(new unsigned char[smem_bytes ? smem_bytes : 1]);
        b.smem = storage.get();
        b.window = kWindowOffset;
        block = &b;
        blockIdx = dim3(bx, by, bz);
        std::vector<std::thread> pool;
        pool.reserve(n);
        for (unsigned t = 0; t < n; ++t) {
          pool.emplace_back([&, t] {
            threadIdx = dim3(t, 0, 0);
            std::apply(kernel, params);
            // An exited thread no longer takes part in barriers, as on the GPU.
            b.warps[t / 32].bar->arrive_and_drop();
            b.bar->arrive_and_drop();
          });
        }
        for (auto& th : pool) th.join();
        block = nullptr;
      }
}

}  // namespace emu

inline void __syncthreads() { emu::block->bar->arrive_and_wait(); }
inline void __trap() { std::abort(); }

inline float __shfl_xor_sync(unsigned, float v, int offset) {
  auto& w = emu::warp();
  w.f[emu::lane()] = v;
  emu::warp_sync();
  const float r = w.f[emu::lane() ^ offset];
  emu::warp_sync();
  return r;
}
inline double __shfl_xor_sync(unsigned, double v, int offset) {
  auto& w = emu::warp();
  w.d[emu::lane()] = v;
  emu::warp_sync();
  const double r = w.d[emu::lane() ^ offset];
  emu::warp_sync();
  return r;
}

inline int atomicOr(int* p, int v) { return std::atomic_ref<int>(*p).fetch_or(v); }

template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcs(const T* p) { return *p; }
template <typename T>
inline void __stcs(T* p, T v) { *p = v; }

// Shared-window address of a pointer into the dynamic shared memory.
inline size_t __cvta_generic_to_shared(const void* p) {
  return static_cast<size_t>(static_cast<const unsigned char*>(p) - emu::block->smem) + emu::block->window;
}

// ---- warp-level instructions, from the PTX ISA ---------------------------------------------------
namespace emu {

inline unsigned char* shared_ptr(uint32_t addr) { return block->smem + (addr - block->window); }

inline uint16_t half_bits(const void* row, int i) {
  uint16_t v;
  std::memcpy(&v, static_cast<const unsigned char*>(row) + 2 * i, 2);
  return v;
}

// ldmatrix.m8n8.x{n}[.trans].b16: lanes 8q..8q+7 give the row addresses of matrix q. Without
// .trans thread t receives row t/4, columns 2(t%4), 2(t%4)+1; with .trans, column t/4 of rows
// 2(t%4) and 2(t%4)+1.
inline void ldmatrix(uint32_t* r, int n, const void* p, bool trans) {
  auto& w = warp();
  const int l = lane();
  w.ptr[l] = p;
  warp_sync();
  for (int q = 0; q < n; ++q) {
    uint16_t lo, hi;
    if (!trans) {
      const void* row = w.ptr[8 * q + l / 4];
      lo = half_bits(row, 2 * (l % 4));
      hi = half_bits(row, 2 * (l % 4) + 1);
    } else {
      lo = half_bits(w.ptr[8 * q + 2 * (l % 4)], l / 4);
      hi = half_bits(w.ptr[8 * q + 2 * (l % 4) + 1], l / 4);
    }
    r[q] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  warp_sync();
}

inline float decode(uint16_t bits, bool bf16) {
  return bf16 ? __bfloat162float(__nv_bfloat16{bits}) : __half2float(__half{bits});
}

// mma.sync.m16n8k16.row.col.f32: A fragment a0..a3 = (row g, k 2t..2t+1), (g+8, 2t..), (g, 2t+8..),
// (g+8, 2t+8..); B fragment b0, b1 = (k 2t..2t+1, n g), (k 2t+8.., n g); D d0..d3 = (g, 2t), (g, 2t+1),
// (g+8, 2t), (g+8, 2t+1); g = lane / 4, t = lane % 4.
inline void mma16816(float* d, const uint32_t* a, const uint32_t* b, bool bf16) {
  auto& w = warp();
  const int l = lane();
  for (int i = 0; i < 4; ++i) w.reg[l][i] = a[i];
  w.reg[l][4] = b[0];
  w.reg[l][5] = b[1];
  warp_sync();
  auto A = [&](int row, int k) {
    const int owner = (row % 8) * 4 + (k % 8) / 2, reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    const uint32_t v = w.reg[owner][reg];
    return decode(static_cast<uint16_t>(k % 2 ? v >> 16 : v & 0xFFFF), bf16);
  };
  auto B = [&](int k, int n) {
    const int owner = n * 4 + (k % 8) / 2, reg = 4 + (k >= 8 ? 1 : 0);
    const uint32_t v = w.reg[owner][reg];
    return decode(static_cast<uint16_t>(k % 2 ? v >> 16 : v & 0xFFFF), bf16);
  };
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = l / 4 + (e >= 2 ? 8 : 0), col = 2 * (l % 4) + (e & 1);
    float acc = d[e];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    out[e] = acc;
  }
  warp_sync();
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

// Element (row, k) of a K-major operand described by a wgmma shared-memory matrix descriptor with
// the 128-byte swizzle: rows of 128 bytes, 8-row groups `stride` bytes apart, 16-byte chunks XORed
// with address bits 7..9 (Swizzle<3,4,3> on the shared address).
inline float wgmma_operand(uint64_t desc, int row, int k, bool bf16) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFF) << 4;
  const uint32_t stride = static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4;
  const int mode = static_cast<int>(desc >> 62);
  if (mode != 1 || ((desc >> 49) & 7) != 0) std::abort();  // only the layout the kernels use
  uint32_t addr = start + (row / 8) * stride + (row % 8) * 128 + 2 * k;
  addr ^= ((addr >> 7) & 7) << 4;
  uint16_t bits;
  std::memcpy(&bits, shared_ptr(addr), 2);
  return decode(bits, bf16);
}

// wgmma.mma_async.m64nNk16.f32 with A and B in shared memory, both K-major: thread t of the
// warpgroup holds D rows 16 (t/32) + (t%32)/4 (+8), columns 8j + 2(t%4) (+1), as d[4j..4j+3].
inline void wgmma(float* d, int n, uint64_t desc_a, uint64_t desc_b, bool bf16) {
  const int t = static_cast<int>(threadIdx.x % 128), l = t % 32;
  for (int j = 0; j < n / 8; ++j)
    for (int e = 0; e < 4; ++e) {
      const int row = 16 * (t / 32) + l / 4 + (e >= 2 ? 8 : 0), col = 8 * j + 2 * (l % 4) + (e & 1);
      float acc = 0.f;
      for (int k = 0; k < 16; ++k) acc += wgmma_operand(desc_a, row, k, bf16) * wgmma_operand(desc_b, col, k, bf16);
      d[4 * j + e] += acc;
    }
}

inline void cp_async16(void* dst, const void* src, bool valid) {
  if (valid) {
    std::memcpy(dst, src, 16);
  } else {
    std::memset(dst, 0, 16);
  }
}

}  // namespace emu

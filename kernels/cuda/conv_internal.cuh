// Host-side interfaces between the convolution implementations and the dispatcher
// (conv3x3_dispatch.cu). Internal to kernels/cuda.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "conv3x3.cuh"

namespace dinocxr {
namespace cuda {
namespace internal {

inline bool aligned(const void* p, size_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0;
}
inline size_t dtype_size(DType dt) { return dt == DType::kF32 ? 4 : 2; }

// Raises the dynamic shared memory limit of `kernel` to `bytes` when it is above the 48 KB default.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

// ---- direct (CUDA-core) tap convolution ------------------------------------------------------
struct DirectConvCfg {
  int co_t;         // outputs per thread (4 or 8)
  int sx;           // channel slices per block (threads along x)
  int spg;          // slices per group = ceil(cout_g / co_t)
  int gpb;          // whole groups per block; 0 = the block covers part of one group
  int cic;          // input channels per chunk (== cin_g unless the weights do not fit at once)
  int chunked;      // 1 when cic < cin_g (weights and tile reloaded per chunk)
  int cb;           // channels held per tile pixel in shared memory
  int pix_stride;   // elements between tile pixels (cb + padding)
  int hh, hw;       // halo tile
  int dy_min, dx_min;
  int vec;          // elements per global input load (1, 2, 4, 8)
  size_t tile_bytes, smem_bytes;
  dim3 grid, block;
};

bool direct_conv_config(const TapConv& c, DType dt, const void* in, DirectConvCfg* cfg, const char** reason);
cudaError_t direct_conv_launch(const DirectConvCfg& cfg, const TapConv& c, DType dt, const void* in,
                               const void* w, void* out, const Prologue& pro, const Epilogue& epi,
                               cudaStream_t stream);

// ---- tensor-core tap convolution --------------------------------------------------------------
struct TcConvCfg {
  int bn;  // 64 or 128 output channels per block
  size_t smem_bytes;
  dim3 grid, block;
};

bool tc_conv_config(const TapConv& c, DType dt, const void* in, const void* w, const void* out, const void* aux,
                    TcConvCfg* cfg, const char** reason);
cudaError_t tc_conv_launch(const TcConvCfg& cfg, const TapConv& c, DType dt, const void* in, const void* w,
                           void* out, const Prologue& pro, const Epilogue& epi, cudaStream_t stream);

// ---- tensor-core tap convolution on wgmma (sm_90a) ----------------------------------------------
struct WgmmaConvCfg {
  int bn;  // 64 or 128 output channels per block
  size_t smem_bytes;
  dim3 grid;
};

bool wgmma_conv_config(const TapConv& c, DType dt, const void* in, const void* w, const void* out, const void* aux,
                       WgmmaConvCfg* cfg, const char** reason);
cudaError_t wgmma_conv_launch(const WgmmaConvCfg& cfg, const TapConv& c, DType dt, const void* in, const void* w,
                              void* out, const Prologue& pro, const Epilogue& epi, cudaStream_t stream);

// ---- weight gradient --------------------------------------------------------------------------
struct DirectWgradCfg {
  int co_t, ci_t;        // outputs / inputs per thread
  int ci_chunk;          // input channels per block along z (== cin_g unless a group's halo does not fit)
  int items_per_group;   // (cout_g / co_t) * (ci_chunk / ci_t) * 3 kernel rows, per z block
  int threads;           // items per block
  int gpb;               // whole groups per block; 0 = part of one group
  int co_span, ci_span;  // channels of dy / x held in shared memory
  int dy_stride, x_stride;
  int hh, hw;
  int vec_x, vec_dy;
  size_t dy_bytes, smem_bytes;
  dim3 grid;
};

bool direct_wgrad_config(const WgradConv& c, DType dt, const void* x, const void* dy, DirectWgradCfg* cfg,
                         const char** reason);
cudaError_t direct_wgrad_launch(const DirectWgradCfg& cfg, const WgradConv& c, DType dt, const void* x,
                                const Prologue& pro, const void* dy, float* part_w, float* part_b,
                                cudaStream_t stream);

struct TcWgradCfg {
  int64_t chunks_per_split;
  size_t smem_bytes;
  dim3 grid;
};

bool tc_wgrad_config(const WgradConv& c, DType dt, const void* x, const void* dy, TcWgradCfg* cfg,
                     const char** reason);
cudaError_t tc_wgrad_launch(const TcWgradCfg& cfg, const WgradConv& c, DType dt, const void* x,
                            const Prologue& pro, const void* dy, float* part_w, float* part_b, cudaStream_t stream);

// Sums the per-split partial weight gradients [splits][out_c][9][cin_g] into torch's layout.
cudaError_t wgrad_reduce(const float* part_w, const float* part_b, int splits, int out_c, int cin_g, float* dw,
                         float* db, cudaStream_t stream);

}  // namespace internal
}  // namespace cuda
}  // namespace dinocxr

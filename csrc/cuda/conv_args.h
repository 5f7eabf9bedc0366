// Argument checks and conversions shared by the ops over kernels/cuda/conv3x3.cuh (convolutions,
// BatchNorm passes, fused PCM). Every failure is a ValueError naming the argument.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "conv3x3.cuh"

namespace dinocxr {
namespace ops {

using OptTensor = c10::optional<at::Tensor>;

// The kernels' element type of a float32 / float16 / bfloat16 tensor.
cuda::DType conv_dtype(at::ScalarType t, const char* name);
// The same from the Python side's code: 0 float32, 1 float16, 2 bfloat16.
cuda::DType dtype_code(int64_t code);

// A defined, contiguous CUDA tensor on like's device.
void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& like);
// ... that also has like's dtype and `numel` elements.
void check_data(const at::Tensor& t, const char* name, const at::Tensor& like, int64_t numel);
// A per-channel fp32 vector of `channels` entries on like's device (or null when absent).
const float* channel_vec(const OptTensor& t, const char* name, const at::Tensor& like, int64_t channels);

int to_int(int64_t v, const char* name);
// 0 none, 1 silu, 2 gelu, 3 relu.
cuda::Act to_act(int64_t act);

}  // namespace ops
}  // namespace dinocxr

// The whole grouped PCM (three 3x3 convolutions with their BatchNorm and activations) in one CUDA
// kernel at inference (kernels/cuda/conv3x3.cuh, pcm_fused_*): planning query, checks and launch.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/conv_args.h"

namespace dinocxr {
namespace ops {

// shape = [batch, in_h, in_w, c0, c1, c2, c3, groups, stride1].
// (supported, groups_per_block, smem_bytes, reason) for aligned tensors on `device`.
std::tuple<bool, int, int64_t, std::string> pcm_fused_info(const std::vector<int64_t>& shape, int64_t dtype,
                                                           int64_t device);

// x: B x H x W x c0; weights [c_out, 9, cin_g]; s*, t*: per-channel affine maps (s3 optional).
at::Tensor pcm_fused_cuda(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& w3,
                          const at::Tensor& s1, const at::Tensor& t1, const at::Tensor& s2, const at::Tensor& t2,
                          const OptTensor& s3, const at::Tensor& t3, int64_t groups, int64_t stride1);

}  // namespace ops
}  // namespace dinocxr

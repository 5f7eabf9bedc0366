// The BatchNorm passes around the PCM convolutions on CUDA tensors (kernels/cuda/conv_batchnorm.cu):
// per-channel statistics from the convolutions' partial sums, and the elementwise passes.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "cuda/conv_args.h"

namespace dinocxr {
namespace ops {

// [6, C]: mean, invstd, scale, shift, new running mean, new running var.
at::Tensor bn_forward_finalize_cuda(const at::Tensor& partials, int64_t count, const OptTensor& ref,
                                    const at::Tensor& gamma, const at::Tensor& beta, double eps, double momentum,
                                    const OptTensor& running_mean, const OptTensor& running_var);

// [5, C]: dgamma, dbeta, A, B, C with dy = A dz + B y + C.
at::Tensor bn_backward_finalize_cuda(const at::Tensor& partials, int64_t count, const at::Tensor& gamma,
                                     const at::Tensor& mean, const at::Tensor& invstd, bool training);

// act(y * scale + shift) per channel.
at::Tensor affine_act_cuda(const at::Tensor& y, const OptTensor& scale, const OptTensor& shift, int64_t act);

// Partial sums of dz and dz * xhat, [rows, C, 2].
at::Tensor act_backward_stats_cuda(const at::Tensor& g, const at::Tensor& y, const OptTensor& z_scale,
                                   const OptTensor& z_shift, int64_t act, const OptTensor& xh_scale,
                                   const OptTensor& xh_shift);

// dy = A dz + B y + C with dz = grad * act'(z), into grad itself when inplace.
at::Tensor bn_backward_apply_cuda(at::Tensor& g, const at::Tensor& y, const OptTensor& z_scale,
                                  const OptTensor& z_shift, int64_t act, const at::Tensor& a, const OptTensor& b,
                                  const OptTensor& c, bool inplace);

}  // namespace ops
}  // namespace dinocxr

// The fused DINO loss on CUDA tensors: argument checks and launch of kernels/cuda/dino_loss.cuh.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace dinocxr {
namespace ops {

// (loss fp32, grad_student or empty, teacher column sums fp32 [K] or empty). float32, bfloat16, float16.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dino_loss_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                              const at::Tensor& center, double student_temp,
                                                              double teacher_temp, int64_t n_global, bool need_grad,
                                                              bool need_sum);

}  // namespace ops
}  // namespace dinocxr

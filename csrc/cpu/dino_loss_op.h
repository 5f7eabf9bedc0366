// The fused DINO loss on CPU tensors: argument checks and dtype dispatch around csrc/cpu/dino_loss.h.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace dinocxr {
namespace ops {

// (loss, grad_student or empty, teacher column sums fp32 [K] or empty). float32, float64, bfloat16;
// float16 is computed in float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dino_loss_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                             const at::Tensor& center, double student_temp,
                                                             double teacher_temp, int64_t n_global, bool need_grad,
                                                             bool need_sum);

}  // namespace ops
}  // namespace dinocxr

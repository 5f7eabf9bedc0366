// The CPU BatchNorm + activation ops (dinocxr::bn_act_cpu, dinocxr::bn_act_cpu_backward): argument
// checks and tensor handling around the kernels of csrc/cpu/bn_act.h. Activation codes: 0 none,
// 1 silu, 2 gelu, 3 relu.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace dinocxr {
namespace ops {

// (out [M, C], stats [3, C]: mean hi, mean lo, invstd; new running mean and var [2, C], empty in eval).
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_forward_cpu(const at::Tensor& y, const at::Tensor& gamma,
                                                                  const at::Tensor& beta,
                                                                  const at::Tensor& running_mean,
                                                                  const at::Tensor& running_var, double eps,
                                                                  double momentum, bool training, int64_t act);

// (dy [M, C] or empty when not need_input_grad, dgamma [C], dbeta [C]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward_cpu(const at::Tensor& grad, const at::Tensor& y,
                                                                   const at::Tensor& gamma, const at::Tensor& beta,
                                                                   const at::Tensor& stats, bool training,
                                                                   int64_t act, bool need_input_grad);

}  // namespace ops
}  // namespace dinocxr

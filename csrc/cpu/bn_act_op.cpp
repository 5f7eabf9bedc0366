#include "cpu/bn_act_op.h"

#include <cmath>

#include "cpu/bn_act.h"

namespace dinocxr {
namespace ops {
namespace {

void check_bn_act_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be a 2-D [rows, channels] matrix, got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

void check_bn_act_vec(const at::Tensor& t, const char* name, int64_t channels) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == channels, name, " must have shape [", channels, "], got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

int bn_act_code(int64_t act) {
  TORCH_CHECK_VALUE(act >= 0 && act <= 3, "activation must be 0 (none), 1 (silu), 2 (gelu) or 3 (relu), got ", act);
  return static_cast<int>(act);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_forward_cpu(const at::Tensor& y, const at::Tensor& gamma,
                                                                  const at::Tensor& beta,
                                                                  const at::Tensor& running_mean,
                                                                  const at::Tensor& running_var, double eps,
                                                                  double momentum, bool training, int64_t act) {
  check_bn_act_matrix(y, "y");
  const int64_t rows = y.size(0), channels = y.size(1);
  check_bn_act_vec(gamma, "bn_weight", channels);
  check_bn_act_vec(beta, "bn_bias", channels);
  check_bn_act_vec(running_mean, "running_mean", channels);
  check_bn_act_vec(running_var, "running_var", channels);
  TORCH_CHECK_VALUE(eps >= 0 && std::isfinite(eps), "eps must be a non-negative finite number, got ", eps);
  TORCH_CHECK_VALUE(std::isfinite(momentum), "momentum must be finite, got ", momentum);
  TORCH_CHECK_VALUE(rows >= (training ? 2 : 1) && channels >= 1,
                    "y must have at least ", training ? 2 : 1, " rows and one channel (Expected more than 1 value "
                    "per channel when training), got ", y.sizes());
  const cpu::BnActProblem p{rows, channels, bn_act_code(act)};
  at::Tensor out = at::empty_like(y);
  at::Tensor stats = at::empty({3, channels}, y.options());
  at::Tensor running = at::empty({training ? 2 : 0, channels}, y.options());
  if (training) {
    cpu::bn_act_forward_train(p, y.data_ptr<float>(), gamma.data_ptr<float>(), beta.data_ptr<float>(), eps, momentum,
                              running_mean.data_ptr<float>(), running_var.data_ptr<float>(), out.data_ptr<float>(),
                              stats.data_ptr<float>(), running.data_ptr<float>());
  } else {
    cpu::bn_act_forward_eval(p, y.data_ptr<float>(), gamma.data_ptr<float>(), beta.data_ptr<float>(), eps,
                             running_mean.data_ptr<float>(), running_var.data_ptr<float>(), out.data_ptr<float>(),
                             stats.data_ptr<float>());
  }
  return {out, stats, running};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward_cpu(const at::Tensor& grad, const at::Tensor& y,
                                                                   const at::Tensor& gamma, const at::Tensor& beta,
                                                                   const at::Tensor& stats, bool training,
                                                                   int64_t act, bool need_input_grad) {
  check_bn_act_matrix(y, "y");
  check_bn_act_matrix(grad, "grad");
  TORCH_CHECK_VALUE(grad.sizes() == y.sizes(), "grad must have the shape of y ", y.sizes(), ", got ", grad.sizes());
  const int64_t rows = y.size(0), channels = y.size(1);
  TORCH_CHECK_VALUE(rows >= 1 && channels >= 1, "y must not be empty, got ", y.sizes());
  check_bn_act_vec(gamma, "bn_weight", channels);
  check_bn_act_vec(beta, "bn_bias", channels);
  TORCH_CHECK_VALUE(stats.device().is_cpu() && stats.scalar_type() == at::kFloat && stats.is_contiguous() &&
                        stats.dim() == 2 && stats.size(0) == 3 && stats.size(1) == channels,
                    "stats must be a contiguous float32 CPU tensor of shape [3, ", channels, "], got ", stats.sizes());
  const cpu::BnActProblem p{rows, channels, bn_act_code(act)};
  at::Tensor dy = need_input_grad ? at::empty_like(y) : at::empty({0}, y.options());
  at::Tensor dgamma = at::empty({channels}, y.options());
  at::Tensor dbeta = at::empty({channels}, y.options());
  cpu::bn_act_backward(p, training, grad.data_ptr<float>(), y.data_ptr<float>(), gamma.data_ptr<float>(),
                       beta.data_ptr<float>(), stats.data_ptr<float>(), need_input_grad ? dy.data_ptr<float>() : nullptr,
                       dgamma.data_ptr<float>(), dbeta.data_ptr<float>());
  return {dy, dgamma, dbeta};
}

}  // namespace ops
}  // namespace dinocxr

#include "cuda/conv_batchnorm_ops.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/launch_errors.h"

namespace dinocxr {
namespace ops {
namespace {

void check_partials(const at::Tensor& partials, int64_t channels) {
  TORCH_CHECK_VALUE(partials.is_cuda() && partials.is_contiguous() && partials.scalar_type() == at::kFloat,
                    "partials must be a contiguous float32 CUDA tensor");
  TORCH_CHECK_VALUE(partials.dim() == 3 && partials.size(1) == channels && partials.size(2) == 2 &&
                        partials.size(0) >= 1,
                    "partials must be [rows >= 1, ", channels, ", 2], got ", partials.sizes());
}

}  // namespace

at::Tensor bn_forward_finalize_cuda(const at::Tensor& partials, int64_t count, const OptTensor& ref,
                                    const at::Tensor& gamma, const at::Tensor& beta, double eps, double momentum,
                                    const OptTensor& running_mean, const OptTensor& running_var) {
  TORCH_CHECK_VALUE(partials.is_cuda(), "partials must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(partials.device());
  const int64_t channels = gamma.numel();
  check_partials(partials, channels);
  TORCH_CHECK_VALUE(count >= 1, "count must be positive");
  const float* g = channel_vec(gamma, "gamma", partials, channels);
  const float* b = channel_vec(beta, "beta", partials, channels);
  at::Tensor out = at::empty({6, channels}, partials.options());
  clear_pending_cuda_error("bn_forward_finalize_cuda");
  const cudaError_t err = cuda::bn_forward_finalize(
      reinterpret_cast<const float2*>(partials.data_ptr<float>()), partials.size(0), to_int(channels, "channels"),
      count, channel_vec(ref, "ref", partials, channels), g, b, static_cast<float>(eps), static_cast<float>(momentum),
      channel_vec(running_mean, "running_mean", partials, channels),
      channel_vec(running_var, "running_var", partials, channels), out.data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "bn_forward_finalize_cuda: ", cudaGetErrorString(err));
  return out;
}

at::Tensor bn_backward_finalize_cuda(const at::Tensor& partials, int64_t count, const at::Tensor& gamma,
                                     const at::Tensor& mean, const at::Tensor& invstd, bool training) {
  TORCH_CHECK_VALUE(partials.is_cuda(), "partials must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(partials.device());
  const int64_t channels = gamma.numel();
  check_partials(partials, channels);
  TORCH_CHECK_VALUE(count >= 1, "count must be positive");
  at::Tensor out = at::empty({5, channels}, partials.options());
  clear_pending_cuda_error("bn_backward_finalize_cuda");
  const cudaError_t err = cuda::bn_backward_finalize(
      reinterpret_cast<const float2*>(partials.data_ptr<float>()), partials.size(0), to_int(channels, "channels"),
      count, channel_vec(gamma, "gamma", partials, channels), channel_vec(mean, "mean", partials, channels),
      channel_vec(invstd, "invstd", partials, channels), training, out.data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "bn_backward_finalize_cuda: ", cudaGetErrorString(err));
  return out;
}

at::Tensor affine_act_cuda(const at::Tensor& y, const OptTensor& scale, const OptTensor& shift, int64_t act) {
  TORCH_CHECK_VALUE(y.is_cuda() && y.dim() >= 1 && y.numel() > 0, "y must be a non-empty CUDA tensor");
  const c10::cuda::CUDAGuard guard(y.device());
  const cuda::DType dt = conv_dtype(y.scalar_type(), "y");
  check_cuda(y, "y", y);
  const int64_t channels = y.size(-1);
  at::Tensor out = at::empty_like(y);
  clear_pending_cuda_error("affine_act_cuda");
  const cudaError_t err = cuda::affine_act(dt, y.data_ptr(), out.data_ptr(), y.numel() / channels,
                                           to_int(channels, "channels"), channel_vec(scale, "scale", y, channels),
                                           channel_vec(shift, "shift", y, channels), to_act(act),
                                           c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "affine_act_cuda: ", cudaGetErrorString(err));
  return out;
}

at::Tensor act_backward_stats_cuda(const at::Tensor& g, const at::Tensor& y, const OptTensor& z_scale,
                                   const OptTensor& z_shift, int64_t act, const OptTensor& xh_scale,
                                   const OptTensor& xh_shift) {
  TORCH_CHECK_VALUE(y.is_cuda() && y.dim() >= 1 && y.numel() > 0, "y must be a non-empty CUDA tensor");
  const c10::cuda::CUDAGuard guard(y.device());
  const cuda::DType dt = conv_dtype(y.scalar_type(), "y");
  check_data(y, "y", y, y.numel());
  check_data(g, "grad", y, y.numel());
  const int64_t channels = y.size(-1), rows = y.numel() / channels;
  at::Tensor partials = at::empty({cuda::act_backward_stats_rows(rows, to_int(channels, "channels")), channels, 2},
                                  y.options().dtype(at::kFloat));
  clear_pending_cuda_error("act_backward_stats_cuda");
  const cudaError_t err = cuda::act_backward_stats(
      dt, g.data_ptr(), y.data_ptr(), rows, static_cast<int>(channels), channel_vec(z_scale, "z_scale", y, channels),
      channel_vec(z_shift, "z_shift", y, channels), to_act(act), channel_vec(xh_scale, "xh_scale", y, channels),
      channel_vec(xh_shift, "xh_shift", y, channels), reinterpret_cast<float2*>(partials.data_ptr<float>()),
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "act_backward_stats_cuda: ", cudaGetErrorString(err));
  return partials;
}

at::Tensor bn_backward_apply_cuda(at::Tensor& g, const at::Tensor& y, const OptTensor& z_scale,
                                  const OptTensor& z_shift, int64_t act, const at::Tensor& a, const OptTensor& b,
                                  const OptTensor& c, bool inplace) {
  TORCH_CHECK_VALUE(y.is_cuda() && y.dim() >= 1 && y.numel() > 0, "y must be a non-empty CUDA tensor");
  const c10::cuda::CUDAGuard guard(y.device());
  const cuda::DType dt = conv_dtype(y.scalar_type(), "y");
  check_data(y, "y", y, y.numel());
  check_data(g, "grad", y, y.numel());
  const int64_t channels = y.size(-1);
  at::Tensor dy = inplace ? g : at::empty_like(g);
  clear_pending_cuda_error("bn_backward_apply_cuda");
  const cudaError_t err = cuda::bn_backward_apply(
      dt, g.data_ptr(), y.data_ptr(), dy.data_ptr(), y.numel() / channels, to_int(channels, "channels"),
      channel_vec(z_scale, "z_scale", y, channels), channel_vec(z_shift, "z_shift", y, channels), to_act(act),
      channel_vec(a, "a", y, channels), channel_vec(b, "b", y, channels), channel_vec(c, "c", y, channels),
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "bn_backward_apply_cuda: ", cudaGetErrorString(err));
  return dy;
}

}  // namespace ops
}  // namespace dinocxr

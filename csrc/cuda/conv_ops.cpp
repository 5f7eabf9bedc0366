#include "cuda/conv_ops.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/launch_errors.h"

namespace dinocxr {
namespace ops {
namespace {

cuda::TapConv make_tap_conv(const std::vector<int64_t>& geom, const std::vector<int64_t>& tap_dy,
                            const std::vector<int64_t>& tap_dx) {
  TORCH_CHECK_VALUE(geom.size() == 14, "geom must have 14 entries, got ", geom.size());
  TORCH_CHECK_VALUE(tap_dy.size() == tap_dx.size() && !tap_dy.empty() && tap_dy.size() <= cuda::kMaxTaps,
                    "tap_dy and tap_dx must have the same length, 1..9");
  cuda::TapConv c{};
  int* fields[] = {&c.batch, &c.in_h, &c.in_w, &c.in_c, &c.out_h, &c.out_w, &c.out_c,
                   &c.grid_h, &c.grid_w, &c.in_stride, &c.out_stride, &c.out_y0, &c.out_x0, &c.groups};
  for (size_t i = 0; i < geom.size(); ++i) *fields[i] = to_int(geom[i], "geom");
  c.n_taps = static_cast<int>(tap_dy.size());
  for (int t = 0; t < c.n_taps; ++t) c.tap_dy[t] = to_int(tap_dy[t], "tap_dy"), c.tap_dx[t] = to_int(tap_dx[t], "tap_dx");
  return c;
}

cuda::WgradConv make_wgrad(const at::Tensor& x, const at::Tensor& dy, int64_t groups, int64_t stride) {
  TORCH_CHECK_VALUE(x.dim() == 4 && dy.dim() == 4, "x and dy must be B x H x W x C");
  cuda::WgradConv c{};
  c.batch = to_int(x.size(0), "batch");
  c.in_h = to_int(x.size(1), "x height"), c.in_w = to_int(x.size(2), "x width"), c.in_c = to_int(x.size(3), "x channels");
  c.out_h = to_int(dy.size(1), "dy height"), c.out_w = to_int(dy.size(2), "dy width");
  c.out_c = to_int(dy.size(3), "dy channels");
  c.groups = to_int(groups, "groups"), c.stride = to_int(stride, "stride");
  TORCH_CHECK_VALUE(dy.size(0) == x.size(0), "dy must have x's batch size");
  return c;
}

}  // namespace

std::tuple<bool, std::string, std::string> tap_conv_info(const std::vector<int64_t>& geom,
                                                         const std::vector<int64_t>& tap_dy,
                                                         const std::vector<int64_t>& tap_dx, int64_t dtype,
                                                         int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const cuda::TapConv c = make_tap_conv(geom, tap_dy, tap_dx);
  const cuda::TapConvPlan plan = cuda::tap_conv_plan(c, dtype_code(dtype), nullptr, nullptr, nullptr, nullptr,
                                                     cuda::EpiKind::kAffineAct);
  static const char* names[] = {"direct", "mma", "wgmma"};
  return {plan.supported, names[static_cast<int>(plan.impl)], plan.reason};
}

at::Tensor tap_conv_cuda(const at::Tensor& x, const at::Tensor& w, at::Tensor& out, const std::vector<int64_t>& geom,
                         const std::vector<int64_t>& tap_dy, const std::vector<int64_t>& tap_dx,
                         const OptTensor& pro_scale, const OptTensor& pro_shift, int64_t epi_kind, int64_t act,
                         const OptTensor& scale, const OptTensor& shift, const OptTensor& ref, const OptTensor& aux,
                         const OptTensor& z_scale, const OptTensor& z_shift, const OptTensor& xh_scale,
                         const OptTensor& xh_shift) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const cuda::TapConv c = make_tap_conv(geom, tap_dy, tap_dx);
  TORCH_CHECK_VALUE(c.groups >= 1 && c.in_c % c.groups == 0 && c.out_c % c.groups == 0,
                    "channels must be divisible by groups");
  const cuda::DType dt = conv_dtype(x.scalar_type(), "x");
  check_data(x, "x", x, static_cast<int64_t>(c.batch) * c.in_h * c.in_w * c.in_c);
  check_data(w, "weight", x, static_cast<int64_t>(c.out_c) * c.n_taps * (c.in_c / c.groups));
  const int64_t out_numel = static_cast<int64_t>(c.batch) * c.out_h * c.out_w * c.out_c;
  check_data(out, "out", x, out_numel);
  TORCH_CHECK_VALUE(epi_kind >= 0 && epi_kind <= 2, "epi_kind must be 0, 1 or 2");
  cuda::Prologue pro;
  pro.scale = channel_vec(pro_scale, "pro_scale", x, c.in_c);
  pro.shift = channel_vec(pro_shift, "pro_shift", x, c.in_c);
  TORCH_CHECK_VALUE((pro.scale == nullptr) == (pro.shift == nullptr), "pro_scale and pro_shift go together");
  cuda::Epilogue epi;
  epi.kind = static_cast<cuda::EpiKind>(epi_kind);
  epi.act = to_act(act);
  epi.scale = channel_vec(scale, "scale", x, c.out_c);
  epi.shift = channel_vec(shift, "shift", x, c.out_c);
  epi.ref = channel_vec(ref, "ref", x, c.out_c);
  epi.z_scale = channel_vec(z_scale, "z_scale", x, c.out_c);
  epi.z_shift = channel_vec(z_shift, "z_shift", x, c.out_c);
  epi.xh_scale = channel_vec(xh_scale, "xh_scale", x, c.out_c);
  epi.xh_shift = channel_vec(xh_shift, "xh_shift", x, c.out_c);
  if (aux.has_value() && aux->defined()) {
    check_data(*aux, "aux", x, out_numel);
    epi.aux = aux->data_ptr();
  }
  const cuda::TapConvPlan plan =
      cuda::tap_conv_plan(c, dt, x.data_ptr(), w.data_ptr(), out.data_ptr(), epi.aux, epi.kind);
  TORCH_CHECK_VALUE(plan.supported, "tap_conv_cuda: unsupported problem: ", plan.reason);
  at::Tensor partials = at::empty({plan.partial_rows, c.out_c, 2}, x.options().dtype(at::kFloat));
  epi.partials = plan.partial_rows > 0 ? reinterpret_cast<float2*>(partials.data_ptr<float>()) : nullptr;
  clear_pending_cuda_error("tap_conv_cuda");
  const cudaError_t err = cuda::tap_conv_forward(plan, c, dt, x.data_ptr(), w.data_ptr(), out.data_ptr(), pro, epi,
                                                 c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "tap_conv_cuda: ", cudaGetErrorString(err));
  return partials;
}

std::tuple<bool, bool, int, std::string> wgrad_info(const std::vector<int64_t>& shape, int64_t dtype, int64_t device) {
  TORCH_CHECK_VALUE(shape.size() == 9, "shape = [batch, in_h, in_w, in_c, out_h, out_w, out_c, groups, stride]");
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cuda::WgradConv c{};
  int* fields[] = {&c.batch, &c.in_h, &c.in_w, &c.in_c, &c.out_h, &c.out_w, &c.out_c, &c.groups, &c.stride};
  for (size_t i = 0; i < shape.size(); ++i) *fields[i] = to_int(shape[i], "shape");
  const cuda::WgradPlan plan = cuda::wgrad_plan(c, dtype_code(dtype), nullptr, nullptr);
  return {plan.supported, plan.tensor_cores, plan.splits, plan.reason};
}

std::tuple<at::Tensor, at::Tensor> wgrad_cuda(const at::Tensor& x, const at::Tensor& dy, const OptTensor& pro_scale,
                                              const OptTensor& pro_shift, int64_t groups, int64_t stride,
                                              bool need_bias) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const cuda::WgradConv c = make_wgrad(x, dy, groups, stride);
  const cuda::DType dt = conv_dtype(x.scalar_type(), "x");
  check_data(x, "x", x, x.numel());
  check_data(dy, "dy", x, dy.numel());
  cuda::Prologue pro;
  pro.scale = channel_vec(pro_scale, "pro_scale", x, c.in_c);
  pro.shift = channel_vec(pro_shift, "pro_shift", x, c.in_c);
  TORCH_CHECK_VALUE((pro.scale == nullptr) == (pro.shift == nullptr), "pro_scale and pro_shift go together");
  const cuda::WgradPlan plan = cuda::wgrad_plan(c, dt, x.data_ptr(), dy.data_ptr());
  TORCH_CHECK_VALUE(plan.supported, "wgrad_cuda: unsupported problem: ", plan.reason);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dw = at::empty({c.out_c, c.in_c / c.groups, 3, 3}, f32);
  at::Tensor db = at::empty({need_bias ? c.out_c : 0}, f32);
  at::Tensor workspace = at::empty({static_cast<int64_t>(plan.workspace_bytes)}, x.options().dtype(at::kByte));
  clear_pending_cuda_error("wgrad_cuda");
  const cudaError_t err = cuda::wgrad(plan, c, dt, x.data_ptr(), pro, dy.data_ptr(), dw.data_ptr<float>(),
                                      need_bias ? db.data_ptr<float>() : nullptr, workspace.data_ptr(),
                                      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "wgrad_cuda: ", cudaGetErrorString(err));
  return {dw, db};
}

bool wgmma_available(int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  return cuda::wgmma_compiled();
}

}  // namespace ops
}  // namespace dinocxr

#include "cuda/pcm_op.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/launch_errors.h"

namespace dinocxr {
namespace ops {
namespace {

cuda::PcmChain make_chain(const std::vector<int64_t>& shape) {
  TORCH_CHECK_VALUE(shape.size() == 9, "shape = [batch, in_h, in_w, c0, c1, c2, c3, groups, stride1]");
  cuda::PcmChain c{};
  int* fields[] = {&c.batch, &c.in_h, &c.in_w, &c.c0, &c.c1, &c.c2, &c.c3, &c.groups, &c.stride1};
  for (size_t i = 0; i < shape.size(); ++i) *fields[i] = to_int(shape[i], "shape");
  return c;
}

}  // namespace

std::tuple<bool, int, int64_t, std::string> pcm_fused_info(const std::vector<int64_t>& shape, int64_t dtype,
                                                           int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const cuda::PcmFusedPlan plan = cuda::pcm_fused_plan(make_chain(shape), dtype_code(dtype), nullptr, nullptr);
  return {plan.supported, plan.groups_per_block, static_cast<int64_t>(plan.smem_bytes), plan.reason};
}

at::Tensor pcm_fused_cuda(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& w3,
                          const at::Tensor& s1, const at::Tensor& t1, const at::Tensor& s2, const at::Tensor& t2,
                          const OptTensor& s3, const at::Tensor& t3, int64_t groups, int64_t stride1) {
  TORCH_CHECK_VALUE(x.is_cuda() && x.dim() == 4, "x must be a B x H x W x C CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const cuda::DType dt = conv_dtype(x.scalar_type(), "x");
  TORCH_CHECK_VALUE(w1.dim() == 3 && w2.dim() == 3 && w3.dim() == 3, "weights must be [c_out, 9, cin_g]");
  const cuda::PcmChain c = make_chain({x.size(0), x.size(1), x.size(2), x.size(3), w1.size(0), w2.size(0),
                                       w3.size(0), groups, stride1});
  TORCH_CHECK_VALUE(c.groups >= 1 && c.c0 % c.groups == 0 && c.c1 % c.groups == 0 && c.c2 % c.groups == 0 &&
                        c.c3 % c.groups == 0,
                    "channels must be divisible by groups");
  check_data(x, "x", x, x.numel());
  check_data(w1, "w1", x, static_cast<int64_t>(c.c1) * 9 * (c.c0 / c.groups));
  check_data(w2, "w2", x, static_cast<int64_t>(c.c2) * 9 * (c.c1 / c.groups));
  check_data(w3, "w3", x, static_cast<int64_t>(c.c3) * 9 * (c.c2 / c.groups));
  const int64_t h1 = (c.in_h - 1) / c.stride1 + 1, w1o = (c.in_w - 1) / c.stride1 + 1;
  at::Tensor out = at::empty({c.batch, h1, w1o, c.c3}, x.options());
  const cuda::PcmFusedPlan plan = cuda::pcm_fused_plan(c, dt, x.data_ptr(), out.data_ptr());
  TORCH_CHECK_VALUE(plan.supported, "pcm_fused_cuda: unsupported problem: ", plan.reason);
  clear_pending_cuda_error("pcm_fused_cuda");
  const cudaError_t err = cuda::pcm_fused_inference(
      plan, c, dt, x.data_ptr(), w1.data_ptr(), w2.data_ptr(), w3.data_ptr(), channel_vec(s1, "s1", x, c.c1),
      channel_vec(t1, "t1", x, c.c1), channel_vec(s2, "s2", x, c.c2), channel_vec(t2, "t2", x, c.c2),
      channel_vec(s3, "s3", x, c.c3), channel_vec(t3, "t3", x, c.c3), out.data_ptr(),
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "pcm_fused_cuda: ", cudaGetErrorString(err));
  return out;
}

}  // namespace ops
}  // namespace dinocxr

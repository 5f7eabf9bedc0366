#include "cuda/dino_loss_op.h"

// c10's stream and guard headers only (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS and
// cuSPARSE headers the kernels never use).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "cuda/launch_errors.h"
#include "dino_loss.cuh"
#include "dino_loss_checks.h"

namespace dinocxr {
namespace ops {

std::tuple<at::Tensor, at::Tensor, at::Tensor> dino_loss_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                              const at::Tensor& center_in, double student_temp,
                                                              double teacher_temp, int64_t n_global, bool need_grad,
                                                              bool need_sum) {
  TORCH_CHECK_VALUE(student.is_cuda(), "dino_loss_cuda needs CUDA tensors");
  const c10::cuda::CUDAGuard guard(student.device());
  const DinoLossShape s = check_dino_loss_inputs(student, teacher, center_in, n_global, student_temp, teacher_temp);
  const auto dtype = student.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                    "dino_loss_cuda supports float32, bfloat16 and float16, got ", dtype);
  cuda::DinoLossProblem p{s.batch, s.n_crops, s.n_global, s.k, static_cast<float>(1.0 / student_temp),
                          static_cast<float>(1.0 / teacher_temp)};
  const at::Tensor center = center_in.to(at::kFloat).contiguous();
  at::Tensor grad = need_grad ? at::empty_like(student) : at::empty({0}, student.options());
  at::Tensor tsum = at::empty({need_sum ? s.k : 0}, student.options().dtype(at::kFloat));
  at::Tensor loss = at::empty({}, student.options().dtype(at::kFloat));
  at::Tensor workspace = at::empty({static_cast<int64_t>(cuda::dino_loss_workspace_bytes(p))},
                                   student.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  float* tsum_ptr = need_sum ? tsum.data_ptr<float>() : nullptr;
  cudaError_t err;
  clear_pending_cuda_error("dino_loss_cuda");
  if (dtype == at::kFloat) {
    err = cuda::dino_loss_forward_f32(p, student.data_ptr<float>(), teacher.data_ptr<float>(), center.data_ptr<float>(),
                                      loss.data_ptr<float>(), need_grad ? grad.data_ptr<float>() : nullptr, tsum_ptr,
                                      workspace.data_ptr(), stream);
  } else {
    const auto* sp = static_cast<const uint16_t*>(student.data_ptr());
    const auto* tp = static_cast<const uint16_t*>(teacher.data_ptr());
    auto* gp = need_grad ? static_cast<uint16_t*>(grad.data_ptr()) : nullptr;
    err = dtype == at::kHalf
              ? cuda::dino_loss_forward_f16(p, sp, tp, center.data_ptr<float>(), loss.data_ptr<float>(), gp, tsum_ptr,
                                            workspace.data_ptr(), stream)
              : cuda::dino_loss_forward_bf16(p, sp, tp, center.data_ptr<float>(), loss.data_ptr<float>(), gp,
                                             tsum_ptr, workspace.data_ptr(), stream);
  }
  TORCH_CHECK(err == cudaSuccess, "dino_loss_cuda: kernel launch failed: ", cudaGetErrorString(err));
  return {loss, grad, tsum};
}

}  // namespace ops
}  // namespace dinocxr

#include "cpu/dino_loss_op.h"

#include <limits>

#include "buffer_recycler.h"
#include "cpu/dino_loss.h"
#include "dino_loss_checks.h"

namespace dinocxr {
namespace ops {

std::tuple<at::Tensor, at::Tensor, at::Tensor> dino_loss_cpu(const at::Tensor& student_in, const at::Tensor& teacher_in,
                                                             const at::Tensor& center_in, double student_temp,
                                                             double teacher_temp, int64_t n_global, bool need_grad,
                                                             bool need_sum) {
  TORCH_CHECK_VALUE(student_in.device().is_cpu(), "dino_loss_cpu needs CPU tensors");
  // fp16 has no fast CPU path: compute in fp32 and cast the gradient back.
  const bool half = student_in.scalar_type() == at::kHalf;
  const at::Tensor student = half ? student_in.to(at::kFloat) : student_in;
  const at::Tensor teacher = half ? teacher_in.to(at::kFloat) : teacher_in;
  const DinoLossShape s = check_dino_loss_inputs(student, teacher, center_in, n_global, student_temp, teacher_temp);
  cpu::DinoLossProblem p{s.batch, s.n_crops, s.n_global, s.k, static_cast<float>(1.0 / student_temp),
                         static_cast<float>(1.0 / teacher_temp)};
  const auto dtype = student.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
                    "dino_loss_cpu supports float32, float64, bfloat16 and float16, got ", dtype);
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor center = center_in.to(acc).contiguous();
  static BufferRecycler grad_buffer;
  at::Tensor grad = need_grad ? grad_buffer.empty_like(student) : at::empty({0}, student.options());
  at::Tensor tsum = at::empty({need_sum ? s.k : 0}, student.options().dtype(at::kFloat));
  float* tsum_ptr = need_sum ? tsum.data_ptr<float>() : nullptr;
  cpu::DinoLossResult r{};
  if (dtype == at::kFloat) {
    r = cpu::dino_loss_forward<float>(p, student.data_ptr<float>(), teacher.data_ptr<float>(),
                                      center.data_ptr<float>(), need_grad ? grad.data_ptr<float>() : nullptr,
                                      tsum_ptr);
  } else if (dtype == at::kDouble) {
    r = cpu::dino_loss_forward<double>(p, student.data_ptr<double>(), teacher.data_ptr<double>(),
                                       center.data_ptr<double>(), need_grad ? grad.data_ptr<double>() : nullptr,
                                       tsum_ptr);
  } else {
    using Bits = cpu::BFloat16Bits;
    r = cpu::dino_loss_forward<Bits>(
        p, reinterpret_cast<const Bits*>(student.data_ptr<at::BFloat16>()),
        reinterpret_cast<const Bits*>(teacher.data_ptr<at::BFloat16>()), center.data_ptr<float>(),
        need_grad ? reinterpret_cast<Bits*>(grad.data_ptr<at::BFloat16>()) : nullptr, tsum_ptr);
  }
  const double value = r.non_finite ? std::numeric_limits<double>::quiet_NaN() : r.loss;
  at::Tensor loss = at::scalar_tensor(value, student.options().dtype(acc));
  if (half && need_grad) grad = grad.to(at::kHalf);
  return {loss, grad, tsum};
}

}  // namespace ops
}  // namespace dinocxr

#include "dino_loss_checks.h"

namespace dinocxr {

DinoLossShape check_dino_loss_inputs(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& center,
                                     int64_t n_global, double student_temp, double teacher_temp) {
  TORCH_CHECK_VALUE(student.dim() == 2, "student_out must be 2-D, got ", student.sizes());
  TORCH_CHECK_VALUE(teacher.dim() == 2, "teacher_out must be 2-D, got ", teacher.sizes());
  TORCH_CHECK_VALUE(student.is_contiguous(), "student_out must be contiguous");
  TORCH_CHECK_VALUE(teacher.is_contiguous(), "teacher_out must be contiguous");
  TORCH_CHECK_VALUE(center.is_contiguous(), "center must be contiguous");
  TORCH_CHECK_VALUE(student.scalar_type() == teacher.scalar_type(), "teacher_out must have the dtype of student_out (",
                    student.scalar_type(), "), got ", teacher.scalar_type());
  TORCH_CHECK_VALUE(student.device() == teacher.device() && student.device() == center.device(),
                    "student_out, teacher_out and center must be on one device");
  const int64_t k = student.size(1);
  TORCH_CHECK_VALUE(k >= 1 && teacher.size(1) == k, "teacher_out must have K=", k, " columns");
  TORCH_CHECK_VALUE(center.numel() == k, "center must have K=", k, " entries");
  TORCH_CHECK_VALUE(n_global >= 1 && teacher.size(0) > 0 && teacher.size(0) % n_global == 0,
                    "teacher_out rows must be a positive multiple of n_global");
  const int64_t batch = teacher.size(0) / n_global;
  TORCH_CHECK_VALUE(student.size(0) % batch == 0, "student_out rows must be a multiple of the batch size");
  const int64_t n_crops = student.size(0) / batch;
  TORCH_CHECK_VALUE(n_crops >= n_global && n_crops >= 2, "student_out must hold at least max(2, n_global) crops");
  TORCH_CHECK_VALUE(student_temp > 0 && teacher_temp > 0, "temperatures must be positive");
  return {batch, n_crops, n_global, k};
}

}  // namespace dinocxr

// dinocxr_fast._C: argument checks and CPU/CUDA dispatch for the fused ops, nothing else.
// The Python layer (dinocxr_fast/ops) has already validated shapes with messages naming the
// argument; the checks here keep the extension safe when it is called directly.
#include <torch/extension.h>

#include <omp.h>

#include <limits>
#include <string>
#include <tuple>

#include "cpu/dino_loss.h"

#ifdef DINOCXR_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../kernels/cuda/dino_loss.cuh"
#endif

namespace {

using Tensors = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

struct Shape {
  int64_t batch, n_crops, n_global, k;
};

Shape check_dino_inputs(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& center,
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

// Large CPU outputs are recycled when nobody else holds them: a fresh 80 MB gradient costs more in
// first-touch page faults than the whole fused pass (the CPU allocator does not cache). A buffer
// still referenced anywhere (autograd graph, a .grad, user code) is never reused.
at::Tensor recycled_empty(at::Tensor& slot, const at::Tensor& like) {
  if (slot.defined() && slot.sizes() == like.sizes() && slot.scalar_type() == like.scalar_type() &&
      slot.device() == like.device() && slot.use_count() == 1 && slot.storage().use_count() == 1) {
    return slot;
  }
  slot = at::empty_like(like, at::MemoryFormat::Contiguous);
  return slot;
}

Tensors dino_loss_cpu(const at::Tensor& student_in, const at::Tensor& teacher_in, const at::Tensor& center_in,
                      double student_temp, double teacher_temp, int64_t n_global, bool need_grad, bool need_sum) {
  TORCH_CHECK_VALUE(student_in.device().is_cpu(), "dino_loss_cpu needs CPU tensors");
  // fp16 has no fast CPU path: compute in fp32 and cast the gradient back.
  const bool half = student_in.scalar_type() == at::kHalf;
  const at::Tensor student = half ? student_in.to(at::kFloat) : student_in;
  const at::Tensor teacher = half ? teacher_in.to(at::kFloat) : teacher_in;
  const Shape s = check_dino_inputs(student, teacher, center_in, n_global, student_temp, teacher_temp);
  dinocxr::cpu::DinoLossProblem p{s.batch, s.n_crops, s.n_global, s.k, static_cast<float>(1.0 / student_temp),
                                  static_cast<float>(1.0 / teacher_temp)};
  const auto dtype = student.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
                    "dino_loss_cpu supports float32, float64, bfloat16 and float16, got ", dtype);
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor center = center_in.to(acc).contiguous();
  static at::Tensor grad_slot;
  at::Tensor grad = need_grad ? recycled_empty(grad_slot, student) : at::empty({0}, student.options());
  at::Tensor tsum = at::empty({need_sum ? s.k : 0}, student.options().dtype(at::kFloat));
  float* tsum_ptr = need_sum ? tsum.data_ptr<float>() : nullptr;
  dinocxr::cpu::DinoLossResult r{};
  if (dtype == at::kFloat) {
    r = dinocxr::cpu::dino_loss_forward<float>(p, student.data_ptr<float>(), teacher.data_ptr<float>(),
                                               center.data_ptr<float>(), need_grad ? grad.data_ptr<float>() : nullptr,
                                               tsum_ptr);
  } else if (dtype == at::kDouble) {
    r = dinocxr::cpu::dino_loss_forward<double>(p, student.data_ptr<double>(), teacher.data_ptr<double>(),
                                                center.data_ptr<double>(),
                                                need_grad ? grad.data_ptr<double>() : nullptr, tsum_ptr);
  } else {
    using Bits = dinocxr::cpu::BFloat16Bits;
    r = dinocxr::cpu::dino_loss_forward<Bits>(
        p, reinterpret_cast<const Bits*>(student.data_ptr<at::BFloat16>()),
        reinterpret_cast<const Bits*>(teacher.data_ptr<at::BFloat16>()), center.data_ptr<float>(),
        need_grad ? reinterpret_cast<Bits*>(grad.data_ptr<at::BFloat16>()) : nullptr, tsum_ptr);
  }
  const double value = r.non_finite ? std::numeric_limits<double>::quiet_NaN() : r.loss;
  at::Tensor loss = at::scalar_tensor(value, student.options().dtype(acc));
  if (half && need_grad) grad = grad.to(at::kHalf);
  return {loss, grad, tsum};
}

#ifdef DINOCXR_WITH_CUDA
Tensors dino_loss_cuda(const at::Tensor& student_in, const at::Tensor& teacher_in, const at::Tensor& center_in,
                       double student_temp, double teacher_temp, int64_t n_global, bool need_grad, bool need_sum) {
  TORCH_CHECK_VALUE(student_in.is_cuda(), "dino_loss_cuda needs CUDA tensors");
  const c10::cuda::CUDAGuard guard(student_in.device());
  const bool half = student_in.scalar_type() == at::kHalf;
  const at::Tensor student = half ? student_in.to(at::kFloat) : student_in;
  const at::Tensor teacher = half ? teacher_in.to(at::kFloat) : teacher_in;
  const Shape s = check_dino_inputs(student, teacher, center_in, n_global, student_temp, teacher_temp);
  const auto dtype = student.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16,
                    "dino_loss_cuda supports float32, bfloat16 and float16, got ", dtype);
  dinocxr::cuda::DinoLossProblem p{s.batch, s.n_crops, s.n_global, s.k, static_cast<float>(1.0 / student_temp),
                                   static_cast<float>(1.0 / teacher_temp)};
  const at::Tensor center = center_in.to(at::kFloat).contiguous();
  at::Tensor grad = need_grad ? at::empty_like(student) : at::empty({0}, student.options());
  at::Tensor tsum = at::empty({need_sum ? s.k : 0}, student.options().dtype(at::kFloat));
  at::Tensor loss = at::empty({}, student.options().dtype(at::kFloat));
  at::Tensor workspace = at::empty({static_cast<int64_t>(dinocxr::cuda::dino_loss_workspace_bytes(p))},
                                   student.options().dtype(at::kByte));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  float* tsum_ptr = need_sum ? tsum.data_ptr<float>() : nullptr;
  cudaError_t err;
  if (dtype == at::kFloat) {
    err = dinocxr::cuda::dino_loss_forward_f32(p, student.data_ptr<float>(), teacher.data_ptr<float>(),
                                               center.data_ptr<float>(), loss.data_ptr<float>(),
                                               need_grad ? grad.data_ptr<float>() : nullptr, tsum_ptr,
                                               workspace.data_ptr(), stream);
  } else {
    err = dinocxr::cuda::dino_loss_forward_bf16(
        p, reinterpret_cast<const uint16_t*>(student.data_ptr<at::BFloat16>()),
        reinterpret_cast<const uint16_t*>(teacher.data_ptr<at::BFloat16>()), center.data_ptr<float>(),
        loss.data_ptr<float>(), need_grad ? reinterpret_cast<uint16_t*>(grad.data_ptr<at::BFloat16>()) : nullptr,
        tsum_ptr, workspace.data_ptr(), stream);
  }
  TORCH_CHECK(err == cudaSuccess, "dino_loss_cuda: kernel launch failed: ", cudaGetErrorString(err));
  if (half && need_grad) grad = grad.to(at::kHalf);
  return {loss, grad, tsum};
}
#endif

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dinocxr_fast fused ops (C++/OpenMP on the CPU, CUDA when built with it)";
#ifdef DINOCXR_WITH_CUDA
  m.attr("built_with_cuda") = true;
  m.def("dino_loss_cuda", &dino_loss_cuda, "Fused DINO loss on CUDA: (loss, grad_student, teacher_col_sum)",
        py::arg("student_out"), py::arg("teacher_out"), py::arg("center"), py::arg("student_temp"),
        py::arg("teacher_temp"), py::arg("n_global"), py::arg("need_grad"), py::arg("need_sum"));
#else
  m.attr("built_with_cuda") = false;
#endif
  m.def("dino_loss_cpu", &dino_loss_cpu, "Fused DINO loss on the CPU: (loss, grad_student, teacher_col_sum)",
        py::arg("student_out"), py::arg("teacher_out"), py::arg("center"), py::arg("student_temp"),
        py::arg("teacher_temp"), py::arg("n_global"), py::arg("need_grad"), py::arg("need_sum"));
  m.def("num_threads", []() { return omp_get_max_threads(); }, "OpenMP threads the CPU kernels use");
  m.def("cpu_isa", []() { return std::string(dinocxr::cpu::active_isa()); },
        "Instruction set of the CPU row kernels: 'avx2' or 'portable'");
  m.def("force_portable_cpu", &dinocxr::cpu::set_force_portable, py::arg("portable"),
        "Testing hook: use the portable CPU kernels even where AVX2 is available");
}

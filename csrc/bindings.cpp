// dinocxr_fast._C: argument checks and CPU/CUDA dispatch for the fused ops, nothing else.
// The Python layer (dinocxr_fast/ops) has already validated shapes with messages naming the
// argument; the checks here keep the extension safe when it is called directly.
#include <torch/extension.h>

#include <omp.h>

#include <cmath>
#include <limits>
#include <mutex>
#include <string>
#include <tuple>

#include "cpu/bn_act.h"
#include "cpu/dino_loss.h"

#ifdef DINOCXR_WITH_CUDA
// c10's stream and guard headers only (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS and
// cuSPARSE headers the kernels never use).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "conv3x3.cuh"
#include "dino_loss.cuh"
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
// first-touch page faults than the whole fused pass (the CPU allocator does not cache). The slot keeps
// its own TensorImpl and callers get a second one on the same storage: a Python object bound to the
// returned tensor would otherwise pin the slot's TensorImpl (PyObject preservation), so it never looked
// free. A storage still referenced anywhere (autograd graph, a .grad, a view, user code) is never reused.
at::Tensor recycled_empty(at::Tensor& slot, const at::Tensor& like) {
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  if (!(slot.defined() && slot.sizes() == like.sizes() && slot.scalar_type() == like.scalar_type() &&
        slot.device() == like.device() && slot.storage().use_count() == 1)) {
    slot = at::empty_like(like, at::MemoryFormat::Contiguous);
  }
  at::Tensor out = at::empty({0}, slot.options());
  out.set_(slot.storage(), 0, slot.sizes(), slot.strides());
  return out;
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

// ---- BatchNorm + activation on the CPU (csrc/cpu/bn_act.h) ---------------------------------------
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

// (out [M, C], stats [3, C]: mean hi, mean lo, invstd; new running mean and var [2, C], empty in eval).
Tensors bn_act_forward_cpu(const at::Tensor& y, const at::Tensor& gamma, const at::Tensor& beta,
                           const at::Tensor& running_mean, const at::Tensor& running_var, double eps, double momentum,
                           bool training, int64_t act) {
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
  const dinocxr::cpu::BnActProblem p{rows, channels, bn_act_code(act)};
  at::Tensor out = at::empty_like(y);
  at::Tensor stats = at::empty({3, channels}, y.options());
  at::Tensor running = at::empty({training ? 2 : 0, channels}, y.options());
  if (training) {
    dinocxr::cpu::bn_act_forward_train(p, y.data_ptr<float>(), gamma.data_ptr<float>(), beta.data_ptr<float>(), eps,
                                       momentum, running_mean.data_ptr<float>(), running_var.data_ptr<float>(),
                                       out.data_ptr<float>(), stats.data_ptr<float>(), running.data_ptr<float>());
  } else {
    dinocxr::cpu::bn_act_forward_eval(p, y.data_ptr<float>(), gamma.data_ptr<float>(), beta.data_ptr<float>(), eps,
                                      running_mean.data_ptr<float>(), running_var.data_ptr<float>(),
                                      out.data_ptr<float>(), stats.data_ptr<float>());
  }
  return {out, stats, running};
}

// (dy [M, C] or empty when not need_input_grad, dgamma [C], dbeta [C]).
Tensors bn_act_backward_cpu(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& gamma,
                            const at::Tensor& beta, const at::Tensor& stats, bool training, int64_t act,
                            bool need_input_grad) {
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
  const dinocxr::cpu::BnActProblem p{rows, channels, bn_act_code(act)};
  at::Tensor dy = need_input_grad ? at::empty_like(y) : at::empty({0}, y.options());
  at::Tensor dgamma = at::empty({channels}, y.options());
  at::Tensor dbeta = at::empty({channels}, y.options());
  dinocxr::cpu::bn_act_backward(p, training, grad.data_ptr<float>(), y.data_ptr<float>(), gamma.data_ptr<float>(),
                                beta.data_ptr<float>(), stats.data_ptr<float>(),
                                need_input_grad ? dy.data_ptr<float>() : nullptr, dgamma.data_ptr<float>(),
                                dbeta.data_ptr<float>());
  return {dy, dgamma, dbeta};
}

#ifdef DINOCXR_WITH_CUDA
// Each launch is checked with cudaGetLastError, which also returns an error some earlier,
// unrelated call left behind: take that one off first (and say so), so the check after the
// launch reports the launch's own failure only. A sticky error still fails the launch itself.
void clear_pending_cuda_error(const char* op) {
  const cudaError_t pending = cudaGetLastError();
  if (pending != cudaSuccess) {
    TORCH_WARN(op, ": a CUDA error from an earlier call was pending before this launch and was cleared: ",
               cudaGetErrorString(pending));
  }
}

Tensors dino_loss_cuda(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& center_in,
                       double student_temp, double teacher_temp, int64_t n_global, bool need_grad, bool need_sum) {
  TORCH_CHECK_VALUE(student.is_cuda(), "dino_loss_cuda needs CUDA tensors");
  const c10::cuda::CUDAGuard guard(student.device());
  const Shape s = check_dino_inputs(student, teacher, center_in, n_global, student_temp, teacher_temp);
  const auto dtype = student.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                    "dino_loss_cuda supports float32, bfloat16 and float16, got ", dtype);
  dinocxr::cuda::DinoLossProblem p{s.batch, s.n_crops, s.n_global, s.k, static_cast<float>(1.0 / student_temp),
                                   static_cast<float>(1.0 / teacher_temp)};
  const at::Tensor center = center_in.to(at::kFloat).contiguous();
  at::Tensor grad = need_grad ? at::empty_like(student) : at::empty({0}, student.options());
  at::Tensor tsum = at::empty({need_sum ? s.k : 0}, student.options().dtype(at::kFloat));
  at::Tensor loss = at::empty({}, student.options().dtype(at::kFloat));
  at::Tensor workspace = at::empty({static_cast<int64_t>(dinocxr::cuda::dino_loss_workspace_bytes(p))},
                                   student.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  float* tsum_ptr = need_sum ? tsum.data_ptr<float>() : nullptr;
  cudaError_t err;
  clear_pending_cuda_error("dino_loss_cuda");
  if (dtype == at::kFloat) {
    err = dinocxr::cuda::dino_loss_forward_f32(p, student.data_ptr<float>(), teacher.data_ptr<float>(),
                                               center.data_ptr<float>(), loss.data_ptr<float>(),
                                               need_grad ? grad.data_ptr<float>() : nullptr, tsum_ptr,
                                               workspace.data_ptr(), stream);
  } else {
    const auto* sp = static_cast<const uint16_t*>(student.data_ptr());
    const auto* tp = static_cast<const uint16_t*>(teacher.data_ptr());
    auto* gp = need_grad ? static_cast<uint16_t*>(grad.data_ptr()) : nullptr;
    err = dtype == at::kHalf
              ? dinocxr::cuda::dino_loss_forward_f16(p, sp, tp, center.data_ptr<float>(), loss.data_ptr<float>(), gp,
                                                     tsum_ptr, workspace.data_ptr(), stream)
              : dinocxr::cuda::dino_loss_forward_bf16(p, sp, tp, center.data_ptr<float>(), loss.data_ptr<float>(), gp,
                                                      tsum_ptr, workspace.data_ptr(), stream);
  }
  TORCH_CHECK(err == cudaSuccess, "dino_loss_cuda: kernel launch failed: ", cudaGetErrorString(err));
  return {loss, grad, tsum};
}

// ---- PCM convolutions (kernels/cuda/conv3x3.cuh) ----------------------------------------------
namespace dc = dinocxr::cuda;
using OptTensor = c10::optional<at::Tensor>;

dc::DType conv_dtype(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return dc::DType::kF32;
    case at::kHalf: return dc::DType::kF16;
    case at::kBFloat16: return dc::DType::kBF16;
    default: TORCH_CHECK_VALUE(false, name, " must be float32, float16 or bfloat16, got ", t);
  }
  return dc::DType::kF32;
}

dc::DType dtype_code(int64_t code) {
  TORCH_CHECK_VALUE(code >= 0 && code <= 2, "dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  return static_cast<dc::DType>(code);
}

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.defined(), name, " is required");
  TORCH_CHECK_VALUE(t.is_cuda() && t.device() == like.device(), name, " must be a CUDA tensor on ", like.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

void check_data(const at::Tensor& t, const char* name, const at::Tensor& like, int64_t numel) {
  check_cuda(t, name, like);
  TORCH_CHECK_VALUE(t.scalar_type() == like.scalar_type(), name, " must have dtype ", like.scalar_type(), ", got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.numel() == numel, name, " must have ", numel, " elements, got ", t.numel());
}

// A per-channel fp32 vector (or null when absent).
const float* channel_vec(const OptTensor& t, const char* name, const at::Tensor& like, int64_t channels) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_cuda(*t, name, like);
  TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat, name, " must be float32, got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->numel() == channels, name, " must have ", channels, " elements, got ", t->numel());
  return t->data_ptr<float>();
}

int to_int(int64_t v, const char* name) {
  TORCH_CHECK_VALUE(v >= std::numeric_limits<int>::min() && v <= std::numeric_limits<int>::max(), name,
                    " is out of range: ", v);
  return static_cast<int>(v);
}

dc::Act to_act(int64_t act) {
  TORCH_CHECK_VALUE(act >= 0 && act <= 3, "act must be 0 (none), 1 (silu), 2 (gelu) or 3 (relu), got ", act);
  return static_cast<dc::Act>(act);
}

// geom = [batch, in_h, in_w, in_c, out_h, out_w, out_c, grid_h, grid_w, in_stride, out_stride, out_y0,
//         out_x0, groups]; taps given as two lists of offsets.
dc::TapConv make_tap_conv(const std::vector<int64_t>& geom, const std::vector<int64_t>& tap_dy,
                          const std::vector<int64_t>& tap_dx) {
  TORCH_CHECK_VALUE(geom.size() == 14, "geom must have 14 entries, got ", geom.size());
  TORCH_CHECK_VALUE(tap_dy.size() == tap_dx.size() && !tap_dy.empty() && tap_dy.size() <= dc::kMaxTaps,
                    "tap_dy and tap_dx must have the same length, 1..9");
  dc::TapConv c{};
  int* fields[] = {&c.batch, &c.in_h, &c.in_w, &c.in_c, &c.out_h, &c.out_w, &c.out_c,
                   &c.grid_h, &c.grid_w, &c.in_stride, &c.out_stride, &c.out_y0, &c.out_x0, &c.groups};
  for (size_t i = 0; i < geom.size(); ++i) *fields[i] = to_int(geom[i], "geom");
  c.n_taps = static_cast<int>(tap_dy.size());
  for (int t = 0; t < c.n_taps; ++t) c.tap_dy[t] = to_int(tap_dy[t], "tap_dy"), c.tap_dx[t] = to_int(tap_dx[t], "tap_dx");
  return c;
}

// (supported, implementation "direct" / "mma" / "wgmma", reason) for a tap convolution with
// aligned tensors on `device`.
py::tuple tap_conv_info(const std::vector<int64_t>& geom, const std::vector<int64_t>& tap_dy,
                        const std::vector<int64_t>& tap_dx, int64_t dtype, int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const dc::TapConv c = make_tap_conv(geom, tap_dy, tap_dx);
  const dc::TapConvPlan plan = dc::tap_conv_plan(c, dtype_code(dtype), nullptr, nullptr, nullptr, nullptr,
                                                 dc::EpiKind::kAffineAct);
  static const char* names[] = {"direct", "mma", "wgmma"};
  return py::make_tuple(plan.supported, std::string(names[static_cast<int>(plan.impl)]), std::string(plan.reason));
}

// Runs one tap convolution into `out` (preallocated: the data gradient of a strided conv is four
// launches into one tensor). Returns the epilogue's partial sums [rows, out_c, 2] (empty for kAffineAct).
at::Tensor tap_conv_cuda(const at::Tensor& x, const at::Tensor& w, at::Tensor& out, const std::vector<int64_t>& geom,
                         const std::vector<int64_t>& tap_dy, const std::vector<int64_t>& tap_dx,
                         const OptTensor& pro_scale, const OptTensor& pro_shift, int64_t epi_kind, int64_t act,
                         const OptTensor& scale, const OptTensor& shift, const OptTensor& ref, const OptTensor& aux,
                         const OptTensor& z_scale, const OptTensor& z_shift, const OptTensor& xh_scale,
                         const OptTensor& xh_shift) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const dc::TapConv c = make_tap_conv(geom, tap_dy, tap_dx);
  TORCH_CHECK_VALUE(c.groups >= 1 && c.in_c % c.groups == 0 && c.out_c % c.groups == 0,
                    "channels must be divisible by groups");
  const dc::DType dt = conv_dtype(x.scalar_type(), "x");
  check_data(x, "x", x, static_cast<int64_t>(c.batch) * c.in_h * c.in_w * c.in_c);
  check_data(w, "weight", x, static_cast<int64_t>(c.out_c) * c.n_taps * (c.in_c / c.groups));
  const int64_t out_numel = static_cast<int64_t>(c.batch) * c.out_h * c.out_w * c.out_c;
  check_data(out, "out", x, out_numel);
  TORCH_CHECK_VALUE(epi_kind >= 0 && epi_kind <= 2, "epi_kind must be 0, 1 or 2");
  dc::Prologue pro;
  pro.scale = channel_vec(pro_scale, "pro_scale", x, c.in_c);
  pro.shift = channel_vec(pro_shift, "pro_shift", x, c.in_c);
  TORCH_CHECK_VALUE((pro.scale == nullptr) == (pro.shift == nullptr), "pro_scale and pro_shift go together");
  dc::Epilogue epi;
  epi.kind = static_cast<dc::EpiKind>(epi_kind);
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
  const dc::TapConvPlan plan = dc::tap_conv_plan(c, dt, x.data_ptr(), w.data_ptr(), out.data_ptr(), epi.aux, epi.kind);
  TORCH_CHECK_VALUE(plan.supported, "tap_conv_cuda: unsupported problem: ", plan.reason);
  at::Tensor partials = at::empty({plan.partial_rows, c.out_c, 2}, x.options().dtype(at::kFloat));
  epi.partials = plan.partial_rows > 0 ? reinterpret_cast<float2*>(partials.data_ptr<float>()) : nullptr;
  clear_pending_cuda_error("tap_conv_cuda");
  const cudaError_t err = dc::tap_conv_forward(plan, c, dt, x.data_ptr(), w.data_ptr(), out.data_ptr(), pro, epi,
                                               c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "tap_conv_cuda: ", cudaGetErrorString(err));
  return partials;
}

dc::WgradConv make_wgrad(const at::Tensor& x, const at::Tensor& dy, int64_t groups, int64_t stride) {
  TORCH_CHECK_VALUE(x.dim() == 4 && dy.dim() == 4, "x and dy must be B x H x W x C");
  dc::WgradConv c{};
  c.batch = to_int(x.size(0), "batch");
  c.in_h = to_int(x.size(1), "x height"), c.in_w = to_int(x.size(2), "x width"), c.in_c = to_int(x.size(3), "x channels");
  c.out_h = to_int(dy.size(1), "dy height"), c.out_w = to_int(dy.size(2), "dy width");
  c.out_c = to_int(dy.size(3), "dy channels");
  c.groups = to_int(groups, "groups"), c.stride = to_int(stride, "stride");
  TORCH_CHECK_VALUE(dy.size(0) == x.size(0), "dy must have x's batch size");
  return c;
}

// (supported, tensor_cores, splits, reason)
py::tuple wgrad_info(const std::vector<int64_t>& shape, int64_t dtype, int64_t device) {
  TORCH_CHECK_VALUE(shape.size() == 9, "shape = [batch, in_h, in_w, in_c, out_h, out_w, out_c, groups, stride]");
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  dc::WgradConv c{};
  int* fields[] = {&c.batch, &c.in_h, &c.in_w, &c.in_c, &c.out_h, &c.out_w, &c.out_c, &c.groups, &c.stride};
  for (size_t i = 0; i < shape.size(); ++i) *fields[i] = to_int(shape[i], "shape");
  const dc::WgradPlan plan = dc::wgrad_plan(c, dtype_code(dtype), nullptr, nullptr);
  return py::make_tuple(plan.supported, plan.tensor_cores, plan.splits, std::string(plan.reason));
}

// Weight (and bias) gradient of the forward conv x -> dy: dw fp32 [out_c, cin_g, 3, 3], db fp32 [out_c].
std::tuple<at::Tensor, at::Tensor> wgrad_cuda(const at::Tensor& x, const at::Tensor& dy, const OptTensor& pro_scale,
                                              const OptTensor& pro_shift, int64_t groups, int64_t stride,
                                              bool need_bias) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const dc::WgradConv c = make_wgrad(x, dy, groups, stride);
  const dc::DType dt = conv_dtype(x.scalar_type(), "x");
  check_data(x, "x", x, x.numel());
  check_data(dy, "dy", x, dy.numel());
  dc::Prologue pro;
  pro.scale = channel_vec(pro_scale, "pro_scale", x, c.in_c);
  pro.shift = channel_vec(pro_shift, "pro_shift", x, c.in_c);
  TORCH_CHECK_VALUE((pro.scale == nullptr) == (pro.shift == nullptr), "pro_scale and pro_shift go together");
  const dc::WgradPlan plan = dc::wgrad_plan(c, dt, x.data_ptr(), dy.data_ptr());
  TORCH_CHECK_VALUE(plan.supported, "wgrad_cuda: unsupported problem: ", plan.reason);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dw = at::empty({c.out_c, c.in_c / c.groups, 3, 3}, f32);
  at::Tensor db = at::empty({need_bias ? c.out_c : 0}, f32);
  at::Tensor workspace = at::empty({static_cast<int64_t>(plan.workspace_bytes)}, x.options().dtype(at::kByte));
  clear_pending_cuda_error("wgrad_cuda");
  const cudaError_t err = dc::wgrad(plan, c, dt, x.data_ptr(), pro, dy.data_ptr(), dw.data_ptr<float>(),
                                    need_bias ? db.data_ptr<float>() : nullptr, workspace.data_ptr(),
                                    c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "wgrad_cuda: ", cudaGetErrorString(err));
  return {dw, db};
}

void check_partials(const at::Tensor& partials, int64_t channels) {
  TORCH_CHECK_VALUE(partials.is_cuda() && partials.is_contiguous() && partials.scalar_type() == at::kFloat,
                    "partials must be a contiguous float32 CUDA tensor");
  TORCH_CHECK_VALUE(partials.dim() == 3 && partials.size(1) == channels && partials.size(2) == 2 &&
                        partials.size(0) >= 1,
                    "partials must be [rows >= 1, ", channels, ", 2], got ", partials.sizes());
}

// [6, C]: mean, invstd, scale, shift, new running mean, new running var.
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
  const cudaError_t err = dc::bn_forward_finalize(
      reinterpret_cast<const float2*>(partials.data_ptr<float>()), partials.size(0), to_int(channels, "channels"),
      count, channel_vec(ref, "ref", partials, channels), g, b, static_cast<float>(eps), static_cast<float>(momentum),
      channel_vec(running_mean, "running_mean", partials, channels),
      channel_vec(running_var, "running_var", partials, channels), out.data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "bn_forward_finalize_cuda: ", cudaGetErrorString(err));
  return out;
}

// [5, C]: dgamma, dbeta, A, B, C with dy = A dz + B y + C.
at::Tensor bn_backward_finalize_cuda(const at::Tensor& partials, int64_t count, const at::Tensor& gamma,
                                     const at::Tensor& mean, const at::Tensor& invstd, bool training) {
  TORCH_CHECK_VALUE(partials.is_cuda(), "partials must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(partials.device());
  const int64_t channels = gamma.numel();
  check_partials(partials, channels);
  TORCH_CHECK_VALUE(count >= 1, "count must be positive");
  at::Tensor out = at::empty({5, channels}, partials.options());
  clear_pending_cuda_error("bn_backward_finalize_cuda");
  const cudaError_t err = dc::bn_backward_finalize(
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
  const dc::DType dt = conv_dtype(y.scalar_type(), "y");
  check_cuda(y, "y", y);
  const int64_t channels = y.size(-1);
  at::Tensor out = at::empty_like(y);
  clear_pending_cuda_error("affine_act_cuda");
  const cudaError_t err = dc::affine_act(dt, y.data_ptr(), out.data_ptr(), y.numel() / channels,
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
  const dc::DType dt = conv_dtype(y.scalar_type(), "y");
  check_data(y, "y", y, y.numel());
  check_data(g, "grad", y, y.numel());
  const int64_t channels = y.size(-1), rows = y.numel() / channels;
  at::Tensor partials = at::empty({dc::act_backward_stats_rows(rows, to_int(channels, "channels")), channels, 2},
                                  y.options().dtype(at::kFloat));
  clear_pending_cuda_error("act_backward_stats_cuda");
  const cudaError_t err = dc::act_backward_stats(
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
  const dc::DType dt = conv_dtype(y.scalar_type(), "y");
  check_data(y, "y", y, y.numel());
  check_data(g, "grad", y, y.numel());
  const int64_t channels = y.size(-1);
  at::Tensor dy = inplace ? g : at::empty_like(g);
  clear_pending_cuda_error("bn_backward_apply_cuda");
  const cudaError_t err = dc::bn_backward_apply(
      dt, g.data_ptr(), y.data_ptr(), dy.data_ptr(), y.numel() / channels, to_int(channels, "channels"),
      channel_vec(z_scale, "z_scale", y, channels), channel_vec(z_shift, "z_shift", y, channels), to_act(act),
      channel_vec(a, "a", y, channels), channel_vec(b, "b", y, channels), channel_vec(c, "c", y, channels),
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "bn_backward_apply_cuda: ", cudaGetErrorString(err));
  return dy;
}

dc::PcmChain make_chain(const std::vector<int64_t>& shape) {
  TORCH_CHECK_VALUE(shape.size() == 9, "shape = [batch, in_h, in_w, c0, c1, c2, c3, groups, stride1]");
  dc::PcmChain c{};
  int* fields[] = {&c.batch, &c.in_h, &c.in_w, &c.c0, &c.c1, &c.c2, &c.c3, &c.groups, &c.stride1};
  for (size_t i = 0; i < shape.size(); ++i) *fields[i] = to_int(shape[i], "shape");
  return c;
}

// (supported, groups_per_block, smem_bytes, reason) for aligned tensors on `device`.
py::tuple pcm_fused_info(const std::vector<int64_t>& shape, int64_t dtype, int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const dc::PcmFusedPlan plan = dc::pcm_fused_plan(make_chain(shape), dtype_code(dtype), nullptr, nullptr);
  return py::make_tuple(plan.supported, plan.groups_per_block, static_cast<int64_t>(plan.smem_bytes),
                        std::string(plan.reason));
}

at::Tensor pcm_fused_cuda(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& w3,
                          const at::Tensor& s1, const at::Tensor& t1, const at::Tensor& s2, const at::Tensor& t2,
                          const OptTensor& s3, const at::Tensor& t3, int64_t groups, int64_t stride1) {
  TORCH_CHECK_VALUE(x.is_cuda() && x.dim() == 4, "x must be a B x H x W x C CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const dc::DType dt = conv_dtype(x.scalar_type(), "x");
  TORCH_CHECK_VALUE(w1.dim() == 3 && w2.dim() == 3 && w3.dim() == 3, "weights must be [c_out, 9, cin_g]");
  const dc::PcmChain c = make_chain({x.size(0), x.size(1), x.size(2), x.size(3), w1.size(0), w2.size(0), w3.size(0),
                                     groups, stride1});
  TORCH_CHECK_VALUE(c.groups >= 1 && c.c0 % c.groups == 0 && c.c1 % c.groups == 0 && c.c2 % c.groups == 0 &&
                        c.c3 % c.groups == 0,
                    "channels must be divisible by groups");
  check_data(x, "x", x, x.numel());
  check_data(w1, "w1", x, static_cast<int64_t>(c.c1) * 9 * (c.c0 / c.groups));
  check_data(w2, "w2", x, static_cast<int64_t>(c.c2) * 9 * (c.c1 / c.groups));
  check_data(w3, "w3", x, static_cast<int64_t>(c.c3) * 9 * (c.c2 / c.groups));
  const int64_t h1 = (c.in_h - 1) / c.stride1 + 1, w1o = (c.in_w - 1) / c.stride1 + 1;
  at::Tensor out = at::empty({c.batch, h1, w1o, c.c3}, x.options());
  const dc::PcmFusedPlan plan = dc::pcm_fused_plan(c, dt, x.data_ptr(), out.data_ptr());
  TORCH_CHECK_VALUE(plan.supported, "pcm_fused_cuda: unsupported problem: ", plan.reason);
  clear_pending_cuda_error("pcm_fused_cuda");
  const cudaError_t err = dc::pcm_fused_inference(
      plan, c, dt, x.data_ptr(), w1.data_ptr(), w2.data_ptr(), w3.data_ptr(), channel_vec(s1, "s1", x, c.c1),
      channel_vec(t1, "t1", x, c.c1), channel_vec(s2, "s2", x, c.c2), channel_vec(t2, "t2", x, c.c2),
      channel_vec(s3, "s3", x, c.c3), channel_vec(t3, "t3", x, c.c3), out.data_ptr(),
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "pcm_fused_cuda: ", cudaGetErrorString(err));
  return out;
}
#endif

}  // namespace

// The CPU BatchNorm + activation as dispatcher ops: their forward kernels run with no Python in
// between. Fake (meta) kernels and autograd are registered from Python (dinocxr_fast/ops/bn_act_cpu.py,
// torch.library.register_fake / register_autograd).
TORCH_LIBRARY_FRAGMENT(dinocxr, m) {
  m.def("bn_act_cpu(Tensor y, Tensor bn_weight, Tensor bn_bias, Tensor running_mean, Tensor running_var, "
        "float eps, float momentum, bool training, int activation) -> (Tensor, Tensor, Tensor)");
  m.def("bn_act_cpu_backward(Tensor grad, Tensor y, Tensor bn_weight, Tensor bn_bias, Tensor stats, "
        "bool training, int activation, bool need_input_grad) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dinocxr, CPU, m) {
  m.impl("bn_act_cpu", &bn_act_forward_cpu);
  m.impl("bn_act_cpu_backward", &bn_act_backward_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dinocxr_fast fused ops (C++/OpenMP on the CPU, CUDA when built with it)";
#ifdef DINOCXR_WITH_CUDA
  m.attr("built_with_cuda") = true;
  m.def("dino_loss_cuda", &dino_loss_cuda, "Fused DINO loss on CUDA: (loss, grad_student, teacher_col_sum)",
        py::arg("student_out"), py::arg("teacher_out"), py::arg("center"), py::arg("student_temp"),
        py::arg("teacher_temp"), py::arg("n_global"), py::arg("need_grad"), py::arg("need_sum"));
  m.def("tap_conv_info", &tap_conv_info, "(supported, tensor_cores, reason) of a tap convolution",
        py::arg("geom"), py::arg("tap_dy"), py::arg("tap_dx"), py::arg("dtype"), py::arg("device"));
  m.def("tap_conv_cuda", &tap_conv_cuda, "3x3 tap convolution with prologue / epilogue into out; returns partials",
        py::arg("x"), py::arg("w"), py::arg("out"), py::arg("geom"), py::arg("tap_dy"), py::arg("tap_dx"),
        py::arg("pro_scale"), py::arg("pro_shift"), py::arg("epi_kind"), py::arg("act"), py::arg("scale"),
        py::arg("shift"), py::arg("ref"), py::arg("aux"), py::arg("z_scale"), py::arg("z_shift"),
        py::arg("xh_scale"), py::arg("xh_shift"));
  m.def("wgrad_info", &wgrad_info, "(supported, tensor_cores, splits, reason) of a weight gradient",
        py::arg("shape"), py::arg("dtype"), py::arg("device"));
  m.def("wgrad_cuda", &wgrad_cuda, "Weight and bias gradient of a 3x3 conv: (dw fp32, db fp32)", py::arg("x"),
        py::arg("dy"), py::arg("pro_scale"), py::arg("pro_shift"), py::arg("groups"), py::arg("stride"),
        py::arg("need_bias"));
  m.def("bn_forward_finalize_cuda", &bn_forward_finalize_cuda, "BatchNorm statistics from partial sums: [6, C]",
        py::arg("partials"), py::arg("count"), py::arg("ref"), py::arg("gamma"), py::arg("beta"), py::arg("eps"),
        py::arg("momentum"), py::arg("running_mean"), py::arg("running_var"));
  m.def("bn_backward_finalize_cuda", &bn_backward_finalize_cuda, "BatchNorm backward coefficients: [5, C]",
        py::arg("partials"), py::arg("count"), py::arg("gamma"), py::arg("mean"), py::arg("invstd"),
        py::arg("training"));
  m.def("affine_act_cuda", &affine_act_cuda, "act(y * scale + shift) per channel", py::arg("y"), py::arg("scale"),
        py::arg("shift"), py::arg("act"));
  m.def("act_backward_stats_cuda", &act_backward_stats_cuda, "Partial sums of dz and dz * xhat", py::arg("grad"),
        py::arg("y"), py::arg("z_scale"), py::arg("z_shift"), py::arg("act"), py::arg("xh_scale"),
        py::arg("xh_shift"));
  m.def("bn_backward_apply_cuda", &bn_backward_apply_cuda, "dy = A dz + B y + C, dz = grad * act'(z)",
        py::arg("grad"), py::arg("y"), py::arg("z_scale"), py::arg("z_shift"), py::arg("act"), py::arg("a"),
        py::arg("b"), py::arg("c"), py::arg("inplace"));
  m.def("force_direct_conv", &dc::set_force_direct, py::arg("direct"),
        "Testing hook: run every PCM convolution on the direct kernels (no tensor cores)");
  m.def("conv_use_wgmma", &dc::set_use_wgmma, py::arg("use"),
        "Prefer the wgmma (sm_90a) kernel for dense PCM convolutions (off by default)");
  m.def("wgmma_available", [](int64_t device) {
        const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
        return dc::wgmma_compiled();
      }, py::arg("device"), "Whether `device` is sm_90 and this build holds sm_90a code for it");
  m.def("pcm_fused_info", &pcm_fused_info, "(supported, groups_per_block, smem_bytes, reason) of the fused PCM",
        py::arg("shape"), py::arg("dtype"), py::arg("device"));
  m.def("pcm_fused_cuda", &pcm_fused_cuda, "Whole grouped PCM at inference in one kernel", py::arg("x"),
        py::arg("w1"), py::arg("w2"), py::arg("w3"), py::arg("s1"), py::arg("t1"), py::arg("s2"), py::arg("t2"),
        py::arg("s3"), py::arg("t3"), py::arg("groups"), py::arg("stride1"));
#else
  m.attr("built_with_cuda") = false;
#endif
  m.def("dino_loss_cpu", &dino_loss_cpu, "Fused DINO loss on the CPU: (loss, grad_student, teacher_col_sum)",
        py::arg("student_out"), py::arg("teacher_out"), py::arg("center"), py::arg("student_temp"),
        py::arg("teacher_temp"), py::arg("n_global"), py::arg("need_grad"), py::arg("need_sum"));
  m.def("num_threads", []() { return omp_get_max_threads(); }, "OpenMP threads the CPU kernels use");
  m.def("cpu_isa", []() { return std::string(dinocxr::cpu::active_isa()); },
        "Instruction set of the CPU DINO loss row kernels: 'avx512', 'avx2' or 'portable'");
  m.def("limit_cpu_isa", [](const std::string& isa) {
        TORCH_CHECK_VALUE(dinocxr::cpu::set_isa_limit(isa.c_str()),
                          "limit_cpu_isa: expected 'avx512', 'avx2' or 'portable', got '", isa, "'");
      }, py::arg("isa"), "Testing hook: cap the CPU DINO loss row kernels at this instruction set");
  m.def("force_portable_cpu", [](bool portable) {
        dinocxr::cpu::set_force_portable(portable);
        dinocxr::cpu::set_bn_act_force_portable(portable);
      }, py::arg("portable"), "Testing hook: use the portable CPU kernels even where AVX2 is available");
  m.def("bn_act_forward_cpu", &bn_act_forward_cpu,
        "BatchNorm + activation on a [rows, channels] fp32 matrix: (out, stats [3, C], new running stats [2, C])",
        py::arg("y"), py::arg("bn_weight"), py::arg("bn_bias"), py::arg("running_mean"), py::arg("running_var"),
        py::arg("eps"), py::arg("momentum"), py::arg("training"), py::arg("activation"));
  m.def("bn_act_backward_cpu", &bn_act_backward_cpu, "Backward of bn_act_forward_cpu: (dy, dgamma, dbeta)",
        py::arg("grad"), py::arg("y"), py::arg("bn_weight"), py::arg("bn_bias"), py::arg("stats"),
        py::arg("training"), py::arg("activation"), py::arg("need_input_grad"));
  m.def("bn_act_isa", []() { return std::string(dinocxr::cpu::bn_act_isa()); },
        "Instruction set of the CPU BatchNorm + activation row kernels: 'avx2' or 'portable'");
}

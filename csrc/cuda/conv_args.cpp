#include "cuda/conv_args.h"

#include <limits>

namespace dinocxr {
namespace ops {

cuda::DType conv_dtype(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return cuda::DType::kF32;
    case at::kHalf: return cuda::DType::kF16;
    case at::kBFloat16: return cuda::DType::kBF16;
    default: TORCH_CHECK_VALUE(false, name, " must be float32, float16 or bfloat16, got ", t);
  }
  return cuda::DType::kF32;
}

cuda::DType dtype_code(int64_t code) {
  TORCH_CHECK_VALUE(code >= 0 && code <= 2, "dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  return static_cast<cuda::DType>(code);
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

cuda::Act to_act(int64_t act) {
  TORCH_CHECK_VALUE(act >= 0 && act <= 3, "act must be 0 (none), 1 (silu), 2 (gelu) or 3 (relu), got ", act);
  return static_cast<cuda::Act>(act);
}

}  // namespace ops
}  // namespace dinocxr

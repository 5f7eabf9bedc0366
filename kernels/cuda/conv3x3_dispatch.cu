// Chooses between the tensor-core and the direct implementations, validates every geometry before a
// launch (no kernel writes outside its output), and runs the weight gradient's reduction.
#include "conv3x3.cuh"
#include "conv_internal.cuh"

#include <atomic>

namespace dinocxr {
namespace cuda {

namespace {
std::atomic<bool> g_force_direct{false};
}  // namespace

void set_force_direct(bool direct) { g_force_direct.store(direct); }
bool force_direct() { return g_force_direct.load(); }

int device_sm_count() {
  int device = 0, n = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 1;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n < 1) return 1;
  return n;
}

int device_max_smem_optin() {
  int device = 0, n = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 48 * 1024;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) return 48 * 1024;
  return n;
}

namespace {

// Every launch: positive sizes, channel counts divisible by groups, taps near the centre, and the
// grid mapped inside the output (inputs are bounds-checked in the kernels, outputs are not).
const char* check_geometry(const TapConv& c) {
  if (c.batch < 1 || c.in_h < 1 || c.in_w < 1 || c.in_c < 1 || c.out_h < 1 || c.out_w < 1 || c.out_c < 1)
    return "sizes must be positive";
  if (c.grid_h < 1 || c.grid_w < 1) return "the grid must be non-empty";
  if (c.groups < 1 || c.in_c % c.groups || c.out_c % c.groups) return "channels must be divisible by groups";
  if (c.n_taps < 1 || c.n_taps > kMaxTaps) return "n_taps must be 1..9";
  if (c.in_stride < 1 || c.in_stride > 4 || c.out_stride < 1 || c.out_stride > 4) return "strides must be 1..4";
  for (int t = 0; t < c.n_taps; ++t)
    if (c.tap_dy[t] < -2 || c.tap_dy[t] > 2 || c.tap_dx[t] < -2 || c.tap_dx[t] > 2) return "tap offsets must be in -2..2";
  if (c.out_y0 < 0 || c.out_x0 < 0) return "output offsets must be non-negative";
  if (static_cast<int64_t>(c.grid_h - 1) * c.out_stride + c.out_y0 >= c.out_h ||
      static_cast<int64_t>(c.grid_w - 1) * c.out_stride + c.out_x0 >= c.out_w)
    return "the grid maps outside the output";
  return nullptr;
}

const char* check_epilogue(const Epilogue& epi) {
  switch (epi.kind) {
    case EpiKind::kAffineAct:
      return nullptr;
    case EpiKind::kStats:
      return epi.partials == nullptr ? "the statistics epilogue needs partials" : nullptr;
    case EpiKind::kSiluBackward:
      if (epi.partials == nullptr || epi.aux == nullptr || epi.z_scale == nullptr || epi.z_shift == nullptr ||
          epi.xh_scale == nullptr || epi.xh_shift == nullptr)
        return "the SiLU-backward epilogue needs partials, aux and four per-channel vectors";
      return nullptr;
  }
  return "unknown epilogue";
}

}  // namespace

TapConvPlan tap_conv_plan(const TapConv& c, DType dt, const void* in, const void* w, const void* out,
                          const void* aux, EpiKind kind) {
  TapConvPlan plan;
  if (const char* why = check_geometry(c)) {
    plan.reason = why;
    return plan;
  }
  const char* why_tc = "";
  internal::WgmmaConvCfg wg;
  if (!force_direct() && internal::wgmma_conv_config(c, dt, in, w, out, aux, &wg, &why_tc)) {
    plan.supported = plan.tensor_cores = true;
    plan.impl = ConvImpl::kWgmma;
    plan.partial_rows = kind == EpiKind::kAffineAct ? 0 : wg.grid.x;
    return plan;
  }
  internal::TcConvCfg tc;
  if (!force_direct() && internal::tc_conv_config(c, dt, in, w, out, aux, &tc, &why_tc)) {
    plan.supported = plan.tensor_cores = true;
    plan.impl = ConvImpl::kMma;
    plan.partial_rows = kind == EpiKind::kAffineAct ? 0 : tc.grid.x;
    return plan;
  }
  internal::DirectConvCfg direct;
  if (internal::direct_conv_config(c, dt, in, &direct, &plan.reason)) {
    plan.supported = true;
    plan.impl = ConvImpl::kDirect;
    plan.partial_rows = kind == EpiKind::kAffineAct ? 0 : direct.grid.y;
  }
  return plan;
}

cudaError_t tap_conv_forward(const TapConvPlan& plan, const TapConv& c, DType dt, const void* in, const void* w,
                             void* out, const Prologue& pro, const Epilogue& epi, cudaStream_t stream) {
  if (!plan.supported || check_geometry(c) != nullptr || check_epilogue(epi) != nullptr) return cudaErrorInvalidValue;
  if ((pro.scale == nullptr) != (pro.shift == nullptr)) return cudaErrorInvalidValue;
  const char* why = "";
  // Re-derive the launch configuration from the same inputs; it must match the plan (partials).
  if (plan.impl == ConvImpl::kWgmma) {
    internal::WgmmaConvCfg wg;
    if (!internal::wgmma_conv_config(c, dt, in, w, out, epi.aux, &wg, &why)) return cudaErrorInvalidValue;
    if (epi.kind != EpiKind::kAffineAct && static_cast<int64_t>(wg.grid.x) != plan.partial_rows)
      return cudaErrorInvalidValue;
    return internal::wgmma_conv_launch(wg, c, dt, in, w, out, pro, epi, stream);
  }
  if (plan.impl == ConvImpl::kMma) {
    internal::TcConvCfg tc;
    if (!internal::tc_conv_config(c, dt, in, w, out, epi.aux, &tc, &why)) return cudaErrorInvalidValue;
    if (epi.kind != EpiKind::kAffineAct && static_cast<int64_t>(tc.grid.x) != plan.partial_rows)
      return cudaErrorInvalidValue;
    return internal::tc_conv_launch(tc, c, dt, in, w, out, pro, epi, stream);
  }
  internal::DirectConvCfg direct;
  if (!internal::direct_conv_config(c, dt, in, &direct, &why)) return cudaErrorInvalidValue;
  if (epi.kind != EpiKind::kAffineAct && static_cast<int64_t>(direct.grid.y) != plan.partial_rows)
    return cudaErrorInvalidValue;
  return internal::direct_conv_launch(direct, c, dt, in, w, out, pro, epi, stream);
}

namespace {
const char* check_wgrad(const WgradConv& c) {
  if (c.batch < 1 || c.in_h < 1 || c.in_w < 1 || c.in_c < 1 || c.out_h < 1 || c.out_w < 1 || c.out_c < 1)
    return "sizes must be positive";
  if (c.groups < 1 || c.in_c % c.groups || c.out_c % c.groups) return "channels must be divisible by groups";
  if (c.stride < 1 || c.stride > 4) return "stride must be 1..4";
  // The output of a padding-1 3x3 conv with this stride.
  if (c.out_h != (c.in_h - 1) / c.stride + 1 || c.out_w != (c.in_w - 1) / c.stride + 1)
    return "dy does not have the forward output's size";
  return nullptr;
}

size_t wgrad_bytes(const WgradConv& c, int splits) {
  const size_t w = static_cast<size_t>(splits) * c.out_c * 9 * (c.in_c / c.groups) * sizeof(float);
  return ((w + 255) & ~size_t(255)) + static_cast<size_t>(splits) * c.out_c * sizeof(float);
}
}  // namespace

WgradPlan wgrad_plan(const WgradConv& c, DType dt, const void* x, const void* dy) {
  WgradPlan plan;
  if (const char* why = check_wgrad(c)) {
    plan.reason = why;
    return plan;
  }
  internal::TcWgradCfg tc;
  const char* why_tc = "";
  if (!force_direct() && internal::tc_wgrad_config(c, dt, x, dy, &tc, &why_tc)) {
    plan.supported = plan.tensor_cores = true;
    plan.splits = static_cast<int>(tc.grid.z);
  } else {
    internal::DirectWgradCfg direct;
    if (!internal::direct_wgrad_config(c, dt, x, dy, &direct, &plan.reason)) return plan;
    plan.supported = true;
    plan.splits = static_cast<int>(direct.grid.y);
  }
  plan.workspace_bytes = wgrad_bytes(c, plan.splits);
  return plan;
}

cudaError_t wgrad(const WgradPlan& plan, const WgradConv& c, DType dt, const void* x, const Prologue& pro,
                  const void* dy, float* dw, float* db, void* workspace, cudaStream_t stream) {
  if (!plan.supported || check_wgrad(c) != nullptr || workspace == nullptr || dw == nullptr)
    return cudaErrorInvalidValue;
  if ((pro.scale == nullptr) != (pro.shift == nullptr)) return cudaErrorInvalidValue;
  const int cin_g = c.in_c / c.groups;
  float* part_w = static_cast<float*>(workspace);
  const size_t w_bytes = static_cast<size_t>(plan.splits) * c.out_c * 9 * cin_g * sizeof(float);
  float* part_b = db == nullptr ? nullptr
                                : reinterpret_cast<float*>(static_cast<char*>(workspace) + ((w_bytes + 255) & ~size_t(255)));
  const char* why = "";
  cudaError_t err;
  if (plan.tensor_cores) {
    internal::TcWgradCfg tc;
    if (!internal::tc_wgrad_config(c, dt, x, dy, &tc, &why) || static_cast<int>(tc.grid.z) != plan.splits)
      return cudaErrorInvalidValue;
    err = internal::tc_wgrad_launch(tc, c, dt, x, pro, dy, part_w, part_b, stream);
  } else {
    internal::DirectWgradCfg direct;
    if (!internal::direct_wgrad_config(c, dt, x, dy, &direct, &why) || static_cast<int>(direct.grid.y) != plan.splits)
      return cudaErrorInvalidValue;
    err = internal::direct_wgrad_launch(direct, c, dt, x, pro, dy, part_w, part_b, stream);
  }
  if (err != cudaSuccess) return err;
  return internal::wgrad_reduce(part_w, part_b, plan.splits, c.out_c, cin_g, dw, db, stream);
}

}  // namespace cuda
}  // namespace dinocxr

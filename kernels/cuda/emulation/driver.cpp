// C entry points over the real host launchers of kernels/cuda, for ctypes
// (tests/kernels/test_cuda_emulated_kernels.py). Built with simt.h instead of CUDA by build.py; every
// pointer is host memory. Returns 0 on success, a cudaError_t otherwise, -1 when unsupported.
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "conv3x3.cuh"
#include "dino_loss.cuh"

namespace dc = dinocxr::cuda;

namespace {
dc::TapConv tap_conv(const int* g, int n_taps, const int* dy, const int* dx) {
  dc::TapConv c{};
  int* f[] = {&c.batch, &c.in_h, &c.in_w, &c.in_c, &c.out_h, &c.out_w, &c.out_c,
              &c.grid_h, &c.grid_w, &c.in_stride, &c.out_stride, &c.out_y0, &c.out_x0, &c.groups};
  for (int i = 0; i < 14; ++i) *f[i] = g[i];
  c.n_taps = n_taps;
  for (int t = 0; t < n_taps && t < dc::kMaxTaps; ++t) c.tap_dy[t] = dy[t], c.tap_dx[t] = dx[t];
  return c;
}
}  // namespace

extern "C" {

void emu_config(int sm_count, int smem_optin, int force_direct, int use_wgmma) {
  emu::sm_count = sm_count;
  emu::smem_optin = smem_optin;
  dc::set_force_direct(force_direct != 0);
  dc::set_use_wgmma(use_wgmma != 0);
}

// impl_out: 0 direct, 1 mma.sync, 2 wgmma. rows_out: partial rows written.
int emu_tap_conv(const int* geom, int n_taps, const int* tap_dy, const int* tap_dx, int dtype, const void* in,
                 const void* w, void* out, const float* pro_scale, const float* pro_shift, int kind, int act,
                 const float* scale, const float* shift, const float* ref, const void* aux, const float* z_scale,
                 const float* z_shift, const float* xh_scale, const float* xh_shift, float* partials,
                 int64_t capacity_rows, int64_t* rows_out, int* impl_out) {
  const dc::TapConv c = tap_conv(geom, n_taps, tap_dy, tap_dx);
  const auto dt = static_cast<dc::DType>(dtype);
  const auto k = static_cast<dc::EpiKind>(kind);
  const dc::TapConvPlan plan = dc::tap_conv_plan(c, dt, in, w, out, aux, k);
  if (!plan.supported) return -1;
  if (plan.partial_rows > capacity_rows) return -2;
  *rows_out = plan.partial_rows;
  *impl_out = static_cast<int>(plan.impl);
  dc::Prologue pro;
  pro.scale = pro_scale, pro.shift = pro_shift;
  dc::Epilogue epi;
  epi.kind = k, epi.act = static_cast<dc::Act>(act);
  epi.scale = scale, epi.shift = shift, epi.ref = ref, epi.aux = aux;
  epi.z_scale = z_scale, epi.z_shift = z_shift, epi.xh_scale = xh_scale, epi.xh_shift = xh_shift;
  epi.partials = reinterpret_cast<float2*>(partials);
  return dc::tap_conv_forward(plan, c, dt, in, w, out, pro, epi, nullptr);
}

// shape = batch, in_h, in_w, in_c, out_h, out_w, out_c, groups, stride
int emu_wgrad(const int* shape, int dtype, const void* x, const float* pro_scale, const float* pro_shift,
              const void* dy, float* dw, float* db, int* tensor_cores_out) {
  dc::WgradConv c{};
  int* f[] = {&c.batch, &c.in_h, &c.in_w, &c.in_c, &c.out_h, &c.out_w, &c.out_c, &c.groups, &c.stride};
  for (int i = 0; i < 9; ++i) *f[i] = shape[i];
  const auto dt = static_cast<dc::DType>(dtype);
  const dc::WgradPlan plan = dc::wgrad_plan(c, dt, x, dy);
  if (!plan.supported) return -1;
  *tensor_cores_out = plan.tensor_cores ? 1 : 0;
  std::vector<unsigned char> workspace(plan.workspace_bytes + 256);
  void* ws = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(workspace.data()) + 255) & ~uintptr_t(255));
  dc::Prologue pro;
  pro.scale = pro_scale, pro.shift = pro_shift;
  return dc::wgrad(plan, c, dt, x, pro, dy, dw, db, ws, nullptr);
}

int emu_bn_forward_finalize(const float* partials, int64_t rows, int channels, int64_t count, const float* ref,
                            const float* gamma, const float* beta, float eps, float momentum, const float* rm,
                            const float* rv, float* out) {
  return dc::bn_forward_finalize(reinterpret_cast<const float2*>(partials), rows, channels, count, ref, gamma, beta,
                                 eps, momentum, rm, rv, out, nullptr);
}

int emu_bn_backward_finalize(const float* partials, int64_t rows, int channels, int64_t count, const float* gamma,
                             const float* mean, const float* invstd, int training, float* out) {
  return dc::bn_backward_finalize(reinterpret_cast<const float2*>(partials), rows, channels, count, gamma, mean,
                                  invstd, training != 0, out, nullptr);
}

int emu_affine_act(int dtype, const void* y, void* out, int64_t rows, int channels, const float* scale,
                   const float* shift, int act) {
  return dc::affine_act(static_cast<dc::DType>(dtype), y, out, rows, channels, scale, shift, static_cast<dc::Act>(act),
                        nullptr);
}

int64_t emu_act_backward_stats_rows(int64_t rows, int channels) { return dc::act_backward_stats_rows(rows, channels); }

int emu_act_backward_stats(int dtype, const void* g, const void* y, int64_t rows, int channels, const float* zs,
                           const float* zb, int act, const float* xs, const float* xb, float* partials) {
  return dc::act_backward_stats(static_cast<dc::DType>(dtype), g, y, rows, channels, zs, zb, static_cast<dc::Act>(act),
                                xs, xb, reinterpret_cast<float2*>(partials), nullptr);
}

int emu_bn_backward_apply(int dtype, const void* g, const void* y, void* dy, int64_t rows, int channels,
                          const float* zs, const float* zb, int act, const float* a, const float* b, const float* c) {
  return dc::bn_backward_apply(static_cast<dc::DType>(dtype), g, y, dy, rows, channels, zs, zb,
                               static_cast<dc::Act>(act), a, b, c, nullptr);
}

// shape = batch, in_h, in_w, c0, c1, c2, c3, groups, stride1. Returns -1 when the plan says no.
int emu_pcm_fused(const int* shape, int dtype, const void* x, const void* w1, const void* w2, const void* w3,
                  const float* s1, const float* t1, const float* s2, const float* t2, const float* s3, const float* t3,
                  void* out, int* groups_per_block) {
  dc::PcmChain c{};
  int* f[] = {&c.batch, &c.in_h, &c.in_w, &c.c0, &c.c1, &c.c2, &c.c3, &c.groups, &c.stride1};
  for (int i = 0; i < 9; ++i) *f[i] = shape[i];
  const auto dt = static_cast<dc::DType>(dtype);
  const dc::PcmFusedPlan plan = dc::pcm_fused_plan(c, dt, x, out);
  if (!plan.supported) return -1;
  *groups_per_block = plan.groups_per_block;
  return dc::pcm_fused_inference(plan, c, dt, x, w1, w2, w3, s1, t1, s2, t2, s3, t3, out, nullptr);
}

int emu_dino_loss(int dtype, int64_t batch, int64_t n_crops, int64_t n_global, int64_t k, float inv_st, float inv_tt,
                  const void* student, const void* teacher, const float* center, float* loss, void* grad,
                  float* teacher_sum) {
  dc::DinoLossProblem p{batch, n_crops, n_global, k, inv_st, inv_tt};
  std::vector<unsigned char> workspace(dc::dino_loss_workspace_bytes(p) + 256);
  void* ws = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(workspace.data()) + 255) & ~uintptr_t(255));
  const auto* s = static_cast<const uint16_t*>(student);
  const auto* t = static_cast<const uint16_t*>(teacher);
  switch (dtype) {
    case 0:
      return dc::dino_loss_forward_f32(p, static_cast<const float*>(student), static_cast<const float*>(teacher),
                                       center, loss, static_cast<float*>(grad), teacher_sum, ws, nullptr);
    case 1:
      return dc::dino_loss_forward_f16(p, s, t, center, loss, static_cast<uint16_t*>(grad), teacher_sum, ws, nullptr);
    default:
      return dc::dino_loss_forward_bf16(p, s, t, center, loss, static_cast<uint16_t*>(grad), teacher_sum, ws, nullptr);
  }
}

}  // extern "C"

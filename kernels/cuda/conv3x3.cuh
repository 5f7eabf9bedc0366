// The PCM's 3x3 convolutions on channels-last tensors (B x H x W x C), with BatchNorm and the
// activation fused into prologues and epilogues. Launchers on raw device pointers and a stream; no
// torch headers, so plain nvcc compiles this anywhere. csrc/cuda (conv_ops.cpp, conv_batchnorm_ops.cpp,
// pcm_op.cpp) checks tensors and calls these; dinocxr_fast/ops/conv_bn_act_cuda.py plans the calls
// (tap lists, weight layouts, the chain).
//
// One kernel family serves the forward convolution and its data gradient: a "tap convolution",
//
//   out[b, gy*os + oy0, gx*os + ox0, co] =
//       epilogue( sum_t sum_{ci in group(co)} prologue(in[b, gy*is + dy_t, gx*is + dx_t, ci]) * w[co, t, ci'] )
//
// for every grid position (gy, gx) < (grid_h, grid_w); input positions outside the input read as
// zero (the zero padding is applied after the prologue, as in conv(act(bn(y)))). The forward conv
// (stride s, padding 1) is grid = output, is = s, os = 1, taps (kh-1, kw-1). The data gradient of a
// stride-1 conv is the same with flipped, transposed weights; of a stride-2 conv it is four tap
// convolutions, one per output parity (oy0, ox0), with os = 2. The weight gradient has its own
// kernels. Two implementations of each:
//   - tensor cores (mma.sync m16n8k16, bf16/fp16 in, fp32 accumulate; sm_80 and sm_90) for dense
//     convolutions with Cin % 32 == 0 and Cout % 8 == 0 (ViTAEv2 stage 1);
//   - a direct kernel on the CUDA cores for grouped convolutions (4 or 16 channels per group in
//     stages 2-4) and everything else (any group size, fp32, odd channel counts).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace dinocxr {
namespace cuda {

enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
enum class Act : int { kNone = 0, kSilu = 1, kGelu = 2, kRelu = 3 };

constexpr int kMaxTaps = 9;

struct TapConv {
  int batch;
  int in_h, in_w, in_c;     // input, channels last, contiguous
  int out_h, out_w, out_c;  // output, channels last, contiguous
  int grid_h, grid_w;       // computed positions
  int in_stride;            // is
  int out_stride, out_y0, out_x0;
  int groups;               // cin_g = in_c / groups input channels per output channel
  int n_taps;               // 1..9
  int tap_dy[kMaxTaps], tap_dx[kMaxTaps];
};

// Applied to every input element as it is loaded, never to the zero padding:
//   a = silu(x * scale[c] + shift[c])      (the previous conv's BatchNorm + SiLU)
// Both null: the input is used as it is.
struct Prologue {
  const float* scale = nullptr;
  const float* shift = nullptr;
};

enum class EpiKind : int {
  // out = act(acc * scale[co] + shift[co]); scale null = 1, shift null = 0. Bias, folded eval
  // BatchNorm and the activation all land here.
  kAffineAct = 0,
  // y = acc * scale[co] + shift[co] is stored; per-channel partial sums of (y - ref[co]) and its
  // square (y as stored, i.e. rounded to the output type) go to `partials` for the BatchNorm
  // statistics. ref (may be null = 0) is a shift close to the mean that keeps the variance free of
  // cancellation (the running mean).
  kStats = 1,
  // Data gradient through SiLU(BatchNorm(y)): y = aux[...] is the forward conv output at the
  // output position; z = y * z_scale + z_shift; dz = acc * silu'(z) is stored; partial sums of
  // dz and dz * xhat with xhat = y * xh_scale + xh_shift go to `partials`.
  kSiluBackward = 2,
};

struct Epilogue {
  EpiKind kind = EpiKind::kAffineAct;
  Act act = Act::kNone;
  const float* scale = nullptr;
  const float* shift = nullptr;
  const float* ref = nullptr;
  const void* aux = nullptr;
  const float* z_scale = nullptr;
  const float* z_shift = nullptr;
  const float* xh_scale = nullptr;
  const float* xh_shift = nullptr;
  float2* partials = nullptr;  // [partial_rows][out_c]: (sum, sum of squares or of products)
};

enum class ConvImpl : int { kDirect = 0, kMma = 1, kWgmma = 2 };

struct TapConvPlan {
  bool supported = false;      // false: no kernel covers this problem (the caller uses another backend)
  bool tensor_cores = false;   // mma.sync or wgmma
  ConvImpl impl = ConvImpl::kDirect;
  int64_t partial_rows = 0;    // rows of `partials` the launch writes (stats epilogues)
  const char* reason = "";     // why not supported
};

// Decides the implementation for one tap convolution. Pointer alignment is part of the decision
// (16-byte vector loads), so pass the pointers the launch will use.
TapConvPlan tap_conv_plan(const TapConv& c, DType dt, const void* in, const void* w, const void* out,
                          const void* aux, EpiKind kind);
// w: [out_c][n_taps][cin_g] of the input type.
cudaError_t tap_conv_forward(const TapConvPlan& plan, const TapConv& c, DType dt, const void* in, const void* w,
                             void* out, const Prologue& pro, const Epilogue& epi, cudaStream_t stream);

// ---- weight gradient of the forward conv (stride s, padding 1, 9 taps) ------------------------
struct WgradConv {
  int batch;
  int in_h, in_w, in_c;     // x (the forward input, before the prologue)
  int out_h, out_w, out_c;  // dy
  int groups, stride;
};

struct WgradPlan {
  bool supported = false;
  bool tensor_cores = false;
  int splits = 0;                // partial results reduced by wgrad_reduce
  size_t workspace_bytes = 0;
  const char* reason = "";
};

WgradPlan wgrad_plan(const WgradConv& c, DType dt, const void* x, const void* dy);
// dw: fp32 [out_c][cin_g][3][3] (torch's layout); db: fp32 [out_c] or null.
cudaError_t wgrad(const WgradPlan& plan, const WgradConv& c, DType dt, const void* x, const Prologue& pro,
                  const void* dy, float* dw, float* db, void* workspace, cudaStream_t stream);

// ---- BatchNorm and activation helpers (per channel of a rows x channels tensor) ---------------
// Forward statistics from kStats partials. out: fp32 [6][channels] =
//   mean, invstd, scale = gamma * invstd, shift = beta - mean * scale, and the updated running
//   mean / running var (unbiased variance, momentum as nn.BatchNorm2d).
cudaError_t bn_forward_finalize(const float2* partials, int64_t rows, int channels, int64_t count,
                                const float* ref, const float* gamma, const float* beta, float eps, float momentum,
                                const float* running_mean, const float* running_var, float* out,
                                cudaStream_t stream);

// Backward coefficients from kSiluBackward / act_backward_stats partials (sum dz, sum dz * xhat).
// out: fp32 [5][channels] = dgamma, dbeta, A, B, C with dy = A * dz + B * y + C:
//   training: dy = gamma * invstd * (dz - mean(dz) - xhat * mean(dz * xhat));
//   eval:     dy = gamma * invstd * dz (B = C = 0).
cudaError_t bn_backward_finalize(const float2* partials, int64_t rows, int channels, int64_t count,
                                 const float* gamma, const float* mean, const float* invstd, bool training,
                                 float* out, cudaStream_t stream);

// out = act(y * scale[c] + shift[c]) (elementwise; scale / shift may be null).
cudaError_t affine_act(DType dt, const void* y, void* out, int64_t rows, int channels, const float* scale,
                       const float* shift, Act act, cudaStream_t stream);

// Partial sums for the BatchNorm backward of out = act(y * z_scale + z_shift), given g = d out:
// dz = g * act'(z); sums of dz and dz * (y * xh_scale + xh_shift). Returns the rows it writes.
int64_t act_backward_stats_rows(int64_t rows, int channels);
cudaError_t act_backward_stats(DType dt, const void* g, const void* y, int64_t rows, int channels,
                               const float* z_scale, const float* z_shift, Act act, const float* xh_scale,
                               const float* xh_shift, float2* partials, cudaStream_t stream);

// dy = A[c] * dz + B[c] * y + C[c] with dz = g * act'(y * z_scale + z_shift) (act kNone: dz = g).
// B / C may be null (0). dy may alias g.
cudaError_t bn_backward_apply(DType dt, const void* g, const void* y, void* dy, int64_t rows, int channels,
                              const float* z_scale, const float* z_shift, Act act, const float* a, const float* b,
                              const float* c, cudaStream_t stream);

// ---- the whole PCM of a grouped cell at inference, in one pass -------------------------------
// conv1 (stride s1) -> affine + SiLU -> conv2 -> affine + SiLU -> conv3 -> affine, every conv with
// the same groups, so each group's chain is independent: one block per (sample, groups), the whole
// image in shared memory, the intermediates never leave the SM.
struct PcmChain {
  int batch, in_h, in_w;
  int c0, c1, c2, c3;  // widths along the chain
  int groups, stride1;
};

struct PcmFusedPlan {
  bool supported = false;
  int groups_per_block = 0;
  size_t smem_bytes = 0;
  const char* reason = "";
};

PcmFusedPlan pcm_fused_plan(const PcmChain& c, DType dt, const void* x, const void* out);
// w1, w2, w3: [c_out][9][cin_g] of the input type. s*, t*: fp32 per-channel affine after each conv
// (BatchNorm folded with the conv bias; t3 = conv3 bias, s3 may be null).
cudaError_t pcm_fused_inference(const PcmFusedPlan& plan, const PcmChain& c, DType dt, const void* x,
                                const void* w1, const void* w2, const void* w3, const float* s1, const float* t1,
                                const float* s2, const float* t2, const float* s3, const float* t3, void* out,
                                cudaStream_t stream);

// Device properties the planners use.
int device_sm_count();
int device_max_smem_optin();

// Testing hook: plan every convolution and weight gradient on the direct kernels, so tests can run
// both implementations on the same problem.
void set_force_direct(bool direct);
bool force_direct();

// The wgmma (sm_90a) implementation of the dense tap convolutions: off by default until it has run on
// a Hopper GPU; when on, the dispatcher prefers it over mma.sync wherever it applies.
void set_use_wgmma(bool use);
// Whether the current device is sm_90 and this binary holds sm_90a code for it.
bool wgmma_compiled();

}  // namespace cuda
}  // namespace dinocxr

// CPU BatchNorm + activation on a channels-last [M, C] fp32 matrix (the output of a convolution
// whose NCHW view has channels-last strides): see dinocxr_fast/ops/conv_bn_act.py for the math.
// Raw pointers only: argument checks and tensor handling live in csrc/cpu/bn_act_op.cpp.
//
// The per-channel mean is carried as two floats, hi + lo (hi = float(mean), lo = float(mean - hi)):
// the kernels compute y - hi, exact for y near hi, and fold lo into per-channel constants, which
// keeps the normalised values accurate when the mean is large against the spread (1000 + N(0, 1)).
#pragma once

#include <cstdint>

namespace dinocxr {
namespace cpu {

enum BnAct : int { kActNone = 0, kActSilu = 1, kActGelu = 2, kActRelu = 3 };

// Calls CALL(A) with the activation as a compile-time constant (the row kernels are templates on it).
#define DINOCXR_BN_ACT_SWITCH(act, CALL) \
  switch (act) {                         \
    case kActSilu: CALL(kActSilu); break; \
    case kActGelu: CALL(kActGelu); break; \
    case kActRelu: CALL(kActRelu); break; \
    default: CALL(kActNone); break;       \
  }

struct BnActProblem {
  int64_t rows;      // M = B * H' * W'
  int64_t channels;  // C
  int act;           // BnAct
};

// Training forward. out = act(gamma * (y - mean) * invstd + beta) with the batch statistics
// (biased variance); stats [3][C] receives mean hi, mean lo, invstd (fp32); new_running [2][C]
// receives momentum * mean + (1 - momentum) * running_mean and the same for the UNBIASED variance,
// as torch.nn.functional.batch_norm updates them (may be null: no running statistics). rows >= 2.
void bn_act_forward_train(const BnActProblem& p, const float* y, const float* gamma, const float* beta, double eps,
                          double momentum, const float* running_mean, const float* running_var, float* out,
                          float* stats, float* new_running);

// Eval forward: the running statistics as an affine map, one pass. stats as above (lo = 0).
void bn_act_forward_eval(const BnActProblem& p, const float* y, const float* gamma, const float* beta, double eps,
                         const float* running_mean, const float* running_var, float* out, float* stats);

// Backward from the saved y and stats. Training: dy = gamma * invstd * (dz - mean(dz) - xhat * mean(dz * xhat))
// with dz = dout * act'(z); eval: dy = gamma * invstd * dz. dgamma = sum(dz * xhat), dbeta = sum(dz)
// per channel. dy may be null (no input gradient wanted: one pass fewer in training).
void bn_act_backward(const BnActProblem& p, bool training, const float* dout, const float* y, const float* gamma,
                     const float* beta, const float* stats, float* dy, float* dgamma, float* dbeta);

// Testing hook: force the portable row kernels even where AVX2 is available.
void set_bn_act_force_portable(bool portable);
const char* bn_act_isa();

// ---- row kernels (bn_act.cpp: portable; bn_act_avx2.cpp: AVX2 + FMA) ----------------------------
// Per-channel arrays of length C: z = (y - hi) * gs + shift, with gs = gamma * invstd and
// shift = beta - lo * gs (the low part of the mean folded into the shift; y - hi is exact near hi).
struct BnActChannels {
  const float* hi;
  const float* gs;
  const float* shift;
};

namespace rows {
// s1[c] += sum_r (y[r, c] - ref[c]);  s2[c] += sum_r (y[r, c] - ref[c])^2
void stats_portable(const float* y, int64_t n, int64_t c, const float* ref, float* s1, float* s2);
void stats_avx2(const float* y, int64_t n, int64_t c, const float* ref, float* s1, float* s2);
// out = act(z)
void apply_portable(const float* y, int64_t n, int64_t c, const BnActChannels& ch, int act, float* out);
void apply_avx2(const float* y, int64_t n, int64_t c, const BnActChannels& ch, int act, float* out);
// dz = g * act'(z), d = y - hi:  s1 += dz;  s2 += dz * d;  and, when dy is non-null, dy = a * dz.
void bwd_stats_portable(const float* g, const float* y, int64_t n, int64_t c, const BnActChannels& ch, int act,
                        float* s1, float* s2, const float* a, float* dy);
void bwd_stats_avx2(const float* g, const float* y, int64_t n, int64_t c, const BnActChannels& ch, int act,
                    float* s1, float* s2, const float* a, float* dy);
// In place: dy holds dz on entry and a * dz + b * (y - hi) + k on return.
void bwd_apply_portable(float* dy, const float* y, int64_t n, int64_t c, const float* hi, const float* a,
                        const float* b, const float* k);
void bwd_apply_avx2(float* dy, const float* y, int64_t n, int64_t c, const float* hi, const float* a,
                    const float* b, const float* k);
}  // namespace rows

}  // namespace cpu
}  // namespace dinocxr

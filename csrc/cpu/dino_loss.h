// CPU implementation of the fused DINO loss (see dinocxr_fast/ops/dino_loss.py for the math).
// Raw pointers only: argument checks and tensor handling live in csrc/cpu/dino_loss_op.cpp.
#pragma once

#include <cstdint>

namespace dinocxr {
namespace cpu {

struct DinoLossProblem {
  int64_t batch;     // B: rows per crop
  int64_t n_crops;   // student crops (rows = n_crops * B), crop-major
  int64_t n_global;  // teacher views (rows = n_global * B), the first n_global student crops
  int64_t k;         // output dimension
  float inv_student_temp;
  float inv_teacher_temp;
};

struct DinoLossResult {
  double loss;        // mean over (teacher view, other student crop) pairs of the batch-mean CE
  bool non_finite;    // some input element was NaN or +-inf
};

struct BFloat16Bits {
  uint16_t bits;
};

// Accumulation type: fp32 for fp32 and bf16 inputs, fp64 for fp64 (used by gradcheck).
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

// Element types T: float, double, and bfloat16 passed as BFloat16Bits.
// center is [K] in the accumulation type; grad (may be null) has the student's type and shape;
// teacher_sum (may be null) is fp32 [K] and receives the column sums of the teacher rows.
template <typename T>
DinoLossResult dino_loss_forward(const DinoLossProblem& p, const T* student, const T* teacher,
                                 const typename AccType<T>::type* center, T* grad, float* teacher_sum);

// Testing hooks: force the portable row kernels even where AVX2 / AVX-512 is available, or cap the
// row kernels at "portable", "avx2" or "avx512" (false for another name). active_isa() names the
// kernels in use.
void set_force_portable(bool portable);
bool set_isa_limit(const char* isa);
const char* active_isa();

}  // namespace cpu
}  // namespace dinocxr

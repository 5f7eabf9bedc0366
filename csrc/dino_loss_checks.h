// Argument checks of the fused DINO loss, shared by its CPU and CUDA ops.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace dinocxr {

struct DinoLossShape {
  int64_t batch, n_crops, n_global, k;
};

// Checks ranks, contiguity, dtypes, devices and row counts (ValueError naming the argument) and
// returns the problem's shape. The dtypes each backend supports are checked by the backend.
DinoLossShape check_dino_loss_inputs(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& center,
                                     int64_t n_global, double student_temp, double teacher_temp);

}  // namespace dinocxr

// Fused DINO loss on CUDA: launchers on raw device pointers and a stream. No torch headers, so
// plain nvcc compiles this anywhere; csrc/cuda/dino_loss_op.cpp does the argument checks and calls these.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace dinocxr {
namespace cuda {

struct DinoLossProblem {
  int64_t batch;     // B: rows per crop
  int64_t n_crops;   // student crops, crop-major rows
  int64_t n_global;  // teacher views = the first n_global student crops
  int64_t k;         // output dimension
  float inv_student_temp;
  float inv_teacher_temp;
};

// Device scratch the launcher needs, in bytes (per-chunk teacher softmax partials, per-row losses,
// a non-finite flag).
size_t dino_loss_workspace_bytes(const DinoLossProblem& p);

// bf16 / fp16 tensors are passed as their raw uint16_t bits.
// loss: one fp32 on the device; NaN when any student or teacher element is non-finite.
// grad (may be null): same type and shape as student. teacher_sum (may be null): fp32 [K], the
// column sums of the raw teacher rows (for the centre EMA), computed in the same pass as the
// teacher softmax statistics. workspace: dino_loss_workspace_bytes(p) bytes on the device.
// Any pointer alignment and any K are accepted: 16-byte vector loads are used when the rows allow
// them, scalar loads otherwise.
cudaError_t dino_loss_forward_f32(const DinoLossProblem& p, const float* student, const float* teacher,
                                  const float* center, float* loss, float* grad, float* teacher_sum,
                                  void* workspace, cudaStream_t stream);
cudaError_t dino_loss_forward_bf16(const DinoLossProblem& p, const uint16_t* student, const uint16_t* teacher,
                                   const float* center, float* loss, uint16_t* grad, float* teacher_sum,
                                   void* workspace, cudaStream_t stream);
cudaError_t dino_loss_forward_f16(const DinoLossProblem& p, const uint16_t* student, const uint16_t* teacher,
                                  const float* center, float* loss, uint16_t* grad, float* teacher_sum,
                                  void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace dinocxr

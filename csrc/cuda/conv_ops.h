// The 3x3 convolutions of the PCM on CUDA tensors (kernels/cuda/conv3x3.cuh): planning queries,
// argument checks and launches of the tap convolution and of the weight gradient.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/conv_args.h"

namespace dinocxr {
namespace ops {

// geom = [batch, in_h, in_w, in_c, out_h, out_w, out_c, grid_h, grid_w, in_stride, out_stride, out_y0,
//         out_x0, groups]; taps given as two lists of offsets (1..9 each).
// (supported, implementation "direct" / "mma" / "wgmma", reason) for aligned tensors on `device`.
std::tuple<bool, std::string, std::string> tap_conv_info(const std::vector<int64_t>& geom,
                                                         const std::vector<int64_t>& tap_dy,
                                                         const std::vector<int64_t>& tap_dx, int64_t dtype,
                                                         int64_t device);

// Runs one tap convolution into `out` (preallocated: the data gradient of a strided conv is four
// launches into one tensor). Returns the epilogue's partial sums [rows, out_c, 2] (empty for kAffineAct).
at::Tensor tap_conv_cuda(const at::Tensor& x, const at::Tensor& w, at::Tensor& out, const std::vector<int64_t>& geom,
                         const std::vector<int64_t>& tap_dy, const std::vector<int64_t>& tap_dx,
                         const OptTensor& pro_scale, const OptTensor& pro_shift, int64_t epi_kind, int64_t act,
                         const OptTensor& scale, const OptTensor& shift, const OptTensor& ref, const OptTensor& aux,
                         const OptTensor& z_scale, const OptTensor& z_shift, const OptTensor& xh_scale,
                         const OptTensor& xh_shift);

// shape = [batch, in_h, in_w, in_c, out_h, out_w, out_c, groups, stride].
// (supported, tensor_cores, splits, reason) of a weight gradient on `device`.
std::tuple<bool, bool, int, std::string> wgrad_info(const std::vector<int64_t>& shape, int64_t dtype, int64_t device);

// Weight (and bias) gradient of the forward conv x -> dy: dw fp32 [out_c, cin_g, 3, 3], db fp32 [out_c].
std::tuple<at::Tensor, at::Tensor> wgrad_cuda(const at::Tensor& x, const at::Tensor& dy, const OptTensor& pro_scale,
                                              const OptTensor& pro_shift, int64_t groups, int64_t stride,
                                              bool need_bias);

// Whether `device` is sm_90 and this build holds sm_90a code for it.
bool wgmma_available(int64_t device);

}  // namespace ops
}  // namespace dinocxr

// dinocxr_fast._C: registration only. Each op's argument checks and kernel calls are in its own file
// (csrc/cpu/*_op.cpp, csrc/cuda/*_op.cpp and *_ops.cpp), the kernels in csrc/cpu and kernels/cuda.
// The Python layer (dinocxr_fast/ops) has already validated shapes with messages naming the argument;
// the checks in the ops keep the extension safe when it is called directly.
#include <torch/extension.h>
#include <torch/library.h>

#include <omp.h>

#include <string>

#include "cpu/bn_act.h"
#include "cpu/bn_act_op.h"
#include "cpu/dino_loss.h"
#include "cpu/dino_loss_op.h"
#include "cpu/kernel_settings.h"

#ifdef DINOCXR_WITH_CUDA
#include "conv3x3.cuh"
#include "cuda/conv_batchnorm_ops.h"
#include "cuda/conv_ops.h"
#include "cuda/dino_loss_op.h"
#include "cuda/pcm_op.h"
#endif

namespace ops = dinocxr::ops;

// The CPU BatchNorm + activation as dispatcher ops, their only binding: the forward kernels run
// with no Python in between. Fake (meta) kernels and autograd are registered from Python
// (dinocxr_fast/ops/bn_act_cpu.py, torch.library.register_fake / register_autograd).
TORCH_LIBRARY_FRAGMENT(dinocxr, m) {
  m.def("bn_act_cpu(Tensor y, Tensor bn_weight, Tensor bn_bias, Tensor running_mean, Tensor running_var, "
        "float eps, float momentum, bool training, int activation) -> (Tensor, Tensor, Tensor)");
  m.def("bn_act_cpu_backward(Tensor grad, Tensor y, Tensor bn_weight, Tensor bn_bias, Tensor stats, "
        "bool training, int activation, bool need_input_grad) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dinocxr, CPU, m) {
  m.impl("bn_act_cpu", &ops::bn_act_forward_cpu);
  m.impl("bn_act_cpu_backward", &ops::bn_act_backward_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dinocxr_fast fused ops (C++/OpenMP on the CPU, CUDA when built with it)";
#ifdef DINOCXR_WITH_CUDA
  m.attr("built_with_cuda") = true;
  m.def("dino_loss_cuda", &ops::dino_loss_cuda, "Fused DINO loss on CUDA: (loss, grad_student, teacher_col_sum)",
        py::arg("student_out"), py::arg("teacher_out"), py::arg("center"), py::arg("student_temp"),
        py::arg("teacher_temp"), py::arg("n_global"), py::arg("need_grad"), py::arg("need_sum"));
  m.def("tap_conv_info", &ops::tap_conv_info, "(supported, implementation, reason) of a tap convolution",
        py::arg("geom"), py::arg("tap_dy"), py::arg("tap_dx"), py::arg("dtype"), py::arg("device"));
  m.def("tap_conv_cuda", &ops::tap_conv_cuda,
        "3x3 tap convolution with prologue / epilogue into out; returns partials", py::arg("x"), py::arg("w"),
        py::arg("out"), py::arg("geom"), py::arg("tap_dy"), py::arg("tap_dx"), py::arg("pro_scale"),
        py::arg("pro_shift"), py::arg("epi_kind"), py::arg("act"), py::arg("scale"), py::arg("shift"),
        py::arg("ref"), py::arg("aux"), py::arg("z_scale"), py::arg("z_shift"), py::arg("xh_scale"),
        py::arg("xh_shift"));
  m.def("wgrad_info", &ops::wgrad_info, "(supported, tensor_cores, splits, reason) of a weight gradient",
        py::arg("shape"), py::arg("dtype"), py::arg("device"));
  m.def("wgrad_cuda", &ops::wgrad_cuda, "Weight and bias gradient of a 3x3 conv: (dw fp32, db fp32)", py::arg("x"),
        py::arg("dy"), py::arg("pro_scale"), py::arg("pro_shift"), py::arg("groups"), py::arg("stride"),
        py::arg("need_bias"));
  m.def("bn_forward_finalize_cuda", &ops::bn_forward_finalize_cuda, "BatchNorm statistics from partial sums: [6, C]",
        py::arg("partials"), py::arg("count"), py::arg("ref"), py::arg("gamma"), py::arg("beta"), py::arg("eps"),
        py::arg("momentum"), py::arg("running_mean"), py::arg("running_var"));
  m.def("bn_backward_finalize_cuda", &ops::bn_backward_finalize_cuda, "BatchNorm backward coefficients: [5, C]",
        py::arg("partials"), py::arg("count"), py::arg("gamma"), py::arg("mean"), py::arg("invstd"),
        py::arg("training"));
  m.def("affine_act_cuda", &ops::affine_act_cuda, "act(y * scale + shift) per channel", py::arg("y"),
        py::arg("scale"), py::arg("shift"), py::arg("act"));
  m.def("act_backward_stats_cuda", &ops::act_backward_stats_cuda, "Partial sums of dz and dz * xhat",
        py::arg("grad"), py::arg("y"), py::arg("z_scale"), py::arg("z_shift"), py::arg("act"), py::arg("xh_scale"),
        py::arg("xh_shift"));
  m.def("bn_backward_apply_cuda", &ops::bn_backward_apply_cuda, "dy = A dz + B y + C, dz = grad * act'(z)",
        py::arg("grad"), py::arg("y"), py::arg("z_scale"), py::arg("z_shift"), py::arg("act"), py::arg("a"),
        py::arg("b"), py::arg("c"), py::arg("inplace"));
  m.def("force_direct_conv", &dinocxr::cuda::set_force_direct, py::arg("direct"),
        "Testing hook: run every PCM convolution on the direct kernels (no tensor cores)");
  m.def("conv_use_wgmma", &dinocxr::cuda::set_use_wgmma, py::arg("use"),
        "Prefer the wgmma (sm_90a) kernel for dense PCM convolutions (off by default)");
  m.def("wgmma_available", &ops::wgmma_available, py::arg("device"),
        "Whether `device` is sm_90 and this build holds sm_90a code for it");
  m.def("pcm_fused_info", &ops::pcm_fused_info, "(supported, groups_per_block, smem_bytes, reason) of the fused PCM",
        py::arg("shape"), py::arg("dtype"), py::arg("device"));
  m.def("pcm_fused_cuda", &ops::pcm_fused_cuda, "Whole grouped PCM at inference in one kernel", py::arg("x"),
        py::arg("w1"), py::arg("w2"), py::arg("w3"), py::arg("s1"), py::arg("t1"), py::arg("s2"), py::arg("t2"),
        py::arg("s3"), py::arg("t3"), py::arg("groups"), py::arg("stride1"));
#else
  m.attr("built_with_cuda") = false;
#endif
  m.def("dino_loss_cpu", &ops::dino_loss_cpu, "Fused DINO loss on the CPU: (loss, grad_student, teacher_col_sum)",
        py::arg("student_out"), py::arg("teacher_out"), py::arg("center"), py::arg("student_temp"),
        py::arg("teacher_temp"), py::arg("n_global"), py::arg("need_grad"), py::arg("need_sum"));
  m.def("num_threads", []() { return omp_get_max_threads(); }, "OpenMP threads the CPU kernels use");
  m.def("cpu_isa", []() { return std::string(dinocxr::cpu::active_isa()); },
        "Instruction set of the CPU DINO loss row kernels: 'avx512', 'avx2' or 'portable'");
  m.def("limit_cpu_isa", &ops::limit_cpu_isa, py::arg("isa"),
        "Testing hook: cap the CPU DINO loss row kernels at this instruction set");
  m.def("force_portable_cpu", &ops::force_portable_cpu, py::arg("portable"),
        "Testing hook: use the portable CPU kernels even where AVX2 is available");
  m.def("bn_act_isa", []() { return std::string(dinocxr::cpu::bn_act_isa()); },
        "Instruction set of the CPU BatchNorm + activation row kernels: 'avx2' or 'portable'");
}

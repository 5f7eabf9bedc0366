// Testing hooks over the CPU kernels' instruction-set choice (csrc/cpu/dino_loss.h, csrc/cpu/bn_act.h).
#pragma once

#include <string>

namespace dinocxr {
namespace ops {

// Caps the DINO loss row kernels at "avx512", "avx2" or "portable" (ValueError for another name).
void limit_cpu_isa(const std::string& isa);

// The portable kernels of every CPU op, even where AVX2 is available (or back to the fastest: false).
void force_portable_cpu(bool portable);

}  // namespace ops
}  // namespace dinocxr

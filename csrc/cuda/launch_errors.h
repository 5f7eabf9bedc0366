// The error check around every CUDA launch of the ops.
#pragma once

#include <cuda_runtime.h>

namespace dinocxr {
namespace ops {

// Each launch is checked with cudaGetLastError, which also returns an error some earlier,
// unrelated call left behind: take that one off first (and say so), so the check after the
// launch reports the launch's own failure only. A sticky error still fails the launch itself.
void clear_pending_cuda_error(const char* op);

}  // namespace ops
}  // namespace dinocxr

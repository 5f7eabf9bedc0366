#include "cuda/launch_errors.h"

#include <c10/util/Exception.h>

namespace dinocxr {
namespace ops {

void clear_pending_cuda_error(const char* op) {
  const cudaError_t pending = cudaGetLastError();
  if (pending != cudaSuccess) {
    TORCH_WARN(op, ": a CUDA error from an earlier call was pending before this launch and was cleared: ",
               cudaGetErrorString(pending));
  }
}

}  // namespace ops
}  // namespace dinocxr

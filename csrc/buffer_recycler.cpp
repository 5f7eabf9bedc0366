#include "buffer_recycler.h"

namespace dinocxr {

at::Tensor BufferRecycler::empty_like(const at::Tensor& like) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!(slot_.defined() && slot_.sizes() == like.sizes() && slot_.scalar_type() == like.scalar_type() &&
        slot_.device() == like.device() && slot_.storage().use_count() == 1)) {
    slot_ = at::empty_like(like, at::MemoryFormat::Contiguous);
  }
  at::Tensor out = at::empty({0}, slot_.options());
  out.set_(slot_.storage(), 0, slot_.sizes(), slot_.strides());
  return out;
}

}  // namespace dinocxr

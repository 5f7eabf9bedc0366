// One reusable output buffer for a large CPU result that callers usually drop before the next call.
#pragma once

#include <ATen/ATen.h>

#include <mutex>

namespace dinocxr {

// Large CPU outputs are recycled when nobody else holds them: a fresh 80 MB gradient costs more in
// first-touch page faults than the whole fused pass (the CPU allocator does not cache). The slot keeps
// its own TensorImpl and callers get a second one on the same storage: a Python object bound to the
// returned tensor would otherwise pin the slot's TensorImpl (PyObject preservation), so it never looked
// free. A storage still referenced anywhere (autograd graph, a .grad, a view, user code) is never reused.
class BufferRecycler {
 public:
  // A contiguous tensor with the sizes, dtype and device of `like`: the slot's storage when it is free
  // and matches, else a new one (kept for the next call). Contents are undefined.
  at::Tensor empty_like(const at::Tensor& like);

 private:
  std::mutex mutex_;
  at::Tensor slot_;
};

}  // namespace dinocxr

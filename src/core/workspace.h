// Carves 256-byte-aligned sub-buffers out of one caller-provided buffer. The same code sizes a workspace
// (base == nullptr: only counts bytes) and lays it out, so a *_workspace_bytes query and the op that uses the
// workspace can never disagree.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "moefuse/tensor.h"

namespace moefuse::detail {

class Carver {
 public:
  static constexpr std::size_t kAlign = 256;

  Carver(void* base, Device device) : base_(static_cast<char*>(base)), device_(device) {}
  explicit Carver(Device device) : Carver(nullptr, device) {}                   // sizing only
  explicit Carver(const TensorView& buffer) : Carver(buffer.data, buffer.device) {}  // layout in `buffer`

  TensorView take(DType dtype, std::initializer_list<std::int64_t> shape) {
    TensorView t = view(base_ ? base_ + used_ : nullptr, dtype, device_, shape);
    used_ += (t.nbytes() + kAlign - 1) / kAlign * kAlign;
    return t;
  }
  // A raw region of `bytes` (e.g. a library's temp storage); returned as u8[bytes].
  TensorView take_bytes(std::size_t bytes) { return take(DType::u8, {static_cast<std::int64_t>(bytes)}); }

  std::size_t bytes() const { return used_; }

 private:
  char* base_;
  Device device_;
  std::size_t used_ = 0;
};

}  // namespace moefuse::detail

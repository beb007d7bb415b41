// Argument checks shared by the dispatch layer. Each failure throws moefuse::Error with a message that names
// the op, the argument, what was expected and what came.
#pragma once

#include <initializer_list>
#include <sstream>
#include <string>

#include "moefuse/error.h"
#include "moefuse/tensor.h"

namespace moefuse::detail {

template <class... Args>
[[noreturn]] void fail(const char* op, Args&&... args) {
  std::ostringstream s;
  s << "moefuse::" << op << ": ";
  (s << ... << args);
  throw Error(s.str());
}

}  // namespace moefuse::detail

#define MOEFUSE_CHECK(cond, op, ...)                       \
  do {                                                     \
    if (!(cond)) ::moefuse::detail::fail(op, __VA_ARGS__); \
  } while (0)

namespace moefuse::detail {

// Checks a required tensor: present, contiguous, `ndim` dims with these sizes (-1 = any), one of `dtypes`, and
// (unless need_data is false, as in workspace queries) a data pointer.
void expect(const char* op, const char* name, const TensorView& t, std::initializer_list<std::int64_t> shape,
            std::initializer_list<DType> dtypes, bool need_data = true);
// Same checks for an optional tensor when present.
void expect_optional(const char* op, const char* name, const TensorView& t, std::initializer_list<std::int64_t> shape,
                     std::initializer_list<DType> dtypes, bool need_data = true);
void expect_same_device(const char* op, const char* name, const TensorView& t, Device device);
void expect_same_dtype(const char* op, const char* name, const TensorView& t, DType dtype);
// A caller-provided scratch or state buffer (u8): at least `needed` bytes, contiguous, 256-byte aligned.
void expect_buffer(const char* op, const char* name, const TensorView& buffer, std::size_t needed, Device device);
inline void expect_workspace(const char* op, const TensorView& workspace, std::size_t needed, Device device) {
  expect_buffer(op, "workspace", workspace, needed, device);
}

// A 4-bit expert weight (ops.h, nf4_quantize) is u8.
inline bool is_nf4(const TensorView& w) { return w.defined() && w.dtype == DType::u8; }
// A 4-bit weight of logical shape [experts, out, in] (-1: any size): u8 [experts, out, nf4_row_bytes(in)] and, when
// `need_data`, at a 16-byte aligned address (its rows' f32 maxima are read in place).
void expect_nf4(const char* op, const char* name, const TensorView& packed, std::int64_t experts, std::int64_t out,
                std::int64_t in, bool need_data = true);

constexpr std::initializer_list<DType> kFloatTypes = {DType::f32, DType::bf16, DType::f16};

}  // namespace moefuse::detail

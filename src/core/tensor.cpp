#include <sstream>

#include "core/check.h"
#include "core/nf4.h"
#include "moefuse/moefuse.h"

namespace moefuse {

std::int64_t TensorView::numel() const {
  std::int64_t n = 1;
  for (int d = 0; d < ndim; ++d) n *= shape[d];
  return ndim < 0 ? 0 : n;
}

bool TensorView::is_contiguous() const {
  if (ndim >= 0 && numel() == 0) return true;  // no element to place (as torch says of an expanded empty gradient)
  std::int64_t expected = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    if (shape[d] != 1 && stride[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

std::size_t TensorView::nbytes() const { return static_cast<std::size_t>(numel()) * dtype_size(dtype); }

TensorView view(void* data, DType dtype, Device device, std::initializer_list<std::int64_t> shape) {
  if (shape.size() > static_cast<std::size_t>(kMaxDims)) throw Error("moefuse::view: at most 4 dimensions");
  TensorView t;
  t.data = data;
  t.dtype = dtype;
  t.device = device;
  t.ndim = static_cast<int>(shape.size());
  int d = 0;
  for (std::int64_t s : shape) t.shape[d++] = s;
  std::int64_t stride = 1;
  for (d = t.ndim - 1; d >= 0; --d) {
    t.stride[d] = stride;
    stride *= t.shape[d];
  }
  return t;
}

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::f32: case DType::i32: return 4;
    case DType::f16: case DType::bf16: return 2;
    case DType::u8: return 1;
  }
  return 0;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32: return "f32";
    case DType::f16: return "f16";
    case DType::bf16: return "bf16";
    case DType::i32: return "i32";
    case DType::u8: return "u8";
  }
  return "?";
}

std::string device_name(Device device) {
  return device.type == DeviceType::cpu ? std::string("cpu") : "cuda:" + std::to_string(device.index);
}

std::string describe(const TensorView& t) {
  if (!t.defined()) return "absent";
  std::ostringstream s;
  s << dtype_name(t.dtype) << '[';
  for (int d = 0; d < t.ndim; ++d) s << (d ? ", " : "") << t.shape[d];
  s << "] on " << device_name(t.device);
  if (!t.is_contiguous()) s << " (not contiguous)";
  return s.str();
}

bool has_cuda() {
#ifdef MOEFUSE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

namespace detail {

static std::string dtype_list(std::initializer_list<DType> dtypes) {
  std::string s;
  for (DType d : dtypes) s += (s.empty() ? "" : " | ") + std::string(dtype_name(d));
  return s;
}

static std::string shape_str(std::initializer_list<std::int64_t> shape) {
  std::string s = "[";
  int d = 0;
  for (std::int64_t v : shape) s += (d++ ? ", " : "") + (v < 0 ? std::string("*") : std::to_string(v));
  return s + "]";
}

void expect(const char* op, const char* name, const TensorView& t, std::initializer_list<std::int64_t> shape,
            std::initializer_list<DType> dtypes, bool need_data) {
  MOEFUSE_CHECK(t.defined(), op, name, " is required");
  bool dtype_ok = false;
  for (DType d : dtypes) dtype_ok |= d == t.dtype;
  MOEFUSE_CHECK(dtype_ok, op, name, " must be ", dtype_list(dtypes), ", got ", describe(t));
  bool shape_ok = t.ndim == static_cast<int>(shape.size());
  int d = 0;
  for (std::int64_t s : shape) {
    shape_ok = shape_ok && (s < 0 || t.shape[d] == s);
    ++d;
  }
  MOEFUSE_CHECK(shape_ok, op, name, " must have shape ", shape_str(shape), ", got ", describe(t));
  for (d = 0; d < t.ndim; ++d) MOEFUSE_CHECK(t.shape[d] >= 0, op, name, " has a negative size: ", describe(t));
  MOEFUSE_CHECK(t.is_contiguous(), op, name, " must be contiguous, got ", describe(t));
  MOEFUSE_CHECK(!need_data || t.data != nullptr || t.numel() == 0, op, name, " has no data pointer: ", describe(t));
}

void expect_optional(const char* op, const char* name, const TensorView& t, std::initializer_list<std::int64_t> shape,
                     std::initializer_list<DType> dtypes, bool need_data) {
  if (t.defined()) expect(op, name, t, shape, dtypes, need_data);
}

void expect_same_device(const char* op, const char* name, const TensorView& t, Device device) {
  if (t.defined())
    MOEFUSE_CHECK(t.device == device, op, name, " is on ", device_name(t.device), " but the op runs on ",
                  device_name(device));
}

void expect_same_dtype(const char* op, const char* name, const TensorView& t, DType dtype) {
  if (t.defined())
    MOEFUSE_CHECK(t.dtype == dtype, op, name, " must have the dtype of the other float tensors (", dtype_name(dtype),
                  "), got ", describe(t));
}

void expect_buffer(const char* op, const char* name, const TensorView& buffer, std::size_t needed, Device device) {
  if (needed == 0) return;
  MOEFUSE_CHECK(buffer.defined() && buffer.nbytes() >= needed, op, name, " must hold at least ", needed,
                " bytes, got ", describe(buffer));
  expect_same_device(op, name, buffer, device);
  MOEFUSE_CHECK(buffer.is_contiguous(), op, name, " must be contiguous");
  MOEFUSE_CHECK(reinterpret_cast<std::uintptr_t>(buffer.data) % 256 == 0, op, name, " must be 256-byte aligned");
}

void expect_nf4(const char* op, const char* name, const TensorView& packed, std::int64_t experts, std::int64_t out,
                std::int64_t in, bool need_data) {
  expect(op, name, packed, {experts, out, nf4_bytes_per_row(in)}, {DType::u8}, need_data);
  MOEFUSE_CHECK(!need_data || reinterpret_cast<std::uintptr_t>(packed.data) % 16 == 0, op, name,
                " (4-bit weight) must start at a 16-byte aligned address, got ", packed.data);
}

}  // namespace detail
}  // namespace moefuse

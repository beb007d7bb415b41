// Non-owning tensor views: the only way data crosses the moefuse API.
// moefuse never allocates device memory; callers own every buffer a view points to.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

namespace moefuse {

enum class DType : std::uint8_t { f32, f16, bf16, i32, u8 };
enum class DeviceType : std::uint8_t { cpu, cuda };

struct Device {
  DeviceType type = DeviceType::cpu;
  int index = 0;

  static Device cpu() { return {}; }
  static Device cuda(int index = 0) { return {DeviceType::cuda, index}; }
  bool operator==(const Device& o) const { return type == o.type && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
};

constexpr int kMaxDims = 4;

// A strided view. ndim == -1 marks an absent optional argument (the default).
// Strides are in elements, as in DLPack and torch.
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::f32;
  Device device;
  int ndim = -1;
  std::int64_t shape[kMaxDims] = {};
  std::int64_t stride[kMaxDims] = {};

  bool defined() const { return ndim >= 0; }
  std::int64_t size(int d) const { return shape[d < 0 ? d + ndim : d]; }
  std::int64_t numel() const;
  bool is_contiguous() const;  // row-major; true for a view of no elements, whatever its strides
  std::size_t nbytes() const;
  template <class T> T* ptr() const { return static_cast<T*>(data); }
};

// A contiguous view over `data`.
TensorView view(void* data, DType dtype, Device device, std::initializer_list<std::int64_t> shape);

std::size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);
std::string device_name(Device device);
// "bf16[4096, 2048] on cuda:0" — used in error messages.
std::string describe(const TensorView& t);

}  // namespace moefuse

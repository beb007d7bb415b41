// Shared helpers of the CUDA backend: error checks, element types, small device utilities.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>

#include "moefuse/error.h"
#include "moefuse/tensor.h"

namespace moefuse::cuda {

[[noreturn]] inline void throw_cuda(cudaError_t err, const char* what, const char* file, int line) {
  throw Error(std::string("moefuse CUDA error: ") + cudaGetErrorString(err) + " in " + what + " (" + file + ":" +
              std::to_string(line) + ")");
}

}  // namespace moefuse::cuda

#define MOEFUSE_CUDA_CHECK(call)                                                         \
  do {                                                                                   \
    cudaError_t err_ = (call);                                                           \
    if (err_ != cudaSuccess) ::moefuse::cuda::throw_cuda(err_, #call, __FILE__, __LINE__); \
  } while (0)

// After every launch: catches bad configurations at once (asynchronous faults surface at the next sync).
#define MOEFUSE_CUDA_LAUNCH_CHECK() MOEFUSE_CUDA_CHECK(cudaGetLastError())

namespace moefuse::cuda {

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

// Makes the tensors' device current for one op and restores the caller's device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(const Device& d) {
    MOEFUSE_CUDA_CHECK(cudaGetDevice(&prev_));
    if (d.index != prev_) MOEFUSE_CUDA_CHECK(cudaSetDevice(d.index));
    changed_ = d.index != prev_;
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool changed_ = false;
};

// A kernel may use more than 48 KB of dynamic shared memory only after this. The attribute holds per kernel and
// device, and setting it costs microseconds of host time on every launch, so each (kernel, device) gets it once per
// size it grows to.
template <class Kernel>
void set_smem_limit(Kernel kernel, std::size_t bytes) {
  if (bytes <= 48 * 1024) return;
  int device = 0;
  MOEFUSE_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, std::size_t> set;  // per Kernel signature: keyed by the kernel
  const std::lock_guard<std::mutex> lock(mutex);
  std::size_t& limit = set[{reinterpret_cast<const void*>(kernel), device}];
  if (bytes <= limit) return;
  MOEFUSE_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  limit = bytes;
}

template <class T>
constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// Calls f(T{}) with T the storage type of a float dtype.
template <class F>
decltype(auto) dispatch_float(DType dtype, F&& f) {
  switch (dtype) {
    case DType::bf16: return f(__nv_bfloat16{});
    case DType::f16: return f(__half{});
    default: return f(float{});
  }
}

// Calls f(integral_constant<R>) with a LoRA rank rounded up to the width of the tensor-core kernels' rank-side
// accumulators, 16, 32 or 64 (0, no adapter, stays 0).
template <class F>
void with_rank(int rank, F&& f) {
  if (rank == 0)
    f(std::integral_constant<int, 0>{});
  else if (rank <= 16)
    f(std::integral_constant<int, 16>{});
  else if (rank <= 32)
    f(std::integral_constant<int, 32>{});
  else
    f(std::integral_constant<int, 64>{});
}

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <class T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + __expf(-g)); }

// SwiGLU's backward at one element of a dgrad row v (grad_out . W[e], not yet scaled by the routing weight w), with
// h = [g | u]: a = silu(g) * u rounded to T as the forward stores it, the scaled da rounded as a stored grad_a would
// be, then the gradients of g and u.
struct DSwiglu {
  float a, dg, du;
};
template <class T>
__device__ __forceinline__ DSwiglu dswiglu(float v, float g, float u, float w) {
  const float sig = sigmoid(g), a = to_f32(from_f32<T>(g * sig * u)), da = to_f32(from_f32<T>(v * w));
  return {a, da * u * sig * (1.f + g * (1.f - sig)), da * g * sig};
}

// Two values as one 4-byte pair of T (16-bit T).
template <class T>
__device__ __forceinline__ std::uint32_t pack2(float a, float b) {
  using T2 = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
  T2 v;
  v.x = from_f32<T>(a);
  v.y = from_f32<T>(b);
  return *reinterpret_cast<std::uint32_t*>(&v);
}

// 16 bytes of T: the unit of vectorised loads and stores.
template <class T>
struct alignas(16) Vec {
  static constexpr int n = 16 / sizeof(T);
  T v[n];
};

inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15) == 0; }

// VEC consecutive elements as f32: one 16-byte access when VEC > 1.
template <class T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&v)[VEC]) {
  if constexpr (VEC > 1) {
    const Vec<T> x = *reinterpret_cast<const Vec<T>*>(p);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = to_f32(x.v[i]);
  } else {
    v[0] = to_f32(p[0]);
  }
}

template <class T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float (&v)[VEC]) {
  if constexpr (VEC > 1) {
    Vec<T> x;
#pragma unroll
    for (int i = 0; i < VEC; ++i) x.v[i] = from_f32<T>(v[i]);
    *reinterpret_cast<Vec<T>*>(p) = x;
  } else {
    p[0] = from_f32<T>(v[0]);
  }
}

// Calls f(integral_constant<VEC>) with 16-byte vectors when cols and every pointer allow, else with 1.
template <class T, class F>
void with_vec(std::int64_t cols, std::initializer_list<const void*> ptrs, F&& f) {
  constexpr int kVec = Vec<T>::n;
  bool ok = cols % kVec == 0;
  for (const void* p : ptrs) ok = ok && aligned16(p);
  if (ok)
    f(std::integral_constant<int, kVec>{});
  else
    f(std::integral_constant<int, 1>{});
}


}  // namespace moefuse::cuda

// SwiGLU on [gate | up] rows: a = silu(g) * u, computed in f32; VEC consecutive elements of one row per thread.
#include "core/backend.h"
#include "cuda/common.cuh"

namespace moefuse::cuda {
namespace {

constexpr int kThreads = 256;

template <class T, int VEC>
__global__ void swiglu_forward_kernel(const T* __restrict__ h, std::int64_t rows, std::int64_t inter,
                                      T* __restrict__ a) {
  const std::int64_t idx = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (idx >= rows * inter) return;
  const std::int64_t r = idx / inter, c = idx % inter;
  float g[VEC], u[VEC], out[VEC];
  load_vec<T, VEC>(h + r * 2 * inter + c, g);
  load_vec<T, VEC>(h + r * 2 * inter + inter + c, u);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = g[i] * sigmoid(g[i]) * u[i];
  store_vec<T, VEC>(a + idx, out);
}

// d g = da * u * sig * (1 + g (1 - sig));  d u = da * silu(g)
template <class T, int VEC>
__global__ void swiglu_backward_kernel(const T* __restrict__ h, const T* __restrict__ grad_a, std::int64_t rows,
                                       std::int64_t inter, T* __restrict__ grad_h) {
  const std::int64_t idx = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (idx >= rows * inter) return;
  const std::int64_t r = idx / inter, c = idx % inter;
  float g[VEC], u[VEC], da[VEC], dg[VEC], du[VEC];
  load_vec<T, VEC>(h + r * 2 * inter + c, g);
  load_vec<T, VEC>(h + r * 2 * inter + inter + c, u);
  load_vec<T, VEC>(grad_a + idx, da);
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const float sig = sigmoid(g[i]);
    dg[i] = da[i] * u[i] * sig * (1.f + g[i] * (1.f - sig));
    du[i] = da[i] * g[i] * sig;
  }
  store_vec<T, VEC>(grad_h + r * 2 * inter + c, dg);
  store_vec<T, VEC>(grad_h + r * 2 * inter + inter + c, du);
}

unsigned blocks_for(std::int64_t elements, int vec) {
  return static_cast<unsigned>(ceil_div<std::int64_t>(ceil_div<std::int64_t>(elements, vec), kThreads));
}

}  // namespace

void swiglu_forward(const TensorView& h, const TensorView& a, void* stream) {
  DeviceGuard guard(h.device);
  const std::int64_t rows = h.shape[0], inter = h.shape[1] / 2;
  if (rows * inter == 0) return;
  dispatch_float(h.dtype, [&](auto tag) {
    using T = decltype(tag);
    with_vec<T>(inter, {h.data, a.data}, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      swiglu_forward_kernel<T, VEC><<<blocks_for(rows * inter, VEC), kThreads, 0, as_stream(stream)>>>(
          h.ptr<T>(), rows, inter, a.ptr<T>());
    });
  });
  MOEFUSE_CUDA_LAUNCH_CHECK();
}

void swiglu_backward(const TensorView& h, const TensorView& grad_a, const TensorView& grad_h, void* stream) {
  DeviceGuard guard(h.device);
  const std::int64_t rows = h.shape[0], inter = h.shape[1] / 2;
  if (rows * inter == 0) return;
  dispatch_float(h.dtype, [&](auto tag) {
    using T = decltype(tag);
    with_vec<T>(inter, {h.data, grad_a.data, grad_h.data}, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      swiglu_backward_kernel<T, VEC><<<blocks_for(rows * inter, VEC), kThreads, 0, as_stream(stream)>>>(
          h.ptr<T>(), grad_a.ptr<T>(), rows, inter, grad_h.ptr<T>());
    });
  });
  MOEFUSE_CUDA_LAUNCH_CHECK();
}

}  // namespace moefuse::cuda

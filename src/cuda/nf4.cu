// 4-bit weights on the CUDA backend (format: core/nf4.h). Dequantizing is a pass bound by memory: a thread turns
// 4 bytes of indices into 8 elements (one 16-byte store of bf16), its warp a whole run's maximum read once per 8
// threads; the 16 levels sit in shared memory. Quantizing runs once per weight: a warp per run of 64.
#include <algorithm>

#include "core/backend.h"
#include "core/nf4.h"
#include "cuda/common.cuh"

namespace moefuse::cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;

unsigned grid_for(std::int64_t items) {
  const std::int64_t blocks = std::min<std::int64_t>(ceil_div<std::int64_t>(items, kThreads), 1 << 16);
  return static_cast<unsigned>(std::max<std::int64_t>(1, blocks));
}

// NaN-keeping max over the warp.
__device__ __forceinline__ float warp_absmax(float m) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = nf4_absmax(m, __shfl_xor_sync(0xffffffffu, m, o));
  return m;
}

// A warp per (row, run): lane l quantizes elements 2l and 2l + 1 of the run into byte l of it. The warp of a row's
// last run also zeroes the row's padding.
template <class T>
__global__ void quantize_kernel(const T* __restrict__ w, std::uint8_t* __restrict__ packed, std::int64_t rows,
                                std::int64_t in) {
  const std::int64_t runs = nf4_runs(in), row_bytes = nf4_bytes_per_row(in), index_bytes = nf4_index_bytes(in);
  const int lane = threadIdx.x & 31;
  const std::int64_t warps = static_cast<std::int64_t>(gridDim.x) * (kThreads / 32);
  for (std::int64_t g = (static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32; g < rows * runs;
       g += warps) {
    const std::int64_t row = g / runs, run = g % runs, i = run * kNf4Run + 2 * lane;
    const T* src = w + row * in;
    const float v0 = i < in ? to_f32(src[i]) : 0.f, v1 = i + 1 < in ? to_f32(src[i + 1]) : 0.f;
    const float m = warp_absmax(nf4_absmax(nf4_absmax(0.f, v0), v1));
    std::uint8_t* p = packed + row * row_bytes;
    if (i < in)
      p[i / 2] = static_cast<std::uint8_t>(nf4_index(nf4_scaled(v0, m)) << 4 |
                                           (i + 1 < in ? nf4_index(nf4_scaled(v1, m)) : 0));
    if (lane == 0) reinterpret_cast<float*>(p + index_bytes)[run] = m;
    if (run == runs - 1) {
      for (std::int64_t b = (in + 1) / 2 + lane; b < index_bytes; b += 32) p[b] = 0;
      for (std::int64_t b = index_bytes + 4 * runs + lane; b < row_bytes; b += 32) p[b] = 0;
    }
  }
}

// Thread per 8 elements of a row (VEC: in % 8 == 0 and the weight 16-byte aligned, so each 8 are one or two 16-byte
// stores; else element by element). Experts with counts[e] == 0 are skipped.
template <class T, bool VEC>
__global__ void dequantize_kernel(const std::uint8_t* __restrict__ packed, const int* __restrict__ counts,
                                  T* __restrict__ w, std::int64_t out, std::int64_t in, std::int64_t rows) {
  __shared__ float level[16];
  if (threadIdx.x < 16) level[threadIdx.x] = nf4_level(static_cast<int>(threadIdx.x));
  __syncthreads();
  const std::int64_t groups = (in + 7) / 8, row_bytes = nf4_bytes_per_row(in), index_bytes = nf4_index_bytes(in);
  for (std::int64_t g = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x; g < rows * groups;
       g += static_cast<std::int64_t>(gridDim.x) * kThreads) {
    const std::int64_t row = g / groups, i0 = g % groups * 8;
    if (counts && counts[row / out] == 0) continue;
    const std::uint8_t* p = packed + row * row_bytes;
    const float m = reinterpret_cast<const float*>(p + index_bytes)[i0 / kNf4Run];
    T* dst = w + row * in + i0;
    if constexpr (VEC) {
      const std::uint32_t b = *reinterpret_cast<const std::uint32_t*>(p + i0 / 2);
      float v[8];
#pragma unroll
      for (int j = 0; j < 4; ++j) {  // byte j of the little-endian word holds elements 2j (high) and 2j + 1
        v[2 * j] = level[b >> (8 * j + 4) & 15] * m;
        v[2 * j + 1] = level[b >> (8 * j) & 15] * m;
      }
      constexpr int n = Vec<T>::n;
#pragma unroll
      for (int j = 0; j < 8; j += n) {
        float part[n];
#pragma unroll
        for (int q = 0; q < n; ++q) part[q] = v[j + q];
        store_vec<T, n>(dst + j, part);
      }
    } else {
      for (std::int64_t i = i0; i < std::min<std::int64_t>(i0 + 8, in); ++i) {
        const std::uint8_t b = p[i / 2];
        dst[i - i0] = from_f32<T>(level[i % 2 ? b & 15 : b >> 4] * m);
      }
    }
  }
}

}  // namespace

void nf4_quantize(const TensorView& weight, const TensorView& packed, void* stream) {
  const std::int64_t rows = weight.shape[0] * weight.shape[1], in = weight.shape[2];
  if (rows == 0) return;
  DeviceGuard guard(weight.device);
  dispatch_float(weight.dtype, [&](auto t) {
    using T = decltype(t);
    quantize_kernel<T><<<grid_for(rows * nf4_runs(in) * 32), kThreads, 0, as_stream(stream)>>>(
        weight.ptr<T>(), packed.ptr<std::uint8_t>(), rows, in);
  });
  MOEFUSE_CUDA_LAUNCH_CHECK();
}

void nf4_dequantize(const TensorView& packed, const TensorView& counts, const TensorView& weight, void* stream) {
  const std::int64_t out = weight.shape[1], in = weight.shape[2], rows = weight.shape[0] * out;
  if (rows == 0) return;
  DeviceGuard guard(weight.device);
  const int* c = counts.defined() ? counts.ptr<int>() : nullptr;
  const unsigned grid = grid_for(rows * ((in + 7) / 8));
  dispatch_float(weight.dtype, [&](auto t) {
    using T = decltype(t);
    if (in % 8 == 0 && aligned16(weight.data))
      dequantize_kernel<T, true><<<grid, kThreads, 0, as_stream(stream)>>>(packed.ptr<std::uint8_t>(), c,
                                                                         weight.ptr<T>(), out, in, rows);
    else
      dequantize_kernel<T, false><<<grid, kThreads, 0, as_stream(stream)>>>(packed.ptr<std::uint8_t>(), c,
                                                                          weight.ptr<T>(), out, in, rows);
  });
  MOEFUSE_CUDA_LAUNCH_CHECK();
}

}  // namespace moefuse::cuda

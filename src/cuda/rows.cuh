// Row kernels around the grouped GEMMs: per-token gather-sums over a token's routed pairs (deterministic, no
// atomics), gathers into sorted order, additions over sorted rows, and zeroing of placeholder rows. Sorted rows at
// or past offsets[E] belong to placeholder pairs.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/common.cuh"
#include "moefuse/ops.h"

namespace moefuse::cuda {

namespace rows_detail {

constexpr int kRowThreads = 256;

// out[t, :] (+)= scale * sum_j w[t, j] * rows[pair_positions[t*k + j], :] over t's routed pairs (w = 1 when absent).
template <class T, int VEC>
__global__ void gather_sum_rows(const T* __restrict__ rows, const int* __restrict__ pair_positions,
                                const float* __restrict__ w, float scale, bool accumulate,
                                const int* __restrict__ offsets, int experts, std::int64_t tokens, int top_k,
                                std::int64_t cols, T* __restrict__ out) {
  const std::int64_t per_row = cols / VEC;
  const std::int64_t idx = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= tokens * per_row) return;
  const std::int64_t t = idx / per_row, c = (idx % per_row) * VEC;
  const int routed = offsets[experts];
  float acc[VEC] = {}, v[VEC];
  for (int j = 0; j < top_k; ++j) {
    const std::int64_t pair = t * top_k + j;
    const int pos = pair_positions[pair];
    if (pos >= routed) continue;
    const float wj = scale * (w ? w[pair] : 1.f);
    load_vec<T, VEC>(rows + pos * cols + c, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] += wj * v[i];
  }
  T* dst = out + t * cols + c;
  if (accumulate) {
    load_vec<T, VEC>(dst, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] += v[i];
  }
  store_vec<T, VEC>(dst, acc);
}

// dst[s, :] = w[pairs[s]] * src[pairs[s] / k, :] (w = 1 when absent) for routed sorted rows s: a gathered operand
// made dense for a kernel whose loads cannot gather (TMA). A block per row, grid over all M rows.
template <class T, int VEC>
__global__ void gather_sorted_rows(const T* __restrict__ src, const int* __restrict__ pairs, int top_k,
                                   const float* __restrict__ w, const int* __restrict__ offsets, int experts,
                                   std::int64_t cols, T* __restrict__ dst) {
  const std::int64_t s = blockIdx.x;
  if (s >= offsets[experts]) return;
  const int pair = pairs[s];
  const float scale = w ? w[pair] : 1.f;
  const T* in = src + static_cast<std::int64_t>(pair / top_k) * cols;
  T* out = dst + s * cols;
  float v[VEC];
  for (std::int64_t c = threadIdx.x * VEC; c < cols; c += static_cast<std::int64_t>(blockDim.x) * VEC) {
    load_vec<T, VEC>(in + c, v);
    if (w) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[i] *= scale;
    }
    store_vec<T, VEC>(out + c, v);
  }
}

// Zeroes sorted rows [offsets[E], m). Fixed grid; the work scales with the placeholders.
template <class T>
__global__ void zero_placeholder_rows(T* __restrict__ out, const int* __restrict__ offsets, int experts,
                                      std::int64_t m, std::int64_t cols) {
  const std::int64_t begin = offsets[experts] * cols, end = m * cols;
  for (std::int64_t i = begin + static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < end;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    out[i] = from_f32<T>(0.f);
}

}  // namespace rows_detail

// out [T, cols] (+)= scale * per-token weighted sum of the sorted `rows` [M, cols].
template <class T>
void launch_gather_sum(const TensorView& rows, const Plan& plan, const float* w, float scale, bool accumulate,
                       const TensorView& out, cudaStream_t s) {
  using namespace rows_detail;
  const std::int64_t cols = out.shape[1];
  with_vec<T>(cols, {rows.data, out.data}, [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    const std::int64_t threads = plan.tokens * (cols / VEC);
    if (threads == 0) return;
    gather_sum_rows<T, VEC><<<static_cast<unsigned>(ceil_div<std::int64_t>(threads, kRowThreads)), kRowThreads, 0, s>>>(
        rows.ptr<T>(), plan.pair_positions.ptr<int>(), w, scale, accumulate, plan.offsets.ptr<int>(), plan.experts,
        plan.tokens, plan.top_k, cols, out.ptr<T>());
    MOEFUSE_CUDA_LAUNCH_CHECK();
  });
}

// dst [M, cols] = the routed rows of src [T, cols] in sorted order, each scaled by its pair's w when given.
template <class T>
void launch_gather_sorted(const TensorView& src, const Plan& plan, const float* w, const TensorView& dst,
                          cudaStream_t s) {
  using namespace rows_detail;
  const std::int64_t m = plan.tokens * plan.top_k, cols = dst.shape[1];
  if (m * cols == 0) return;
  with_vec<T>(cols, {src.data, dst.data}, [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    gather_sorted_rows<T, VEC><<<static_cast<unsigned>(m), kRowThreads, 0, s>>>(
        src.ptr<T>(), plan.sorted_pairs.ptr<int>(), plan.top_k, w, plan.offsets.ptr<int>(), plan.experts, cols,
        dst.ptr<T>());
    MOEFUSE_CUDA_LAUNCH_CHECK();
  });
}

// Zeroes the placeholder rows of a sorted [M, cols] output.
template <class T>
void launch_zero_placeholders(const TensorView& out, const Plan& plan, cudaStream_t s) {
  using namespace rows_detail;
  const std::int64_t m = plan.tokens * plan.top_k, cols = out.shape[1];
  if (m * cols == 0) return;
  zero_placeholder_rows<T><<<256, kRowThreads, 0, s>>>(out.ptr<T>(), plan.offsets.ptr<int>(), plan.experts, m, cols);
  MOEFUSE_CUDA_LAUNCH_CHECK();
}

}  // namespace moefuse::cuda
